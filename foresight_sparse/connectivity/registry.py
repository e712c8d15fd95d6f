"""The one registry from module type to builder, and which types count (``layers=``).

:data:`REGISTRY` maps each module type to its adapter; :func:`register` adds a user's,
:func:`connectivity` looks one up, and :class:`LayerSelection` resolves ``layers=`` to the
builder of every type that counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..exceptions import (
    Opt,
    OptionError,
    UnknownLayerError,
    UnknownNameError,
    UnsupportedLayerError,
)
from .base import Connectivity

__all__ = [
    "REGISTRY",
    "SEED_TYPES",
    "EXTENDED",
    "LAYER_SETS",
    "LayerSelection",
    "register",
    "unregister",
    "connectivity",
]

Adapter = Callable[..., Connectivity]

#: Module type -> adapter ``(module, in_shape, out_shape, *, legacy, label) -> Connectivity``.
#: One entry per built-in type and per type a user registered. Which entries count depends
#: on ``layers=`` (see :class:`LayerSelection`): the old module's three types and the
#: user's always do; the built-in types in :data:`EXTENDED` only under ``layers="all"``.
REGISTRY: dict[type, Adapter] = {}

#: The old module's layer types: what ``layers="seed"`` (the default) and the drop-in
#: functions count, by exact type.
SEED_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.AvgPool2d)

#: Built-in entries of :data:`REGISTRY` that count only under ``layers="all"`` (or when
#: named in ``layers=``): the flag that keeps one registry for every selection.
EXTENDED: set[type] = set()

#: Every type this package ships a builder for (seed and extended); their subclasses that
#: inherit the forward pass count under ``layers="all"``.
BUILTIN: set[type] = set()

#: The names ``layers=`` accepts besides a sequence of module types.
LAYER_SETS = ("seed", "all")

#: Methods of a built-in layer that run its forward pass: a subclass that overrides one of
#: them may compute with something other than ``.weight`` as stored.
_FORWARD_METHODS = ("forward", "_conv_forward")


def register(module_type: type, adapter: Adapter | None = None):
    """Register ``adapter`` as the connectivity builder of ``module_type``.

    The adapter is called as ``adapter(module, in_shape, out_shape, *, legacy, label)`` and
    returns a :class:`Connectivity` (for instance an :class:`ExplicitMatrix`). Usable as a
    decorator: ``@register(MyLayer)``. A registered type counts whatever ``layers=`` says.

    Raises
    ------
    OptionError
        When ``module_type`` is not a class (a ``TypeError``).
    """
    if not isinstance(module_type, type):
        raise OptionError(
            f"register() takes a module class, got {module_type!r}", param="module_type"
        )

    def deco(fn: Adapter) -> Adapter:
        REGISTRY[module_type] = fn
        EXTENDED.discard(module_type)
        return fn

    return deco(adapter) if adapter is not None else deco


def unregister(module_type: type) -> None:
    """Remove the builder of ``module_type``.

    Raises
    ------
    UnknownLayerError
        When none is registered (a ``KeyError``); the message lists the registered types.
    """
    if module_type not in REGISTRY:
        raise UnknownLayerError(
            f"no connectivity builder is registered for {module_type!r}; registered types: "
            f"{', '.join(sorted(t.__name__ for t in REGISTRY))}",
            param="module_type",
        )
    del REGISTRY[module_type]
    EXTENDED.discard(module_type)


def _builtin(*module_types: type, extended: bool = True):
    """Register a built-in adapter for ``module_types``; ``extended``: counted only under
    ``layers="all"``."""

    def deco(fn: Adapter) -> Adapter:
        for t in module_types:
            REGISTRY[t] = fn
            BUILTIN.add(t)
            if extended:
                EXTENDED.add(t)
        return fn

    return deco


def _builtin_base(t: type) -> type | None:
    """The nearest built-in layer type ``t`` derives from (``None`` if none)."""
    for base in t.__mro__[1:]:
        if base in BUILTIN and base in REGISTRY:
            return base
    return None


def _overrides_forward(t: type, base: type) -> bool:
    return any(getattr(t, m, None) is not getattr(base, m, None) for m in _FORWARD_METHODS)


class LayerSelection:
    """Which module types count towards EI, and the builder of each: ``layers=`` resolved.

    Parameters
    ----------
    layers : {'seed', 'all'} or sequence of module types, default 'seed'
        ``'seed'``: the old module's types (:data:`SEED_TYPES`), by exact type.
        ``'all'``: every built-in type, and subclasses of them that inherit the forward
        pass unchanged (their ``.weight`` is what the layer computes with); a subclass
        with its own ``forward`` is skipped and listed in :attr:`refused`.
        A sequence of types: exactly those (a subclass of a built-in type that inherits
        its forward pass is built as that type). Types registered with :func:`register`
        count in every case.

    Raises
    ------
    UnknownNameError
        For a string other than ``'seed'`` or ``'all'``.
    UnsupportedLayerError
        For a listed type with no builder (or with its own forward pass).
    """

    def __init__(self, layers: Any = "seed"):
        if isinstance(layers, LayerSelection):
            layers = layers.layers
        if isinstance(layers, str):
            if layers not in LAYER_SETS:
                raise UnknownNameError(
                    "unknown ",
                    Opt("layers", layers),
                    "; use 'seed' (the old module's Linear, Conv2d and AvgPool2d), 'all' "
                    "(every built-in layer type) or a sequence of module types",
                )
            self.layers = layers
            self._listed: dict[type, Adapter] | None = None
        else:
            try:
                types = tuple(layers)
            except TypeError:
                raise UnknownNameError(
                    Opt("layers", layers),
                    " is neither 'seed', 'all' nor a sequence of module types",
                ) from None
            self._listed = {}
            for t in types:
                adapter = self._inherited(t) if isinstance(t, type) else None
                if adapter is None:
                    what = t.__name__ if isinstance(t, type) else repr(t)
                    raise UnsupportedLayerError(
                        Opt("layers", metavar=""),
                        f" lists {what}, which has no connectivity builder (or defines "
                        "its own forward pass). Register one with foresight_sparse.register("
                        f"{what}, builder); built-in types: "
                        f"{', '.join(sorted(b.__name__ for b in BUILTIN))}",
                    )
                self._listed[t] = adapter
            self.layers = types
        self.refused: dict[type, type] = {}  # subclass -> the built-in type it derives from
        self._cache: dict[type, Adapter | None] = {}

    @staticmethod
    def _inherited(t: type) -> Adapter | None:
        if t in REGISTRY:
            return REGISTRY[t]
        base = _builtin_base(t)
        if base is None or _overrides_forward(t, base):
            return None
        return REGISTRY[base]

    def get(self, t: type, default=None) -> Adapter | None:
        """The builder of modules of exact type ``t``, or ``default`` when they do not count."""
        if t not in self._cache:
            self._cache[t] = self._resolve(t)
        adapter = self._cache[t]
        return default if adapter is None else adapter

    def _resolve(self, t: type) -> Adapter | None:
        if t in REGISTRY and (t not in BUILTIN or (t not in EXTENDED and t not in SEED_TYPES)):
            return REGISTRY[t]  # the user's own registrations count whatever layers= says
        if self._listed is not None:
            return self._listed.get(t)
        if self.layers == "seed":
            return REGISTRY[t] if t in REGISTRY and t not in EXTENDED else None
        if t in REGISTRY:
            return REGISTRY[t]
        base = _builtin_base(t)
        if base is None:
            return None
        if _overrides_forward(t, base):
            self.refused[t] = base
            return None
        return REGISTRY[base]

    def __contains__(self, t: object) -> bool:
        return isinstance(t, type) and self.get(t) is not None

    def __iter__(self):
        """The types that count by name (for messages): listed, registered, or built in."""
        if self._listed is not None:
            keys = set(self._listed) | (set(REGISTRY) - BUILTIN)
        elif self.layers == "seed":
            keys = set(REGISTRY) - EXTENDED
        else:
            keys = set(REGISTRY)
        return iter(sorted(keys, key=lambda t: t.__name__))

    def __repr__(self) -> str:
        return f"LayerSelection({self.layers!r})"

    @property
    def label(self) -> str:
        """The option as one string for records and metadata: ``'seed'``, ``'all'``, or the
        listed types' names joined by commas."""
        if isinstance(self.layers, str):
            return self.layers
        return ",".join(t.__name__ for t in self.layers)


def connectivity(
    module: nn.Module,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
    adapter: Adapter | None = None,
) -> Connectivity:
    """The :class:`Connectivity` of ``module`` for the traced shapes, via :data:`REGISTRY`.

    ``adapter`` overrides the registry's builder (a :class:`LayerSelection` picks the
    built-in one for a subclass).

    Raises
    ------
    UnsupportedLayerError
        When no builder is registered for ``type(module)``.
    ShapeMismatchError
        From the built-in adapters, when a shape is not a sequence of ints or does not fit
        the layer; the message names the layer.
    """
    label = label or type(module).__name__
    if adapter is None:
        adapter = REGISTRY.get(type(module))
    if adapter is None:
        valid = ", ".join(sorted(t.__name__ for t in REGISTRY))
        raise UnsupportedLayerError(
            f"{label}: no connectivity builder is registered for {type(module).__name__} "
            f"(input {tuple(in_shape)}, output {tuple(out_shape)}). Registered types: "
            f"{valid}. Register one with foresight_sparse.register({type(module).__name__}, "
            "builder)"
        )
    return adapter(module, tuple(in_shape), tuple(out_shape), legacy=legacy, label=label)

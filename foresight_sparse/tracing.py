"""Find a model's layers and their input/output shapes with one hooked forward pass."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .connectivity import LayerSelection
from .exceptions import (
    ForwardError,
    MissingInputError,
    NoSupportedLayersError,
    Opt,
    OptionError,
    ShapeMismatchError,
    UnknownNameError,
    warn_caller,
)
from .geometry import shape_tuple
from .metatwin import ELEMENTWISE, ShapeRules, meta_twin, to_meta

__all__ = ["TracedLayer", "Trace", "trace", "get_shapes", "layers_from_shapes"]

log = logging.getLogger("foresight_sparse")

#: Leaf modules that act elementwise or only reshape: skipping them loses no connectivity
#: the old module would have counted, so they are listed in reports but not warned about.
_PASSIVE = (*ELEMENTWISE, nn.PReLU, nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax)


@dataclass
class TracedLayer:
    """A supported layer found in a forward pass: its qualified name, module and shapes."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    #: The leaf module that returned just before this layer was called, and the first one
    #: that returned after it (None at either end of the pass, and when the layers come
    #: from ``shapes``): where an activation around the layer is found (the perturbation
    #: measure reads them).
    before: nn.Module | None = field(default=None, repr=False, compare=False)
    after: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """How messages name the layer: ``"features.0 (Conv2d)"``."""
        return (
            f"{self.name} ({type(self.module).__name__})"
            if self.name
            else type(self.module).__name__
        )


@dataclass
class Trace:
    """The layers of a model in forward order, and the leaf modules that were skipped."""

    layers: list[TracedLayer]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the model; hooks belong on the original modules.
    return getattr(model, "_orig_mod", model)


def _names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(mod, name)
    return names


def _model_device_dtype(model: nn.Module):
    modules = list(model.modules())
    for kind in ("_parameters", "_buffers"):  # parameters first, as model.parameters()
        for module in modules:
            for t in getattr(module, kind).values():
                if t is not None and t.is_floating_point():
                    return t.device, t.dtype
    return None, None


def _call(model: nn.Module, input):
    if isinstance(input, dict):
        return model(**input)
    if isinstance(input, (tuple, list)):
        return model(*input)
    return model(input)


#: Modules whose forward takes integer indices: an integer input must reach them as it is.
_INDEX_INPUT = (nn.Embedding, nn.EmbeddingBag)


def _adapt_input(model: nn.Module, input):
    """Move the input to the model's device and floating dtype (shapes are all we need).

    A tensor ``input`` that is floating, integer or boolean is cast to the model's floating
    dtype (the default dtype for a model without floating parameters or buffers), so
    ``torch.zeros(1, 3, 32, 32, dtype=torch.int64)`` traces like a float batch; models with
    an ``nn.Embedding``/``nn.EmbeddingBag`` keep integer inputs. Tensors inside a tuple,
    list or dict input are moved to the model's device, and the floating ones cast to its
    dtype; integer and boolean ones (indices, masks) are left as they are.
    """
    device, dtype = _model_device_dtype(model)
    dtype = dtype or torch.get_default_dtype()
    if isinstance(input, torch.Tensor):
        cast = input.is_floating_point() or (
            not input.is_complex() and not any(isinstance(m, _INDEX_INPUT) for m in model.modules())
        )
        if cast and input.dtype != dtype:
            input = input.to(dtype)
        return input if device is None else input.to(device)
    if isinstance(input, (tuple, list)):
        return type(input)(_adapt_nested(v, device, dtype) for v in input)
    if isinstance(input, dict):
        return {k: _adapt_nested(v, device, dtype) for k, v in input.items()}
    return input


def _adapt_nested(value, device, dtype):
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point() and value.dtype != dtype:
        value = value.to(dtype)
    return value if device is None else value.to(device)


class _Recorder:
    """Records the shapes of registered layers, the skipped leaves and the modules running.

    ``twins`` maps the modules a pass runs on to the model's own modules (for a meta twin);
    modules missing from it are the model's own.
    """

    def __init__(self, registry, names, twins):
        self.registry = registry
        self.names = names
        self.twins = twins
        self.shapes: dict[nn.Module, tuple] = {}
        self.seen_shapes: dict[nn.Module, set] = {}
        self.skipped: dict[nn.Module, None] = {}
        # modules entered and not yet returned from: after a failure, the innermost one
        # (the last) is the module whose own code raised
        self.running: list[nn.Module] = []
        # the leaf modules around each registered layer's first call (TracedLayer.before
        # and .after): the last leaf that returned, and the layers awaiting a successor
        self.last_leaf: nn.Module | None = None
        self.before: dict[nn.Module, nn.Module | None] = {}
        self.after: dict[nn.Module, nn.Module | None] = {}
        self.awaiting: list[nn.Module] = []

    def failed_in(self) -> str:
        """How a ForwardError names the module that raised: ``'features.3' (Conv2d)``."""
        if not self.running:
            return "(before the first module)"
        module = self.running[-1]
        name = self.names.get(module, "")
        if not name:  # the model's own forward, outside any submodule
            return f"{type(module).__name__} (the top-level module)"
        return f"{name!r} ({type(module).__name__})"

    def record(self, module: nn.Module, args, output) -> None:
        """``module`` (the model's own) returned ``output`` from ``args``."""
        if self.running and self.running[-1] is module:
            self.running.pop()
        counted = type(module) in self.registry
        leaf = all(child is None for child in module._modules.values())
        if counted or leaf:
            for waiting in self.awaiting:
                self.after[waiting] = module
            self.awaiting.clear()
        if counted:
            in_shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            out = output[0] if isinstance(output, (tuple, list)) else output
            shapes = self.shapes[module] = (in_shape, tuple(out.shape))
            self.seen_shapes.setdefault(module, set()).add(shapes)
            if module not in self.before:
                self.before[module] = self.last_leaf
                self.awaiting.append(module)
        elif leaf:
            self.skipped.setdefault(module)
        if counted or leaf:
            self.last_leaf = module

    def run_real(self, model: nn.Module, x) -> None:
        """The forward pass of the model itself, observed through hooks on every module."""

        def pre_hook(module, args):
            self.running.append(module)

        def hook(module, args, output):
            self.record(module, args, output)

        handles = []
        modes = {m: m.training for m in model.modules()}
        try:
            for mod in modes:
                handles.append(mod.register_forward_pre_hook(pre_hook))
                handles.append(mod.register_forward_hook(hook))
            model.eval()
            with torch.no_grad():
                _call(model, x)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode

    def run_twin(self, twin: nn.Module, x) -> None:
        """The forward pass of a meta twin (which :func:`meta_twin` made for this pass
        alone), observed by wrapping each module's forward: cheaper than hooks."""
        for module, original in self.twins.items():
            state = module.__dict__
            state["forward"] = self._observed(module.forward, original)
            state["training"] = False
        with torch.no_grad(), ShapeRules():
            _call(twin, x)

    def _observed(self, forward, original: nn.Module):
        running, record = self.running, self.record

        def observed(*args, **kwargs):
            running.append(original)
            output = forward(*args, **kwargs)
            record(original, args, output)
            return output

        return observed


#: The ways :func:`trace` can run the forward pass.
TRACE_METHODS = ("auto", "meta", "real")


def _forward_error(rec: _Recorder, exc: Exception) -> ForwardError:
    return ForwardError(
        f"the forward pass failed in module {rec.failed_in()} ({type(exc).__name__}: "
        f"{exc}). Check that input has the shape, dtype and device the model expects"
    )


def trace(
    model: nn.Module, input, registry: LayerSelection | None = None, method: str = "auto"
) -> Trace:
    """Run ``model(input)`` once and record every registered layer's input and output shape.

    The pass runs under ``torch.no_grad()`` in eval mode, either on the model itself
    (``method='real'``) or on a copy whose tensors live on the meta device (``'meta'``:
    shapes without arithmetic; see :mod:`foresight_sparse.metatwin`). ``'auto'`` runs the
    meta pass, which costs a fraction of a real one, and the real pass where the meta pass
    fails (models whose forward pass reads values, or keeps real tensors outside its
    parameters and buffers). Both give the same shapes.
    Every module's train/eval mode is restored and every hook removed afterwards, also when
    the forward pass fails. A tensor
    ``input`` is moved to the model's device and cast to its floating dtype first, integer
    and boolean ones included (only shapes matter; models with an embedding keep integer
    inputs); a tuple is unpacked into positional arguments and a dict into keyword
    arguments, their floating tensors moved and cast likewise.

    A module called more than once (shared weights) is one layer, listed where it was first
    called, with the shapes of its last call, as in the old module; a warning says so when
    the calls saw different shapes.

    Raises
    ------
    ForwardError
        When the forward pass raises; the message names the innermost module that was
        running (the one whose own code raised), with its type.
    NoSupportedLayersError
        When no module of a registered type ran.
    """
    registry = LayerSelection() if registry is None else registry
    if method not in TRACE_METHODS:
        raise UnknownNameError(
            f"unknown trace method {method!r}; valid methods are {', '.join(TRACE_METHODS)}",
            param="method",
        )
    model = _unwrap(model)
    names = _names(model)
    x = _adapt_input(model, input)
    rec = None
    twin = meta_twin(model) if method != "real" else None
    if twin is None and method == "meta":
        raise ForwardError(
            f"{type(model).__name__} cannot be copied to the meta device (a scripted "
            "module, or one whose attributes cannot be copied); use the real forward pass (",
            Opt("method", "real", "auto"),
            ")",
        )
    if twin is not None:
        rec = _Recorder(registry, names, twin[1])
        try:
            rec.run_twin(twin[0], to_meta(x))
        except Exception as exc:  # data-dependent or meta-unfriendly models: real pass
            if method == "meta":
                raise ForwardError(
                    f"the meta-device forward pass failed in module "
                    f"{rec.failed_in()} ({type(exc).__name__}: {exc}); use "
                    "the real forward pass (",
                    Opt("method", "real", "auto"),
                    ")",
                ) from exc
            log.debug(
                "meta trace failed (%s: %s); running the real forward pass", type(exc).__name__, exc
            )
            rec = None
    if rec is None:
        rec = _Recorder(registry, names, {})
        try:
            rec.run_real(model, x)
        except Exception as exc:
            raise _forward_error(rec, exc) from exc
    shapes, seen_shapes, skipped = rec.shapes, rec.seen_shapes, rec.skipped

    layers = [
        TracedLayer(names.get(m, ""), m, *s, rec.before.get(m), rec.after.get(m))
        for m, s in shapes.items()
    ]
    for layer in layers:
        if len(seen_shapes[layer.module]) > 1:
            warn_caller(
                f"{layer.label} was called with several shapes "
                f"{sorted(seen_shapes[layer.module])}; it counts once, with the "
                "shapes of its last call"
            )
    if not layers:
        found = Counter(type(m).__name__ for m in skipped)
        raise NoSupportedLayersError(
            f"{type(model).__name__} has no layer of a supported type "
            f"({', '.join(sorted(t.__name__ for t in registry))}); its forward pass ran "
            f"{dict(found) or 'no leaf modules'}. Register a builder for your layer type "
            "with foresight_sparse.register"
        )
    skipped_list = [(names.get(m, ""), type(m).__name__) for m in skipped]
    return Trace(layers, skipped_list)


#: How the "skipped layers" warning tells an API user where to find the names.
SKIPPED_HINT = "foresight_sparse.plan(model, input).skipped lists them by name"


def warn_skipped(tr: Trace, refused: Mapping[type, type] | None = None) -> None:
    """One warning naming the skipped layers that carry connectivity (pools, norms, ...),
    pointing at the user's line whichever entry point led here, and one naming the
    subclasses of built-in layers that ``layers="all"`` skipped for their own forward pass
    (``refused``: subclass -> built-in type)."""
    refused = refused or {}
    if refused:
        what = ", ".join(f"{t.__name__} (a {b.__name__} subclass)" for t, b in refused.items())
        first = next(iter(refused)).__name__
        warn_caller(
            f"skipped {what}: it defines its own forward pass, which may transform "
            "its weight (standardisation, scaling, dynamic padding), so .weight is not "
            "read as its connectivity. If the forward pass computes with the weight as "
            f"stored, count it with foresight_sparse.register({first}, "
            "builder) (e.g. the built-in builder of its base type)"
        )
    own = {t.__name__ for t in refused} | {c.__name__ for c in _PASSIVE}
    counts = Counter(t for _, t in tr.skipped if t not in own)
    if counts:
        what = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        warn_caller(
            f"skipped layers with no connectivity builder: {what}. They do not "
            "count towards EI, as in the old module; ",
            SKIPPED_HINT,
        )


def get_shapes(model: nn.Module, input) -> dict[nn.Module, tuple[tuple, tuple]]:
    """``{module: (in_shape, out_shape)}`` for the supported modules of ``model``.

    The drop-in form of :func:`trace`: one forward pass with ``input``, modules in forward
    order.
    """
    return {layer.module: (layer.in_shape, layer.out_shape) for layer in trace(model, input).layers}


def _checked_shape(shape, where: str, what: str) -> tuple[int, ...]:
    """A shape from a ``shapes`` dict as a tuple of non-negative ints, or a precise error."""
    try:
        dims = shape_tuple(shape)
    except TypeError:
        dims = None
    if dims is None or any(d < 0 for d in dims):
        raise ShapeMismatchError(
            f"{where}: {what} must be a tuple of non-negative ints such as (1, 3, 32, 32), "
            f"got {shape!r}. Recompute the shapes with get_shapes(model, input)"
        )
    return dims


def layers_from_shapes(
    model: nn.Module, shapes: dict, registry: LayerSelection | None = None
) -> Trace:
    """Turn a ``shapes`` dict (as :func:`get_shapes` returns) into a :class:`Trace`.

    Every in/out shape must be a sequence of non-negative ints (a ``torch.Size``, tuple or
    list); they are checked here, before any layer is built, and then against the layer by
    its builder.

    Raises
    ------
    OptionError
        When ``shapes`` is not a mapping (a ``TypeError``).
    ShapeMismatchError
        When ``shapes`` names a module that is not part of ``model``, or a value is not a
        pair of valid shapes.
    NoSupportedLayersError
        When ``shapes`` holds no supported module.
    """
    registry = LayerSelection() if registry is None else registry
    model = _unwrap(model)
    names = _names(model)
    if not isinstance(shapes, Mapping):
        raise OptionError(
            Opt("shapes"),
            " must be a dict {module: (in_shape, out_shape)} as "
            f"get_shapes(model, input) returns, not {type(shapes).__name__}",
        )
    layers = []
    for module, value in shapes.items():
        if not isinstance(module, nn.Module):
            raise ShapeMismatchError(
                Opt("shapes"),
                f" is keyed by modules of the model, got the key {module!r}; build it "
                "with get_shapes(model, input)",
            )
        if module not in names:
            raise ShapeMismatchError(
                Opt("shapes"),
                f" holds a {type(module).__name__} that is not part of "
                f"{type(model).__name__}; were the shapes traced from another model? "
                "Recompute them with get_shapes(model, input)",
            )
        try:
            in_shape, out_shape = value
        except (TypeError, ValueError):
            raise ShapeMismatchError(
                Opt("shapes"), f"[{names[module]!r}] must be (in_shape, out_shape), got {value!r}"
            ) from None
        where = f"shapes[{names[module]!r}] ({type(module).__name__})"
        in_shape = _checked_shape(in_shape, where, "in_shape")
        out_shape = _checked_shape(out_shape, where, "out_shape")
        if type(module) in registry:
            layers.append(TracedLayer(names[module], module, in_shape, out_shape))
    if not layers:
        raise NoSupportedLayersError(
            Opt("shapes"), f" holds no module of a supported type for {type(model).__name__}"
        )
    return Trace(layers)


def resolve_layers(
    model: nn.Module,
    input=None,
    shapes=None,
    method: str = "auto",
    layers: LayerSelection | None = None,
) -> Trace:
    """The layers to analyse: from ``shapes`` if given, else traced with ``input``; the
    types that count are ``layers``' (the old module's by default)."""
    if shapes is not None:
        return layers_from_shapes(model, shapes, layers)
    if input is None:
        raise MissingInputError(
            f"cannot find the layers of {type(model).__name__}: pass ",
            Opt("input"),
            " (an example batch, e.g. torch.zeros(1, 3, 224, 224)) or ",
            Opt("shapes"),
            " (from get_shapes)",
        )
    return trace(model, input, layers, method=method)

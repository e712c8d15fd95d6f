"""Find a model's layers and their input/output shapes with one hooked forward pass."""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .connectivity import LayerSelection
from .exceptions import (
    ForwardError,
    MissingInputError,
    NoSupportedLayersError,
    ShapeMismatchError,
    UnknownNameError,
    warn_caller,
)
from .geometry import shape_tuple

__all__ = ["TracedLayer", "Trace", "trace", "get_shapes", "layers_from_shapes"]

log = logging.getLogger("foresight_sparse")

#: Stock modules that map every element alone (the output has the input's shape): on the
#: meta twin they return their input, skipping PyTorch's Python reference code, which is
#: slow on meta tensors (hardswish, for one).
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)

#: Leaf modules that act elementwise or only reshape: skipping them loses no connectivity
#: the old module would have counted, so they are listed in reports but not warned about.
_PASSIVE = (*_ELEMENTWISE, nn.PReLU, nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax)


@dataclass
class TracedLayer:
    """A supported layer found in a forward pass: its qualified name, module and shapes."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

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
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
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


def _to_meta(obj):
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device="meta")
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def _meta_twin(model: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """A copy of ``model`` whose tensors live on the meta device, and a twin -> original map.

    A forward pass of the twin computes shapes without arithmetic and costs milliseconds
    where the real pass of a large CNN costs seconds. ``None`` when the model cannot be
    copied this way.
    """
    try:
        twin = _shallow_twin(model, {})
    except Exception as exc:  # modules that cannot be copied: use the real pass
        log.debug("no meta twin (%s: %s)", type(exc).__name__, exc)
        return None
    originals = list(model.modules())
    twins = list(twin.modules())
    if len(originals) != len(twins):  # pragma: no cover - deepcopy keeps the tree
        return None
    for module in twins:
        if type(module).forward is _BatchNorm.forward:
            module.forward = _shape_only_batchnorm(module)
        elif type(module) in _ELEMENTWISE and type(module).forward in _ELEMENTWISE_FORWARDS:
            module.forward = _identity
    return twin, dict(zip(twins, originals))


_ELEMENTWISE_FORWARDS = {c.forward for c in _ELEMENTWISE}


def _identity(x, *args, **kwargs):
    return x


def _shallow_twin(module: nn.Module, memo: dict) -> nn.Module:
    """A copy of ``module`` sharing every attribute except its parameters and buffers (on
    the meta device), its submodules (twins themselves) and its dicts (hooks among them,
    so that hooks on the twin never reach the original). Far cheaper than a deep copy; an
    attribute that holds a real tensor outside the parameters and buffers makes the meta
    pass fail, and the real pass runs instead."""
    twin = memo.get(id(module))
    if twin is not None:  # a shared submodule has one twin
        return twin
    twin = memo[id(module)] = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, dict):
            twin.__dict__[key] = (
                type(value)(value) if type(value) in (dict, OrderedDict) else copy.copy(value)
            )
    twin._parameters = {
        k: None if v is None else _meta_like(v, memo) for k, v in module._parameters.items()
    }
    twin._buffers = {
        k: None if v is None else _meta_like(v, memo) for k, v in module._buffers.items()
    }
    twin._modules = {
        k: None if v is None else _shallow_twin(v, memo) for k, v in module._modules.items()
    }
    return twin


def _meta_like(t: torch.Tensor, memo: dict) -> torch.Tensor:
    out = memo.get(id(t))
    if out is None:
        out = memo[id(t)] = torch.empty_like(t, device="meta")
    return out


def _shape_only_batchnorm(module: _BatchNorm):
    """A stock batch norm's forward on the meta twin: checks the input as the real one
    does and returns it (the output has the input's shape). PyTorch evaluates batch norm
    on meta tensors through Python reference code, slowly: batch norms would be most of a
    ResNet-50 trace."""

    def forward(x):
        module._check_input_dim(x)
        if x.dim() < 2 or x.shape[1] != module.num_features:
            raise RuntimeError(
                f"{type(module).__name__}({module.num_features}) got an input "
                f"of shape {tuple(x.shape)}: expected {module.num_features} "
                "channels in dimension 1"
            )
        return x

    return forward


#: Multiply-adds a second that :func:`_predicted_seconds` assumes a CPU does (float32, a
#: few cores; an underestimate only stops a real pass that would have been slow anyway).
_CPU_MACS_PER_SECOND = 2e10


def _predicted_seconds(module: nn.Module, args) -> float:
    """A rough time a convolution or Linear layer will take on ``args``, before it runs."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or x.device.type != "cpu":
        return 0.0
    if isinstance(module, nn.Linear):
        macs = x.numel() * module.out_features
    elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        w = module.weight
        macs = x.numel() * w.shape[0] * w[0].numel() / max(module.in_channels, 1)
        for s in module.stride:
            macs /= s
    else:
        return 0.0
    return macs / _CPU_MACS_PER_SECOND


class _TooSlow(Exception):
    """Raised by a hook to stop a real pass that has run longer than its deadline."""


class _Recorder:
    """Forward hooks that record shapes, skipped leaves and the last module entered.

    ``twins`` maps the modules the pass runs on to the model's own modules (for a meta
    twin); modules missing from it are the model's own.
    """

    def __init__(self, registry, names, twins, deadline: float | None = None):
        self.registry = registry
        self.deadline = deadline  # seconds the pass may take before it stops (_TooSlow)
        self.stop_at = None
        self.names = names
        self.twins = twins
        self.shapes: dict[nn.Module, tuple] = {}
        self.seen_shapes: dict[nn.Module, set] = {}
        self.skipped: dict[nn.Module, None] = {}
        # modules entered and not yet returned from: after a failure, the innermost one
        # (the last) is the module whose own code raised
        self.running: list[nn.Module] = []

    def pre_hook(self, module, args):
        if (
            self.stop_at is not None
            and time.perf_counter() + _predicted_seconds(module, args) > self.stop_at
        ):
            raise _TooSlow
        self.running.append(self.twins.get(module, module))

    def failed_in(self) -> str:
        """How a ForwardError names the module that raised: ``'features.3' (Conv2d)``."""
        if not self.running:
            return "(before the first module)"
        module = self.running[-1]
        name = self.names.get(module, "")
        if not name:  # the model's own forward, outside any submodule
            return f"{type(module).__name__} (the top-level module)"
        return f"{name!r} ({type(module).__name__})"

    def hook(self, module, args, output):
        module = self.twins.get(module, module)
        if self.running and self.running[-1] is module:
            self.running.pop()
        if type(module) in self.registry:
            in_shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.shapes[module] = (in_shape, tuple(out.shape))
            self.seen_shapes.setdefault(module, set()).add(self.shapes[module])
        elif not any(True for _ in module.children()):
            self.skipped.setdefault(module)

    def run(self, model: nn.Module, x) -> None:
        handles = []
        try:
            for mod in model.modules():
                handles.append(mod.register_forward_pre_hook(self.pre_hook))
                handles.append(mod.register_forward_hook(self.hook))
            model.eval()
            if self.deadline is not None:
                self.stop_at = time.perf_counter() + self.deadline
            with torch.no_grad():
                _call(model, x)
        finally:
            for h in handles:
                h.remove()


#: The ways :func:`trace` can run the forward pass.
TRACE_METHODS = ("auto", "meta", "real")


def _forward_error(rec: _Recorder, exc: Exception) -> ForwardError:
    return ForwardError(
        f"the forward pass failed in module {rec.failed_in()} ({type(exc).__name__}: "
        f"{exc}). Check that input has the shape, dtype and device the model expects"
    )


def _meta_seconds(model: nn.Module) -> float:
    """About how long the meta pass of ``model`` takes, in seconds: a cost per leaf module
    that runs PyTorch's reference code on meta tensors (batch norms and elementwise modules
    return their input there) and a tenth of it per module for the copy, fitted to
    torchvision models."""
    modules = list(model.modules())
    slow = sum(
        1
        for m in modules
        if not m._modules and not isinstance(m, _BatchNorm) and type(m) not in _ELEMENTWISE
    )
    return 3e-4 * slow + 3e-5 * len(modules)


def trace(
    model: nn.Module, input, registry: LayerSelection | None = None, method: str = "auto"
) -> Trace:
    """Run ``model(input)`` once and record every registered layer's input and output shape.

    The pass runs under ``torch.no_grad()`` in eval mode, either on the model itself
    (``method='real'``) or on a copy whose tensors live on the meta device (``'meta'``:
    shapes without arithmetic, but each operation runs through PyTorch's Python reference
    code). ``'auto'`` runs the real pass and, before a module would take it past the time
    the meta pass needs (estimated from the modules), stops it and runs the meta pass;
    where the meta pass fails (data-dependent models), the real one runs to the end. Both
    give the same shapes.
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
    model = _unwrap(model)
    names = _names(model)
    modes = {m: m.training for m in model.modules()}
    x = _adapt_input(model, input)
    if method not in TRACE_METHODS:
        raise UnknownNameError(
            f"unknown trace method {method!r}; valid methods are {', '.join(TRACE_METHODS)}"
        )
    rec = None
    if method == "auto":
        # The real pass, unless it turns out slower than the meta pass would be: then it
        # stops at the next module and the meta pass runs instead.
        rec = _Recorder(registry, names, {}, deadline=_meta_seconds(model))
        try:
            rec.run(model, x)
        except _TooSlow:
            rec = None
        except Exception as exc:
            raise _forward_error(rec, exc) from exc
        finally:
            for m, mode in modes.items():
                m.training = mode
    twin = _meta_twin(model) if method != "real" and rec is None else None
    if twin is not None:
        rec = _Recorder(registry, names, twin[1])
        try:
            rec.run(twin[0], _to_meta(x))
        except Exception as exc:  # data-dependent or meta-unfriendly models: real pass
            if method == "meta":
                raise ForwardError(
                    f"the meta-device forward pass failed in module "
                    f"{rec.failed_in()} ({type(exc).__name__}: {exc}); use "
                    "the real forward pass (method='real' or 'auto')"
                ) from exc
            log.debug(
                "meta trace failed (%s: %s); running the real forward pass", type(exc).__name__, exc
            )
            rec = None
    if rec is None:
        rec = _Recorder(registry, names, {})
        try:
            rec.run(model, x)
        except Exception as exc:
            raise _forward_error(rec, exc) from exc
        finally:
            for m, mode in modes.items():
                m.training = mode
    shapes, seen_shapes, skipped = rec.shapes, rec.seen_shapes, rec.skipped

    layers = [TracedLayer(names.get(m, ""), m, *s) for m, s in shapes.items()]
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
            f"count towards EI, as in the old module; {SKIPPED_HINT}"
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
    TypeError
        When ``shapes`` is not a mapping.
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
        raise TypeError(
            f"shapes must be a dict {{module: (in_shape, out_shape)}} as "
            f"get_shapes(model, input) returns, not {type(shapes).__name__}"
        )
    layers = []
    for module, value in shapes.items():
        if not isinstance(module, nn.Module):
            raise ShapeMismatchError(
                f"shapes is keyed by modules of the model, got the key {module!r}; build it "
                "with get_shapes(model, input)"
            )
        if module not in names:
            raise ShapeMismatchError(
                f"shapes holds a {type(module).__name__} that is not part of "
                f"{type(model).__name__}; were the shapes traced from another model? "
                "Recompute them with get_shapes(model, input)"
            )
        try:
            in_shape, out_shape = value
        except (TypeError, ValueError):
            raise ShapeMismatchError(
                f"shapes[{names[module]!r}] must be (in_shape, out_shape), got {value!r}"
            ) from None
        where = f"shapes[{names[module]!r}] ({type(module).__name__})"
        in_shape = _checked_shape(in_shape, where, "in_shape")
        out_shape = _checked_shape(out_shape, where, "out_shape")
        if type(module) in registry:
            layers.append(TracedLayer(names[module], module, in_shape, out_shape))
    if not layers:
        raise NoSupportedLayersError(
            f"shapes holds no module of a supported type for {type(model).__name__}"
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
            f"cannot find the layers of {type(model).__name__}: pass input (an example "
            "batch, e.g. torch.zeros(1, 3, 224, 224)) or shapes (from get_shapes)"
        )
    return trace(model, input, layers, method=method)

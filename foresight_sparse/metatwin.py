"""The meta-device twin of a model: shapes from a forward pass without arithmetic.

A trace needs every layer's input and output shape, not its values. The twin is a shallow
copy of the model whose parameters and buffers live on the meta device, so its forward pass
allocates nothing and computes nothing. PyTorch evaluates many operations on meta tensors
through Python reference code, which is slower than the real operation on small inputs
(an addition of two 64x56x56 maps takes about 0.2 ms, a layer norm 1.4 ms, a hardswish
2.5 ms); so the pass runs under :class:`ShapeRules`, which answers the common operations
(convolutions, Linear, elementwise arithmetic and activations, the norms, concatenation,
adaptive average pooling, multi-head attention) from their shape rules in a few
microseconds. A rule answers only the calls it fully understands and hands every other
call, and every call it would have to refuse, to PyTorch, so errors are PyTorch's own and a
shape is never guessed.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

__all__ = ["ELEMENTWISE", "ShapeRules", "meta_twin", "to_meta"]

log = logging.getLogger("foresight_sparse")

#: Stock modules that map every element alone (the output has the input's shape): on the
#: twin they return their input.
ELEMENTWISE = (
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

_ELEMENTWISE_FORWARDS = {c.forward for c in ELEMENTWISE}

_META = torch.device("meta")


def to_meta(obj):
    """``obj`` with every tensor in it (nested in tuples, lists and dicts) replaced by an
    empty meta tensor of the same shape, dtype and strides."""
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device=_META)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_meta(v) for k, v in obj.items()}
    return obj


def meta_twin(model: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """A copy of ``model`` whose tensors live on the meta device, and a twin -> original map
    (``None`` when the model cannot be copied this way).

    Stock batch norms and elementwise modules of the twin return their input (after the
    batch norm's own checks): their shape rule is the identity.
    """
    originals: dict[nn.Module, nn.Module] = {}
    try:
        twin = _shallow_twin(model, {}, originals)
        for module in originals:
            cls = type(module)
            if cls.forward is _BatchNorm.forward:
                module.__dict__["forward"] = _shape_only_batchnorm(module)
            elif cls in ELEMENTWISE and cls.forward in _ELEMENTWISE_FORWARDS:
                module.__dict__["forward"] = _identity
    except Exception as exc:  # modules that cannot be copied (scripted ones): the real pass
        log.debug("no meta twin (%s: %s)", type(exc).__name__, exc)
        return None
    return twin, originals


_DICTS = (dict, OrderedDict)


def _shallow_twin(module: nn.Module, memo: dict, originals: dict) -> nn.Module:
    """A copy of ``module`` sharing every attribute except its parameters and buffers (on
    the meta device), its submodules (twins themselves) and its dicts (hooks among them, so
    that nothing done to the twin reaches the original). ``memo`` maps the ids of what was
    copied to the copies; ``originals`` gains twin -> module. An attribute that holds a real
    tensor outside the parameters and buffers makes an operation of the meta pass fail, and
    the caller runs the real pass instead."""
    twin = memo.get(id(module))
    if twin is not None:  # a shared submodule has one twin
        return twin
    twin = object.__new__(type(module))
    memo[id(module)] = twin
    originals[twin] = module
    state = module.__dict__.copy()
    for key, value in state.items():
        if type(value) in _DICTS:
            state[key] = value.copy()
        elif isinstance(value, dict):
            state[key] = copy.copy(value)
    state["_parameters"] = {
        k: None if v is None else _meta_like(v, memo) for k, v in module._parameters.items()
    }
    state["_buffers"] = {
        k: None if v is None else _meta_like(v, memo) for k, v in module._buffers.items()
    }
    state["_modules"] = {
        k: None if v is None else _shallow_twin(v, memo, originals)
        for k, v in module._modules.items()
    }
    object.__setattr__(twin, "__dict__", state)
    return twin


def _meta_like(t: torch.Tensor, memo: dict) -> torch.Tensor:
    out = memo.get(id(t))
    if out is None:
        out = memo[id(t)] = torch.empty_like(t, device=_META)
    return out


def _identity(x, *args, **kwargs):
    return x


def _shape_only_batchnorm(module: _BatchNorm):
    """A stock batch norm's forward on the twin: checks the input as the real one does and
    returns it (the output has the input's shape)."""

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


# ---------------------------------------------------------------------------- shape rules
#
# Each rule takes the function's own arguments and returns the result's meta tensor, or
# NotImplemented to let PyTorch run the call (anything unusual, and everything PyTorch would
# refuse). A rule's output aliases an input where the result has that input's shape and
# dtype: meta tensors hold no data, and the alias keeps the input's strides, as the real
# elementwise operation does.

_NUMBER = (bool, int, float)


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _is_meta(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


def _same_shape_floating(x, *args, **kwargs):
    """Activations, dropout, roll, exp, normalize: a floating input's shape and dtype."""
    if not _is_meta(x) or not x.is_floating_point() or kwargs.get("out") is not None:
        return NotImplemented
    if kwargs.get("dtype") is not None:
        return NotImplemented
    return x


def _softmax(input, dim=None, _stacklevel=3, dtype=None):
    return NotImplemented if dtype is not None else _same_shape_floating(input)


def _clamp(x, min=None, max=None, *, out=None):
    if out is not None or isinstance(min, torch.Tensor) or isinstance(max, torch.Tensor):
        return NotImplemented
    if min is None and max is None:
        return NotImplemented  # PyTorch refuses it
    return _same_shape_floating(x)


def _masked_fill(x, mask, value):
    if not _is_meta(x, mask) or mask.dtype != torch.bool or isinstance(value, torch.Tensor):
        return NotImplemented
    return x if _broadcast(mask.shape, x.shape) == x.shape else NotImplemented


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size | None:
    """The broadcast shape of ``a`` and ``b`` (None when they do not broadcast)."""
    if a == b:
        return a
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + tuple(b)
    out = []
    for m, n in zip(a, b):
        if m != n and m != 1 and n != 1:
            return None
        out.append(n if m == 1 else m)
    return torch.Size(out)


def _binary(a, b, *, alpha=None, rounding_mode=None, out=None):
    """add, sub, mul, div: the broadcast shape and the promoted dtype."""
    if out is not None or rounding_mode is not None or not _is_meta(a):
        return NotImplemented
    if isinstance(b, torch.Tensor):
        if b.device.type != "meta":
            return NotImplemented
        shape = _broadcast(a.shape, b.shape)
        if shape is None:
            return NotImplemented
    elif type(b) in _NUMBER:
        shape = a.shape
    else:
        return NotImplemented
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        return NotImplemented  # integer division and friends: PyTorch's rules
    if a.shape == shape and a.dtype == dtype:
        return a
    if isinstance(b, torch.Tensor) and b.shape == shape and b.dtype == dtype:
        return b
    return torch.empty(shape, dtype=dtype, device=_META)


def _binary_inplace(a, b, *, alpha=None, rounding_mode=None):
    out = _binary(a, b, alpha=alpha, rounding_mode=rounding_mode)
    if out is NotImplemented or out.shape != a.shape or out.dtype != a.dtype:
        return NotImplemented
    return a


def _int_tuple(value, n: int) -> tuple[int, ...] | None:
    if type(value) is int:
        return (value,) * n
    if isinstance(value, Sequence) and len(value) == n and all(type(v) is int for v in value):
        return tuple(value)
    return None


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv1d/2d/3d with a batched input: PyTorch's output-size rule."""
    if not _is_meta(input, weight) or input.dtype != weight.dtype or type(groups) is not int:
        return NotImplemented
    n = weight.dim() - 2
    if n < 1 or input.dim() != n + 2 or groups < 1:
        return NotImplemented
    cout, cin_group, *kernel = weight.shape
    if input.shape[1] != cin_group * groups or cout % groups or input.shape[0] == 0:
        return NotImplemented
    if bias is not None and (not _is_meta(bias) or tuple(bias.shape) != (cout,)):
        return NotImplemented
    stride, dilation = _int_tuple(stride, n), _int_tuple(dilation, n)
    if stride is None or dilation is None or min(stride) < 1 or min(dilation) < 1:
        return NotImplemented
    sizes = input.shape[2:]
    if padding == "same":
        if any(s != 1 for s in stride):
            return NotImplemented
        out = tuple(sizes)
        if any(d * (k - 1) + 1 > s for s, k, d in zip(sizes, kernel, dilation)):
            out = None  # left to PyTorch, which pads
    elif padding == "valid":
        out = tuple(
            (s - d * (k - 1) - 1) // st + 1 for s, k, d, st in zip(sizes, kernel, dilation, stride)
        )
    else:
        pad = _int_tuple(padding, n)
        if pad is None or min(pad) < 0:
            return NotImplemented
        out = tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, k, d, st, p in zip(sizes, kernel, dilation, stride, pad)
        )
    if out is None or min(out) < 1:
        return NotImplemented
    return torch.empty((input.shape[0], cout, *out), dtype=input.dtype, device=_META)


def _linear(input, weight, bias=None):
    if not _is_meta(input, weight) or weight.dim() != 2 or input.dim() < 1:
        return NotImplemented
    if input.dtype != weight.dtype or input.shape[-1] != weight.shape[1]:
        return NotImplemented
    if bias is not None and (not _is_meta(bias) or tuple(bias.shape) != (weight.shape[0],)):
        return NotImplemented
    return torch.empty((*input.shape[:-1], weight.shape[0]), dtype=input.dtype, device=_META)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if not _is_meta(input) or not input.is_floating_point():
        return NotImplemented
    if not isinstance(normalized_shape, (tuple, list)):
        return NotImplemented  # an int is refused by the functional form
    shape = tuple(normalized_shape)
    if not shape or tuple(input.shape[-len(shape) :]) != shape or input.dim() < len(shape):
        return NotImplemented
    for t in (weight, bias):
        if t is not None and (not _is_meta(t) or tuple(t.shape) != shape):
            return NotImplemented
    # the real layer norm returns a contiguous tensor
    return torch.empty(input.shape, dtype=input.dtype, device=_META)


def _channels_ok(input, channels: int, *tensors) -> bool:
    return all(t is None or (_is_meta(t) and tuple(t.shape) == (channels,)) for t in tensors)


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    if training or not _is_meta(input) or not input.is_floating_point() or input.dim() < 2:
        return NotImplemented
    if running_mean is None or running_var is None:  # refused in evaluation mode
        return NotImplemented
    if not _channels_ok(input, input.shape[1], running_mean, running_var, weight, bias):
        return NotImplemented
    return input


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    if not _is_meta(input) or not input.is_floating_point() or input.dim() < 2:
        return NotImplemented
    channels = input.shape[1]
    if type(num_groups) is not int or num_groups < 1 or channels % num_groups:
        return NotImplemented
    if not _channels_ok(input, channels, weight, bias):
        return NotImplemented
    return input


def _adaptive_avg_pool2d(input, output_size):
    if not _is_meta(input) or input.dim() not in (3, 4) or min(input.shape[-2:]) < 1:
        return NotImplemented
    if type(output_size) is int:
        out = (output_size, output_size)
    elif isinstance(output_size, Sequence) and len(output_size) == 2:
        out = tuple(s if o is None else o for s, o in zip(input.shape[-2:], output_size))
    else:
        return NotImplemented
    if not all(type(o) is int and o >= 0 for o in out):
        return NotImplemented
    return _empty((*input.shape[:-2], *out), input)


def _cat(tensors, dim=0, *, out=None):
    if out is not None or not isinstance(tensors, (tuple, list)) or not tensors:
        return NotImplemented
    first = tensors[0]
    if not _is_meta(*tensors) or type(dim) is not int:
        return NotImplemented
    ndim = first.dim()
    if ndim == 0 or not -ndim <= dim < ndim:
        return NotImplemented
    dim %= ndim
    total = 0
    for t in tensors:
        if t.dim() != ndim or t.dtype != first.dtype:
            return NotImplemented  # PyTorch's rules for legacy empty tensors and promotion
        if t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1 :] != first.shape[dim + 1 :]:
            return NotImplemented
        total += t.shape[dim]
    return _empty((*first.shape[:dim], total, *first.shape[dim + 1 :]), first)


def _attention(
    query,
    key,
    value,
    embed_dim_to_check,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    bias_k,
    bias_v,
    add_zero_attn,
    dropout_p,
    out_proj_weight,
    out_proj_bias,
    training=True,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    use_separate_proj_weight=False,
    q_proj_weight=None,
    k_proj_weight=None,
    v_proj_weight=None,
    static_k=None,
    static_v=None,
    average_attn_weights=True,
    is_causal=False,
):
    """``F.multi_head_attention_forward`` in its plain form (packed input projection, no
    masks, extra biases or static keys, batched ``(L, N, E)`` inputs): ``(L, N, E)`` and
    the ``(N, L, S)`` (or per-head ``(N, H, L, S)``) weights when asked for."""
    extras = (bias_k, bias_v, key_padding_mask, attn_mask, static_k, static_v)
    if add_zero_attn or use_separate_proj_weight or is_causal or any(t is not None for t in extras):
        return NotImplemented
    if not _is_meta(query, key, value, in_proj_weight, out_proj_weight):
        return NotImplemented
    if query.dim() != 3 or key.shape != value.shape or key.dim() != 3:
        return NotImplemented
    length, batch, embed = query.shape
    source = key.shape[0]
    if (
        type(num_heads) is not int
        or num_heads < 1
        or embed != embed_dim_to_check
        or embed % num_heads
        or key.shape[1:] != (batch, embed)
        or tuple(in_proj_weight.shape) != (3 * embed, embed)
        or tuple(out_proj_weight.shape) != (embed, embed)
        or query.dtype != in_proj_weight.dtype
    ):
        return NotImplemented
    for bias, size in ((in_proj_bias, 3 * embed), (out_proj_bias, embed)):
        if bias is not None and (not _is_meta(bias) or tuple(bias.shape) != (size,)):
            return NotImplemented
    out = torch.empty((length, batch, embed), dtype=query.dtype, device=_META)
    if not need_weights:
        return out, None
    heads = () if average_attn_weights else (num_heads,)
    return out, torch.empty((batch, *heads, length, source), dtype=query.dtype, device=_META)


def _rules() -> dict[Callable, Callable]:
    rules: dict[Callable, Callable] = {}
    unary = [
        F.relu,
        F.relu6,
        F.hardtanh,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.leaky_relu,
        F.elu,
        F.selu,
        F.celu,
        F.softplus,
        F.sigmoid,
        F.tanh,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.normalize,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.roll,
        torch.Tensor.relu,
        torch.Tensor.sigmoid,
        torch.Tensor.tanh,
        torch.Tensor.exp,
        torch.Tensor.roll,
    ]
    for f in unary:
        rules[f] = _same_shape_floating
    rules[F.softmax] = rules[F.log_softmax] = _softmax
    for f in (torch.clamp, torch.Tensor.clamp):
        rules[f] = _clamp
    rules[torch.Tensor.masked_fill] = _masked_fill
    for name in ("add", "sub", "mul", "div"):
        rules[getattr(torch, name)] = _binary
        rules[getattr(torch.Tensor, name)] = _binary
        rules[getattr(torch.Tensor, name + "_")] = _binary_inplace
    for f in (torch.conv1d, torch.conv2d, torch.conv3d):
        rules[f] = _conv
    rules[F.linear] = _linear
    rules[F.layer_norm] = _layer_norm
    rules[F.batch_norm] = _batch_norm
    rules[F.group_norm] = _group_norm
    rules[F.adaptive_avg_pool2d] = _adaptive_avg_pool2d
    rules[torch.cat] = _cat
    rules[F.multi_head_attention_forward] = _attention
    return rules


_RULES = _rules()


class ShapeRules(TorchFunctionMode):
    """While active, the operations with a shape rule return meta tensors of the right
    shape without running PyTorch's meta implementation; every other call runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            try:
                out = rule(*args, **kwargs)
            except TypeError:  # a signature the rule does not take: PyTorch decides
                out = NotImplemented
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)

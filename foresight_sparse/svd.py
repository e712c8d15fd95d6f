"""SVD causal emergence: the dynamical reversibility of each layer's transition matrix.

Zhang, Tao, Liu, Yuan and Yang, "Dynamical reversibility and a new theory of causal
emergence based on SVD", npj Complexity 2 (2025). A layer's transition matrix is the
row-normalised connectivity ``P`` the EI measure uses (``n_rows`` inputs, the states; each row
a distribution over the ``n_cols`` outputs). With its singular values
``sigma_1 >= sigma_2 >= ...``:

- ``Gamma_alpha = sum_i sigma_i ** alpha`` (``0 < alpha < 2``), the approximate dynamical
  reversibility;
- ``gamma = Gamma_alpha / N`` with ``N = n_rows``, the normalised reversibility;
- ``r_eps``, the number of ``sigma_i > eps``, and
  ``Delta Gamma = Gamma_alpha(r_eps) / r_eps - Gamma_alpha / N``, the (vague) causal
  emergence, ``Gamma_alpha(r_eps)`` the sum over the ``r_eps`` largest (0 when ``r_eps = 0``).

Three methods compute them (see :func:`layer_spectrum` and the SVD page of the docs):

- ``'dense'``: ``torch.linalg.svdvals`` of the dense float64 ``P``: exact to float64 rounding;
- ``'gram'``: ``eigvalsh`` of the float64 Gram matrix of the smaller side (``P^T P`` or
  ``P P^T``), formed from streamed blocks or sparse products: exact up to the Gram matrix's
  rounding, which loses small singular values below about ``sqrt(u) * sigma_max``;
- ``'slq'``: stochastic Lanczos quadrature with a matrix-free operator (convolutions of the
  layer's geometry): an unbiased Monte-Carlo estimate of every trace with its standard error,
  plus a quadrature bias that is small but not controlled by the standard error.

:class:`Reversibility` is the :class:`~foresight_sparse.measures.Measure` (``"svd"``) that a
plan evaluates layer by layer; the network's matrix is block-diagonal in the layers, so its
singular values are the union of theirs (:func:`combine`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .budget import check_budget, format_bytes, resolve_budget
from .connectivity import Connectivity, FullyConnected, connectivity
from .engines import layer_shift
from .exceptions import MemoryBudgetError, Opt, OptionError, UnknownNameError, warn_caller
from .measures import Measure, MeasureLayer
from .norms import ElementwiseNorm, Norm, get_norm

__all__ = [
    "METHODS",
    "DEFAULT_EPS",
    "Spectrum",
    "Reversibility",
    "layer_spectrum",
    "gamma_alpha",
    "delta_gamma",
    "combine",
    "choose_method",
    "resolution",
    "TransitionOperator",
    "transition_operator",
]

logger = logging.getLogger("foresight_sparse")

#: The values ``method=`` accepts.
METHODS = ("auto", "dense", "gram", "slq")

#: Default threshold on singular values for ``r_eps`` (absolute; see :func:`layer_spectrum`).
DEFAULT_EPS = 1e-6

#: ``method='auto'`` takes a dense SVD up to this many singular values (and when the dense
#: matrix fits the budget), the Gram matrix up to :data:`GRAM_MAX`, SLQ beyond.
DENSE_MAX = 2048
#: The largest Gram matrix ``method='auto'`` eigen-decomposes (8192: 512 MiB, about a minute
#: of ``eigvalsh`` on two cores).
GRAM_MAX = 8192

_U64 = float(np.finfo(np.float64).eps)

#: SLQ stops on ``tol`` only after this many probes: a standard error from two or three
#: probes is itself too uncertain to stop on.
_MIN_PROBES = 4


# --------------------------------------------------------------------------- formulas


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise OptionError(
            Opt("alpha"), f" must be a number in (0, 2), not {type(alpha).__name__}"
        ) from None
    if not (0.0 < a < 2.0):
        raise OptionError(
            Opt("alpha", alpha),
            " is outside (0, 2); Gamma_alpha is defined for 0 < alpha < 2 "
            "(Zhang et al. 2025), alpha=1 (the nuclear norm) is the default",
        )
    return a


def _check_eps(eps: float) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise OptionError(
            Opt("eps"), f" must be a non-negative number, not {type(eps).__name__}"
        ) from None
    if not (math.isfinite(e) and e >= 0.0):
        raise OptionError(
            Opt("eps", eps),
            " must be a finite number >= 0 (the threshold on singular values "
            f"that defines r_eps; default {DEFAULT_EPS})",
        )
    return e


def gamma_alpha(singular_values, alpha: float = 1.0) -> float:
    """``Gamma_alpha = sum_i sigma_i ** alpha`` of the given singular values.

    Parameters
    ----------
    singular_values : array_like
        Non-negative singular values (any order); tiny negative values from rounding are
        clamped at 0.
    alpha : float, default 1.0
        In ``(0, 2)``.

    Returns
    -------
    float
    """
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    return Spectrum.from_singular_values(
        s, s.size, s.size, _check_alpha(alpha), 0.0, ""
    ).gamma_alpha


def delta_gamma(singular_values, alpha: float = 1.0, eps: float = DEFAULT_EPS, n=None) -> float:
    """The causal emergence ``Gamma_alpha(r_eps) / r_eps - Gamma_alpha / N``.

    Parameters
    ----------
    singular_values : array_like
        The matrix's singular values (any order).
    alpha : float, default 1.0
        In ``(0, 2)``.
    eps : float, default :data:`DEFAULT_EPS`
        ``r_eps`` counts the singular values ``> eps``; ``Gamma_alpha(r_eps)`` sums their
        ``alpha`` powers. With ``r_eps = 0`` the first term is 0.
    n : int, optional
        ``N``, the number of states (rows of ``P``); the number of singular values if
        omitted (a square matrix).

    Returns
    -------
    float
    """
    alpha, eps = _check_alpha(alpha), _check_eps(eps)
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    n = s.size if n is None else int(n)
    return Spectrum.from_singular_values(s, n, s.size, alpha, eps, "").delta_gamma


def _emergence(g_r: float, r: float, g: float, n: int) -> float:
    return (g_r / r if r > 0 else 0.0) - (g / n if n else 0.0)


# --------------------------------------------------------------------------- results


@dataclass
class Spectrum:
    """The SVD quantities of one layer (or, from :func:`combine`, of a network).

    Attributes
    ----------
    gamma_alpha : float
        ``Gamma_alpha``, the sum of ``sigma ** alpha``.
    gamma : float
        ``Gamma_alpha / n``.
    gamma_alpha_r : float
        ``Gamma_alpha(r_eps)``: the sum over the singular values ``> eps``.
    r_eps : float
        The number of singular values ``> eps`` (an integer for exact methods, an estimate
        for SLQ).
    delta_gamma : float
        ``gamma_alpha_r / r_eps - gamma`` (first term 0 when ``r_eps = 0``).
    n : int
        ``N``: rows of ``P`` (input neurons, the states).
    n_cols : int
        Columns of ``P`` (output neurons).
    alpha, eps : float
        The settings used.
    method : str
        ``'dense'``, ``'gram'`` or ``'slq'`` (for a network, the layers' methods joined by
        ``'+'``).
    sigma_max : float
        The largest singular value (SLQ: the largest Ritz value, a lower bound that Lanczos
        converges to first).
    gamma_alpha_stderr, gamma_alpha_r_stderr, r_eps_stderr, delta_gamma_stderr : float
        Standard errors of the SLQ estimates over the probes (0 for exact methods). They
        measure the Monte-Carlo error only, not the quadrature bias.
    probes, lanczos_steps : int
        SLQ's number of probe vectors and Lanczos steps (0 for exact methods).
    singular_values : numpy.ndarray or None
        All ``min(n, n_cols)`` singular values, descending, when an exact method computed
        them; None for SLQ and networks.
    """

    gamma_alpha: float
    gamma: float
    gamma_alpha_r: float
    r_eps: float
    delta_gamma: float
    n: int
    n_cols: int
    alpha: float
    eps: float
    method: str
    sigma_max: float
    gamma_alpha_stderr: float = 0.0
    gamma_alpha_r_stderr: float = 0.0
    r_eps_stderr: float = 0.0
    delta_gamma_stderr: float = 0.0
    probes: int = 0
    lanczos_steps: int = 0
    singular_values: np.ndarray | None = field(default=None, repr=False)

    @property
    def stderr(self) -> float:
        """The standard error of :attr:`gamma_alpha` (0 for exact methods)."""
        return self.gamma_alpha_stderr

    def as_dict(self) -> dict[str, Any]:
        """Every field but the singular values, as JSON-ready data."""
        d = asdict(self)
        d.pop("singular_values")
        return d

    @classmethod
    def from_singular_values(
        cls, s, n: int, n_cols: int, alpha: float, eps: float, method: str
    ) -> Spectrum:
        """The exact quantities of the singular values ``s`` of an ``n x n_cols`` matrix."""
        s = np.sort(np.clip(np.asarray(s, dtype=np.float64).ravel(), 0.0, None))[::-1]
        powers = s**alpha
        keep = s > eps
        g, g_r, r = float(powers.sum()), float(powers[keep].sum()), int(keep.sum())
        return cls.from_sums(
            g, g_r, r, n,
            n_cols=n_cols,
            alpha=alpha,
            eps=eps,
            method=method,
            sigma_max=float(s[0]) if s.size else 0.0,
            singular_values=np.ascontiguousarray(s),
        )  # fmt: skip

    @classmethod
    def from_sums(cls, g: float, g_r: float, r_eps, n: int, **fields) -> Spectrum:
        """The spectrum with ``Gamma_alpha = g``, ``Gamma_alpha(r_eps) = g_r``, ``r_eps``
        and ``N = n``; ``gamma`` and ``delta_gamma`` follow. ``fields`` are the others."""
        return cls(
            gamma_alpha=g,
            gamma=g / n if n else 0.0,
            gamma_alpha_r=g_r,
            r_eps=r_eps,
            delta_gamma=_emergence(g_r, r_eps, g, n),
            n=n,
            **fields,
        )


def combine(spectra: Sequence[Spectrum | dict]) -> Spectrum:
    """The spectrum of the block-diagonal matrix of several layers (a network).

    Its singular values are the union of the layers', so ``Gamma_alpha``,
    ``Gamma_alpha(r_eps)``, ``r_eps`` and ``N`` add over the layers (``eps`` is absolute, so
    each layer's count is the network's count restricted to that layer); ``gamma`` and
    ``delta_gamma`` follow from the sums. Standard errors add in quadrature (the layers'
    probes are independent).

    Parameters
    ----------
    spectra : sequence of Spectrum or dict
        The layers' spectra, or the dicts :meth:`Reversibility.layer` returns.
    """
    rows = [s.as_dict() if isinstance(s, Spectrum) else s for s in spectra]
    if not rows:
        raise OptionError("combine() needs at least one layer's spectrum", param="spectra")
    g = sum(float(r["gamma_alpha"]) for r in rows)
    g_r = sum(float(r["gamma_alpha_r"]) for r in rows)
    r_eps = sum(r["r_eps"] for r in rows)
    n = sum(int(r["n"]) for r in rows)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))

    def quad(key):
        return math.sqrt(sum(float(r.get(key) or 0.0) ** 2 for r in rows))

    # the delta-method error of the network's Delta Gamma, the layers independent:
    # d/dg_r = 1/r, d/dr = -g_r/r^2, d/dg = -1/n (layer-internal correlations neglected)
    d_err = 0.0
    if r_eps > 0:
        d_err = math.sqrt(
            (quad("gamma_alpha_r_stderr") / r_eps) ** 2
            + (g_r / r_eps**2 * quad("r_eps_stderr")) ** 2
            + (quad("gamma_alpha_stderr") / n) ** 2
        )
    first = rows[0]
    return Spectrum.from_sums(
        g,
        g_r,
        r_eps,
        n,
        n_cols=sum(int(r.get("n_cols", 0)) for r in rows),
        alpha=float(first.get("alpha", 1.0)),
        eps=float(first.get("eps", DEFAULT_EPS)),
        method="+".join(methods),
        sigma_max=max(float(r.get("sigma_max", 0.0)) for r in rows),
        gamma_alpha_stderr=quad("gamma_alpha_stderr"),
        gamma_alpha_r_stderr=quad("gamma_alpha_r_stderr"),
        r_eps_stderr=quad("r_eps_stderr"),
        delta_gamma_stderr=d_err,
        probes=max(int(r.get("probes", 0)) for r in rows),
        lanczos_steps=max(int(r.get("lanczos_steps", 0)) for r in rows),
    )


# --------------------------------------------------------------------------- operators


class TransitionOperator:
    """``P`` of one layer as a matrix-free operator on batches of vectors.

    With ``G = f(A) - c`` (zero at absent entries: a sparse or convolutional operator),
    ``Z = G 1 + c * n_cols`` and ``D^-1`` the diagonal of ``1 / Z`` (0 where ``Z = 0``)::

        P   v = D^-1 (G v + c * sum(v))
        P^T u = G^T (D^-1 u) + c * sum(D^-1 u)

    Parameters
    ----------
    n_rows, n_cols : int
        Shape of ``P``.
    g, gt : callable
        ``V (b, n_cols) -> G V^T`` as ``(b, n_rows)``, and ``U (b, n_rows) -> (b, n_cols)``.
    c : float
        The norm's value at absent entries (with its shift).
    normalizes : bool
        False for ``norm=None`` (``P = A``).
    dtype : torch.dtype
        The dtype of the vectors.
    device : torch.device
        Where the vectors live.
    kind : str
        What ``G`` is made of (``'conv'``, ``'pool'``, ``'linear'``, ``'sparse'``).
    """

    def __init__(self, n_rows, n_cols, g, gt, c, normalizes, dtype, device, kind):
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self._g, self._gt = g, gt
        self.c = float(c)
        self.dtype, self.device, self.kind = dtype, torch.device(device), kind
        self.dinv = None
        if normalizes:
            ones = torch.ones(1, self.n_cols, dtype=dtype, device=self.device)
            z = self._g(ones)[0].to(torch.float64) + self.c * self.n_cols
            dinv = torch.where(z > 0, 1.0 / torch.where(z > 0, z, 1.0), 0.0)
            self.dinv = dinv.to(dtype)

    @property
    def k(self) -> int:
        """The size of the Gram side: ``min(n_rows, n_cols)``."""
        return min(self.n_rows, self.n_cols)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for each row of ``v`` (``(b, n_cols) -> (b, n_rows)``)."""
        out = self._g(v)
        if self.c:
            out = out + self.c * v.sum(1, keepdim=True)
        return out * self.dinv if self.dinv is not None else out

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``P^T u`` for each row of ``u`` (``(b, n_rows) -> (b, n_cols)``)."""
        if self.dinv is not None:
            u = u * self.dinv
        out = self._gt(u)
        return out + self.c * u.sum(1, keepdim=True) if self.c else out

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """The smaller Gram matrix times ``x``: ``P^T P x`` when ``n_cols <= n_rows``, else
        ``P P^T x``; its eigenvalues are the squared singular values."""
        if self.n_cols <= self.n_rows:
            return self.rmatvec(self.matvec(x))
        return self.matvec(self.rmatvec(x))


def _norm_and_shift(norm, conn: Connectivity) -> tuple[Norm, float, float]:
    norm = get_norm(norm)
    if not isinstance(norm, ElementwiseNorm):
        return norm, 0.0, 0.0
    shift = layer_shift(norm, conn)
    return norm, shift, float(norm.zero(shift))


def transition_operator(
    conn: Connectivity,
    norm="lin",
    *,
    module: nn.Module | None = None,
    in_shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    max_memory: int | str | None = None,
) -> TransitionOperator:
    """The matrix-free ``P`` of a layer (see :class:`TransitionOperator`).

    Convolutions (1-3 d, zero padding, any stride, dilation, groups and padding), average
    pools (1-3 d) and Linear layers run the module's own geometry: ``G v`` is a transposed
    convolution (``convolution_backward``) of ``v`` with the kernel ``f(K) - c``, ``G^T u``
    a convolution; nothing of the matrix is stored. The operator is checked against the
    connectivity once (its number of stored entries must match ``conn.nnz``). Any other
    layer (or a convolution whose module is not given) uses ``conn.to_sparse('scipy')`` on
    the CPU, under the budget.

    Parameters
    ----------
    conn : Connectivity
        The layer's connectivity.
    norm : Norm, str or None
        An elementwise norm (``'lin'``, ``'soft'``, ``'sig'``, None).
    module : torch.nn.Module, optional
        The layer, for the matrix-free form; ``in_shape`` (batch first) with it.
    dtype : torch.dtype, default float64
        Of the vectors and kernels (float32 is about 9x faster for CPU convolutions).
    device : torch.device or str, optional
        Where to compute; the connectivity's device if omitted.
    max_memory : int or str, optional
        Budget for the sparse form (default 2 GiB).

    Raises
    ------
    MemoryBudgetError
        When only the sparse form applies and it is over budget.
    OptionError
        For a norm that is not elementwise (custom row-wise callables need ``'dense'``); a
        ``TypeError``.
    """
    norm, shift, c = _norm_and_shift(norm, conn)
    if not isinstance(norm, ElementwiseNorm):
        raise OptionError(
            f"{conn.label}: the matrix-free operator needs an elementwise norm (lin, soft, "
            f"sig or None), not {norm.name!r}; use ",
            Opt("method", "dense"),
            " for a custom row-wise norm",
            param="norm",
        )
    device = torch.device(device) if device is not None else conn.device
    op = None
    if module is not None and in_shape is not None:
        op = _module_operator(module, tuple(in_shape), norm, shift, c, dtype, device)
        if op is not None and (op.n_rows, op.n_cols) != (conn.n_rows, conn.n_cols):
            op = None
        if op is not None and not _same_structure(op, module, tuple(in_shape), conn):
            op = None  # e.g. a legacy (all-channel) pool: the connectivity is another matrix
    if op is None and isinstance(conn, FullyConnected):
        op = _linear_operator(conn.weight, norm, shift, c, dtype, device)
    if op is None:
        op = _sparse_operator(conn, norm, shift, c, dtype, device, max_memory)
    return op


def _same_structure(op, module, in_shape, conn) -> bool:
    """The operator's number of stored entries equals the connectivity's (a cheap check
    that module and connectivity describe the same matrix)."""
    count = getattr(op, "_count", None)
    if count is None:
        return True
    return int(round(float(count()))) == conn.nnz


def _linear_operator(weight, norm, shift, c, dtype, device) -> TransitionOperator:
    w = weight.detach().to(device, dtype)
    kf = norm.f(w, shift) - c  # (out, in): G = kf^T
    n_cols, n_rows = kf.shape
    return TransitionOperator(
        n_rows, n_cols, lambda v: v @ kf, lambda u: u @ kf.T, c, norm.normalizes, dtype,
        device, "linear",
    )  # fmt: skip


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def _module_operator(module, in_shape, norm, shift, c, dtype, device):
    if isinstance(module, nn.Linear):
        return _linear_operator(module.weight, norm, shift, c, dtype, device)
    if type(module) in _CONVS and module.padding_mode == "zeros":
        return _conv_operator(module, in_shape, norm, shift, c, dtype, device)
    if type(module) in _POOLS:
        return _pool_operator(module, in_shape, norm, shift, c, dtype, device)
    return None


def _conv_operator(module, in_shape, norm, shift, c, dtype, device):
    nd = module.weight.dim() - 2
    if len(in_shape) != nd + 2:
        return None
    c_in, size = in_shape[1], tuple(in_shape[2:])
    rev = list(module._reversed_padding_repeated_twice)  # torch's F.pad order: last axis first
    padded = tuple(
        s + rev[2 * (nd - 1 - a)] + rev[2 * (nd - 1 - a) + 1] for a, s in enumerate(size)
    )
    crop = tuple(
        slice(rev[2 * (nd - 1 - a)], rev[2 * (nd - 1 - a)] + s) for a, s in enumerate(size)
    )
    stride, dilation, groups = list(module.stride), list(module.dilation), module.groups
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    kf = norm.f(module.weight.detach().to(device, dtype), shift) - c
    ones_k = torch.ones_like(kf)
    out_size = tuple(
        (p - d * (k - 1) - 1) // s + 1 for p, d, k, s in zip(padded, dilation, kf.shape[2:], stride)
    )
    c_out = kf.shape[0]
    n_rows, n_cols = c_in * math.prod(size), c_out * math.prod(out_size)

    def fwd(u, kernel):  # (b, n_rows) -> (b, n_cols): A^T u
        x = F.pad(u.reshape(-1, c_in, *size), rev)
        return conv(x, kernel, None, stride, 0, dilation, groups).reshape(u.shape[0], -1)

    def bwd(v, kernel):  # (b, n_cols) -> (b, n_rows): A v
        b = v.shape[0]
        dummy = v.new_empty(1).expand(b, c_in, *padded)
        x = torch.ops.aten.convolution_backward(
            v.reshape(b, c_out, *out_size), dummy, kernel, None, stride, [0] * nd, dilation,
            False, [0] * nd, groups, (True, False, False),
        )[0]  # fmt: skip
        return x[(slice(None), slice(None), *crop)].reshape(b, -1)

    op = TransitionOperator(
        n_rows, n_cols, lambda v: bwd(v, kf), lambda u: fwd(u, kf), c, norm.normalizes, dtype,
        device, "conv",
    )  # fmt: skip
    op._count = lambda: bwd(torch.ones(1, n_cols, dtype=dtype, device=device), ones_k).sum()
    return op


def _pool_operator(module, in_shape, norm, shift, c, dtype, device):
    nd = (1, 2, 3)[_POOLS.index(type(module))]
    if len(in_shape) != nd + 2:
        return None
    c_in, size = in_shape[1], tuple(in_shape[2:])
    k, s, p = module.kernel_size, module.stride, module.padding
    ceil, incl = module.ceil_mode, module.count_include_pad
    div = getattr(module, "divisor_override", None)
    if nd == 1:  # avg_pool1d has no divisor_override: run it as a 2-d pool of height 1
        k, s, p = (1, _one(k)), (1, _one(s)), (0, _one(p))

    def pool(x, divisor):
        shape = (x.shape[0], c_in, *((1,) if nd == 1 else ()), *size)
        fn = F.avg_pool3d if nd == 3 else F.avg_pool2d
        return fn(x.reshape(shape), k, s, p, ceil, incl if divisor is None else True, divisor)

    def window(u):  # (b, n_rows) -> (b, n_cols): window sums, A^T u with unit entries
        return pool(u, 1).reshape(u.shape[0], -1)

    def window_t(v):  # its transpose, by autograd (a pool's backward is as cheap as it)
        with torch.enable_grad():
            x = torch.zeros(v.shape[0], n_rows, dtype=dtype, device=device, requires_grad=True)
            (gx,) = torch.autograd.grad(window(x), x, v)
        return gx

    n_rows = c_in * math.prod(size)
    ones = torch.ones(1, n_rows, dtype=dtype, device=device)
    counts = window(ones)
    entry = pool(ones, div).reshape(1, -1) / counts  # 1 / divisor of each output
    w = norm.f(entry, shift) - c
    n_cols = counts.shape[1]
    op = TransitionOperator(
        n_rows, n_cols, lambda v: window_t(v * w), lambda u: window(u) * w, c, norm.normalizes,
        dtype, device, "pool",
    )  # fmt: skip
    op._count = lambda: counts.sum()
    return op


def _one(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def _sparse_operator(conn, norm, shift, c, dtype, device, max_memory):
    h = _sparse_g(conn, norm, shift, c, max_memory, "the sparse operator of SLQ")
    ht = h.T.tocsr()
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    h, ht = h.astype(np_dtype), ht.astype(np_dtype)

    def apply(m, x):
        y = m @ x.detach().cpu().numpy().T
        return torch.from_numpy(np.ascontiguousarray(y.T)).to(device, dtype)

    return TransitionOperator(
        conn.n_rows, conn.n_cols, lambda v: apply(h, v), lambda u: apply(ht, u), c,
        norm.normalizes, dtype, device, "sparse",
    )  # fmt: skip


def _sparse_g(conn, norm, shift, c, max_memory, what):
    """``G = f(A) - c`` on the stored entries, as a float64 ``scipy.sparse.csr_array``."""
    budget = resolve_budget(max_memory, "cpu")
    need = conn.sparse_bytes("csr") + 3 * 8 * conn.nnz
    check_budget(
        need,
        budget,
        f"{conn.label}: {what} ({conn.n_rows} x {conn.n_cols}, {conn.nnz} entries, "
        "float64 CSR and its transpose)",
        (
            "pass a larger ",
            Opt("max_memory"),
            ", or give the module and its input shape so that "
            "convolutions, pools and Linear layers run matrix-free",
        ),
    )
    import scipy.sparse

    # float64 entries: a layer whose padding folds taps sums them, and in the weights' own
    # float32 (what to_sparse returns) the sums would lose digits
    blk = conn.block(0, conn.n_rows, dtype=torch.float64, device="cpu")
    data = (norm.f(blk.vals, shift) - c).numpy()
    return scipy.sparse.csr_array(
        (data, blk.cols.numpy(), blk.rowptr.numpy()), shape=(conn.n_rows, conn.n_cols)
    )


# --------------------------------------------------------------------------- exact methods


def _dense_p(conn: Connectivity, norm: Norm, shift: float, device) -> torch.Tensor:
    """The dense float64 ``P``: ``f`` of every entry of ``A`` (``f(0) = c`` at the absent
    ones), rows divided by their sums (zero rows where the sum is 0)."""
    if isinstance(conn, FullyConnected):
        a = conn.weight.detach().to(device, torch.float64).T
    else:
        a = conn.to_dense(torch.float64).to(device)
    if not isinstance(norm, ElementwiseNorm):
        return norm(a).to(torch.float64)
    p = norm.f(a, shift)
    if norm.normalizes:
        z = p.sum(1, keepdim=True)
        p = torch.where(z > 0, p / torch.where(z > 0, z, 1.0), 0.0)
    return p


def _gram_fc(conn: FullyConnected, norm, shift, device, budget) -> torch.Tensor:
    """The smaller Gram matrix of a Linear layer's ``P``, streamed over blocks of the
    weight. ``P^T = Q = f(W) D^-1`` (out x in)."""
    w = conn.weight.detach()
    n_out, n_in = w.shape
    k = min(n_in, n_out)
    big = max(n_in, n_out)
    step = max(1, min(big, (budget - 3 * 8 * k * k) // (3 * 8 * max(k, 1))))
    z = torch.zeros(n_in, dtype=torch.float64, device=device)
    if norm.normalizes:
        for j in range(0, n_out, step):
            z += norm.f(w[j : j + step].to(device, torch.float64), shift).sum(0)
    dinv = torch.where(z > 0, 1.0 / torch.where(z > 0, z, 1.0), 0.0)
    if not norm.normalizes:
        dinv = torch.ones_like(dinv)
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    if n_out <= n_in:  # P^T P = Q Q^T = sum over input blocks R of Q[:, R] Q[:, R]^T
        for r in range(0, n_in, step):
            q = norm.f(w[:, r : r + step].to(device, torch.float64), shift) * dinv[r : r + step]
            gram.addmm_(q, q.T)
    else:  # P P^T = Q^T Q = sum over output blocks J of Q[J]^T Q[J]
        for j in range(0, n_out, step):
            q = norm.f(w[j : j + step].to(device, torch.float64), shift) * dinv
            gram.addmm_(q.T, q)
    return gram


def _gram_sparse(conn, norm, shift, c, device, budget) -> torch.Tensor:
    """The smaller Gram matrix from the sparse ``G = f(A) - c``; with ``H = D^-1 G`` and
    ``d`` the diagonal of ``D^-1``, ``P = H + c d 1^T``, so::

        P^T P = H^T H + c (u 1^T + 1 u^T) + c^2 |d|^2 1 1^T,     u = H^T d
        P P^T = H H^T + c (u d^T + d u^T) + c^2 n_cols d d^T,    u = H 1

    the products ``H^T H`` / ``H H^T`` taken by sparse row chunks into the dense result."""
    import scipy.sparse

    g = _sparse_g(conn, norm, shift, c, budget, "the Gram matrix's sparse factor")
    if norm.normalizes:
        z = np.asarray(g.sum(axis=1)).ravel() + c * conn.n_cols
        d = np.where(z > 0, 1.0 / np.where(z > 0, z, 1.0), 0.0)
    else:
        d = np.ones(conn.n_rows)
    h = scipy.sparse.csr_array(scipy.sparse.diags_array(d) @ g)
    if conn.n_cols <= conn.n_rows:
        s = h.T.tocsr()
        u = h.T @ d
        one, scale = np.ones(conn.n_cols), float(d @ d)
        rank1 = (u, one)
    else:
        s = h
        u = np.asarray(h.sum(axis=1)).ravel()
        one, scale = d, float(conn.n_cols)
        rank1 = (u, d)
    k, big = s.shape
    st = s.T.tocsc()  # its columns: the rows of S^T, i.e. S's columns
    # sparse products cost sum over S's columns of nnz^2 scalar steps (~50x a GEMM flop);
    # dense blocks of S cost k * big * k GEMM flops: take the cheaper
    col_nnz = np.diff(st.indptr).astype(np.float64)
    dense = 50.0 * float(col_nnz @ col_nnz) > float(k) * big * k
    gram = np.zeros((k, k))
    chunk = max(1, min(big if dense else k, (budget // 4) // max(8 * k, 1)))
    if dense:  # S S^T = sum over column blocks J of S[:, J] S[:, J]^T
        gram_t = torch.from_numpy(gram)
        sc = s.tocsc()
        for j in range(0, big, chunk):
            blk = torch.from_numpy(sc[:, j : j + chunk].toarray())
            gram_t.addmm_(blk, blk.T)
    else:
        for i in range(0, k, chunk):
            gram[i : i + chunk] = (s[i : i + chunk] @ st).toarray()
    if c:
        a, b = rank1
        gram += c * (np.outer(a, b) + np.outer(b, a)) + c * c * scale * np.outer(one, one)
    return torch.from_numpy(gram).to(device)


def _singular_values_from_gram(gram: torch.Tensor) -> np.ndarray:
    lam = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    return lam.sqrt().flip(0).cpu().numpy()


def resolution(method: str, n_rows: int, n_cols: int, sigma_max: float) -> float:
    """The smallest singular value ``method`` resolves; below it, rounding noise.

    ``'dense'``: ``max(n_rows, n_cols) * u * sigma_max`` (the rank tolerance of
    ``numpy.linalg.matrix_rank``); ``'gram'``: ``sqrt(sqrt(k) * u) * sigma_max`` with
    ``k = min(n_rows, n_cols)``, the square root of the Gram matrix's typical rounding level
    (``~1.2e-7 sigma_max`` for ``k = 4096``). The
    exact methods set the singular values below it to 0, so that a rank-deficient ``P``
    does not gain ``(noise) ** alpha`` per zero singular value (``1e-8`` each for
    ``alpha = 1/2`` after a dense SVD); a true singular value below it errs by at most the
    resolution itself.
    """
    if method == "dense":
        return max(n_rows, n_cols) * _U64 * sigma_max
    return math.sqrt(math.sqrt(min(n_rows, n_cols)) * _U64) * sigma_max


def _clean(s: np.ndarray, method: str, n_rows: int, n_cols: int) -> np.ndarray:
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, None)
    if s.size:
        s[s <= resolution(method, n_rows, n_cols, float(s.max()))] = 0.0
    return s


# --------------------------------------------------------------------------- SLQ


def _slq(
    op: TransitionOperator,
    n: int,
    alpha: float,
    eps: float,
    tol: float,
    max_probes: int,
    steps: int,
    seed: int,
    budget: int,
    label: str,
    deflate: int = 1,
) -> Spectrum:
    """Stochastic Lanczos quadrature of ``tr f(M)`` for the Gram operator ``M`` of ``op``.

    With ``deflate = d > 0``, the ``d`` leading Ritz vectors ``V`` of one Lanczos run are
    split off: ``tr f(M) = sum_i v_i^T f(M) v_i + E[z'^T f(M) z']`` with the probes
    projected, ``z' = (I - V V^T) z``, which holds for any orthonormal ``V``. The first term
    is a deterministic quadrature (Lanczos from each ``v_i``); the leading singular
    direction of a row-stochastic ``P`` (near the constant vector) then no longer feeds
    the probes' variance, which it otherwise dominates.
    """
    k = op.k
    m = max(1, min(steps, k))
    d = max(0, min(int(deflate), k - 1, m))
    item = torch.empty((), dtype=op.dtype).element_size()
    per_probe = (m + d + 4) * k * item + 8 * (op.n_rows + op.n_cols) * item
    batch = int(min(8, max_probes, budget // max(per_probe, 1)))
    if batch < 1:
        raise MemoryBudgetError(
            f"{label}: SLQ keeps {m} Lanczos vectors of length {k} per probe (about "
            f"{format_bytes(per_probe)}) but ",
            Opt("max_memory"),
            f" is {format_bytes(budget)}; raise ",
            Opt("max_memory"),
            " or lower lanczos_steps",
            needed=per_probe,
            budget=budget,
        )
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def quad(theta, tau):
        lam = theta.clamp_min(0.0)
        powers = lam ** (alpha / 2)
        above = (lam > eps * eps).to(torch.float64)
        return torch.stack(
            [(tau * powers).sum(1), (tau * above).sum(1), (tau * powers * above).sum(1)], 1
        )

    fixed = None
    exact_part = torch.zeros(3, dtype=torch.float64)
    ritz_max = 0.0
    if d:
        start = _rademacher(1, k, gen, op)
        theta, vecs, basis = _lanczos(op, start, m, gen, keep_basis=True)
        ritz_max = float(theta.max())
        top = vecs[0][:, -d:].to(op.device, op.dtype)  # (m, d): the leading Ritz vectors
        fixed = torch.linalg.qr(torch.einsum("jk,jd->kd", basis[:, 0], top))[0].T  # (d, k)
        theta, tau = _lanczos(op, fixed.clone(), m, gen, against=None)[:2]
        exact_part = quad(theta, tau).sum(0)
    vals: list[np.ndarray] = []  # per probe: Gamma, r, Gamma_r
    while len(vals) < max_probes:
        b = min(batch, max_probes - len(vals))
        z = _rademacher(b, k, gen, op)
        if fixed is not None:
            z = z - (z @ fixed.T) @ fixed
        weight = (z.to(torch.float64) ** 2).sum(1).cpu()
        theta, tau = _lanczos(op, z, m, gen, against=fixed)[:2]
        ritz_max = max(ritz_max, float(theta.max()))
        per = weight[:, None] * quad(theta, tau) + exact_part
        vals.extend(list(per.numpy()))
        if len(vals) >= min(_MIN_PROBES, max_probes):  # a standard error from fewer is noise
            arr = np.asarray(vals)
            mean = arr[:, 0].mean()
            err = arr[:, 0].std(ddof=1) / math.sqrt(len(arr))
            if mean > 0 and err <= tol * abs(mean):
                break
            if mean == 0 and err == 0:
                break
    arr = np.asarray(vals)
    p = len(arr)
    mean = arr.mean(0)
    err = arr.std(0, ddof=1) / math.sqrt(p) if p > 1 else np.full(3, np.inf)
    g, r, g_r = (float(x) for x in mean)
    # Delta Gamma's error by the delta method on the per-probe values
    if r > 0 and p > 1:
        lin = arr[:, 2] / r - g_r * arr[:, 1] / r**2 - arr[:, 0] / n
        d_err = float(lin.std(ddof=1) / math.sqrt(p))
    else:
        d_err = float(err[0] / n) if n else 0.0
    return Spectrum.from_sums(
        g,
        g_r,
        r,
        n,
        n_cols=op.n_cols,
        alpha=alpha,
        eps=eps,
        method="slq",
        sigma_max=math.sqrt(max(ritz_max, 0.0)),
        gamma_alpha_stderr=float(err[0]),
        gamma_alpha_r_stderr=float(err[2]),
        r_eps_stderr=float(err[1]),
        delta_gamma_stderr=d_err,
        probes=p,
        lanczos_steps=m,
    )


def _rademacher(b: int, k: int, gen, op: TransitionOperator) -> torch.Tensor:
    z = torch.randint(0, 2, (b, k), generator=gen).to(op.dtype) * 2 - 1
    return z.to(op.device)


def _orthogonalise(w: torch.Tensor, prev: torch.Tensor, fixed: torch.Tensor | None):
    """``w`` (b, k) minus its components on ``prev`` (j, b, k) and ``fixed`` (d, k), by
    classical Gram-Schmidt twice (full reorthogonalisation)."""
    for _ in range(2):
        w = w - torch.einsum("jb,jbk->bk", torch.einsum("jbk,bk->jb", prev, w), prev)
        if fixed is not None:
            w = w - (w @ fixed.T) @ fixed
    return w


def _lanczos(op: TransitionOperator, start: torch.Tensor, m: int, gen, *, against=None,
             keep_basis: bool = False):  # fmt: skip
    """``m`` Lanczos steps with full reorthogonalisation from each row of ``start`` at once.

    Returns the Ritz values ``theta`` and Gauss weights ``tau`` (first components squared),
    each ``(b, m)`` float64, so that ``x^T f(M) x ~ |x|^2 * sum(tau * f(theta))``; with
    ``keep_basis``, also the eigenvectors of the tridiagonal matrices and the basis
    ``(m, b, k)``. Every vector is kept orthogonal to the rows of ``against``. A start
    whose Krylov space closes early (``beta ~ 0``) continues with a fresh random vector
    orthogonal to its basis and ``beta = 0``: its tridiagonal matrix splits, and the
    blocks after the split get zero weight, so the quadrature stays exact for it.
    """
    b, k = start.shape
    dtype, device = op.dtype, op.device
    q = start / start.norm(dim=1, keepdim=True)
    basis = torch.empty(m, b, k, dtype=dtype, device=device)
    alpha = torch.zeros(b, m, dtype=torch.float64)
    beta = torch.zeros(b, max(m - 1, 0), dtype=torch.float64)
    tiny = 1e-5 if dtype == torch.float32 else 1e-12
    scale = torch.zeros(b, dtype=torch.float64)
    for j in range(m):
        basis[j] = q
        w = op.gram(q)
        alpha[:, j] = (w * q).sum(1).to(torch.float64).cpu()
        scale = torch.maximum(scale, alpha[:, j].abs())
        if j == m - 1:
            break
        w = _orthogonalise(w, basis[: j + 1], against)
        nrm = w.norm(dim=1).to(torch.float64).cpu()
        broke = nrm <= tiny * torch.clamp(scale, min=1e-300)
        beta[:, j] = torch.where(broke, 0.0, nrm)
        if bool(broke.any()):
            idx = broke.nonzero().ravel().tolist()
            fresh = torch.randn(len(idx), k, generator=gen).to(device, dtype)
            fresh = _orthogonalise(fresh, basis[: j + 1, idx], against)
            w[idx] = fresh
            nrm[idx] = fresh.norm(dim=1).to(torch.float64).cpu()
        q = w / nrm.to(device, dtype)[:, None]
    t = torch.diag_embed(alpha)
    if m > 1:
        t = t + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    theta, vec = torch.linalg.eigh(t)
    if keep_basis:
        return theta, vec, basis
    return theta, vec[:, 0, :] ** 2


# --------------------------------------------------------------------------- public entry


def _resolve_layer(layer, in_shape):
    """``(conn, module, in_shape, label)`` from a Connectivity, a MeasureLayer or a module."""
    if isinstance(layer, MeasureLayer):
        return layer.conn, layer.module, tuple(layer.in_shape), layer.label
    if isinstance(layer, Connectivity):
        return layer, None, None, layer.label
    if isinstance(layer, nn.Module):
        if in_shape is None:
            raise OptionError(
                f"layer_spectrum({type(layer).__name__}) needs ",
                Opt("in_shape", metavar="(batch, C, ...)"),
                " to build its connectivity; or pass a Connectivity",
            )
        in_shape = tuple(int(s) for s in in_shape)
        with torch.no_grad():
            out_shape = tuple(layer(torch.zeros(in_shape, device=_module_device(layer))).shape)
        conn = connectivity(layer, in_shape, out_shape)
        return conn, layer, in_shape, conn.label
    raise OptionError(
        "layer_spectrum needs a Connectivity, a MeasureLayer or an nn.Module, not "
        f"{type(layer).__name__}",
        param="layer",
    )


def _module_device(module):
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def choose_method(conn: Connectivity, norm, method: str, budget: int, label: str) -> str:
    """The method ``method='auto'`` picks for ``conn`` (or ``method`` checked as given).

    Dense when the dense ``P`` and its SVD workspace (three float64 copies) fit the budget
    and ``min(n_rows, n_cols) <= DENSE_MAX``; the Gram matrix when three float64 copies of
    it (and for non-Linear layers the float64 sparse factor) fit and ``k <= GRAM_MAX``;
    SLQ otherwise. A custom row-wise norm needs the dense matrix.

    Raises
    ------
    UnknownNameError
        For a method not in :data:`METHODS`.
    MemoryBudgetError
        When the method asked for (or the only one a custom norm allows) is over budget.
    """
    if method not in METHODS:
        raise UnknownNameError(
            "unknown ", Opt("method", method), f"; valid methods are {', '.join(METHODS)}"
        )
    norm = get_norm(norm)
    k = min(conn.n_rows, conn.n_cols)
    dense_bytes = 3 * 8 * conn.n_rows * conn.n_cols
    gram_bytes = 3 * 8 * k * k
    if not isinstance(conn, FullyConnected):
        gram_bytes += conn.sparse_bytes("csr") + 3 * 8 * conn.nnz
    if not isinstance(norm, ElementwiseNorm) and method != "dense":
        if method != "auto":
            raise OptionError(
                f"{label}: ",
                Opt("method", method),
                " needs an elementwise norm (lin, soft, sig or "
                f"None); the custom norm {norm.name!r} is applied to dense rows: use ",
                Opt("method", "dense"),
            )
        method = "dense"
    fix = (
        "pass a larger ",
        Opt("max_memory"),
        " or ",
        Opt("method", "slq"),
        " (matrix-free, statistical error)",
    )
    if method == "dense":
        check_budget(dense_bytes, budget, f"{label}: the dense {conn.n_rows} x {conn.n_cols} "
                     "transition matrix and its SVD", fix)  # fmt: skip
        return method
    if method == "gram":
        check_budget(gram_bytes, budget, f"{label}: the {k} x {k} Gram matrix", fix)
        return method
    if method == "auto":
        if k <= DENSE_MAX and dense_bytes <= budget:
            return "dense"
        if k <= GRAM_MAX and gram_bytes <= budget:
            return "gram"
        return "slq"
    return method


def layer_spectrum(
    layer: Connectivity | MeasureLayer | nn.Module,
    norm: Norm | str | Callable | None = "lin",
    *,
    in_shape: Sequence[int] | None = None,
    alpha: float = 1.0,
    eps: float = DEFAULT_EPS,
    method: str = "auto",
    tol: float = 1e-3,
    max_probes: int = 64,
    lanczos_steps: int = 40,
    seed: int = 0,
    max_memory: int | str | None = None,
    device: torch.device | str | None = None,
    slq_dtype: torch.dtype = torch.float32,
    deflate: int = 1,
) -> Spectrum:
    """The SVD reversibility and causal emergence of one layer's transition matrix ``P``.

    Parameters
    ----------
    layer : Connectivity, MeasureLayer or torch.nn.Module
        The layer. A module needs ``in_shape``; a :class:`MeasureLayer` (what a plan hands
        a measure) or a module also gives SLQ the matrix-free convolution operator.
    norm : Norm, str, callable or None, default 'lin'
        The row normalisation that makes ``P`` (as for the EI measure).
    in_shape : sequence of int, optional
        The module's input shape, batch first.
    alpha : float, default 1.0
        The exponent of ``Gamma_alpha``, in ``(0, 2)``.
    eps : float, default :data:`DEFAULT_EPS` (``1e-6``)
        Absolute threshold: ``r_eps`` counts the singular values ``> eps``. Absolute, so
        that a network's count is the sum of its layers' (its matrix is block-diagonal); for
        a normalised ``P`` the singular values are on a fixed scale (``sigma_max >=
        sqrt(N / n_cols)`` when no row is zero, and ``<= sqrt(N)``), and ``1e-6`` sits about
        ten times above the Gram method's resolution for Gram sides up to ~8192 (see
        Notes). With ``norm=None`` the singular values scale with the weights: choose
        ``eps`` accordingly.
    method : {'auto', 'dense', 'gram', 'slq'}
        See :func:`choose_method` for ``'auto'``.
    tol : float, default 1e-3
        SLQ: add probes until the standard error of ``Gamma_alpha`` is at most ``tol``
        times the estimate (at least 4 probes), or ``max_probes`` is reached.
    max_probes : int, default 64
        SLQ: the most Rademacher probes.
    lanczos_steps : int, default 40
        SLQ: Lanczos steps per probe (Gauss quadrature nodes); capped at the Gram side.
    seed : int, default 0
        SLQ: seed of the probes (results are reproducible).
    max_memory : int or str, optional
        Working-memory budget; default 2 GiB.
    device : torch.device or str, optional
        Where to compute; the layer's device if omitted.
    slq_dtype : torch.dtype, default torch.float32
        dtype of SLQ's operator and Lanczos vectors (the tridiagonal matrices and the
        quadrature are float64).
    deflate : int, default 1
        SLQ: leading Ritz vectors split off the trace before the probes (a deterministic
        quadrature each), which removes the variance the dominant singular direction of a
        row-stochastic ``P`` causes; 0 for plain Hutchinson probes.

    Returns
    -------
    Spectrum

    Raises
    ------
    OptionError
        For ``alpha`` outside ``(0, 2)``, a negative or non-finite ``eps``, ``tol <= 0``,
        ``max_probes < 2`` or ``lanczos_steps < 1`` (a ``ValueError``); ``param`` names
        the setting.
    UnknownNameError
        For an unknown ``method``.
    NonFiniteWeightsError
        For NaN or infinite weights.
    MemoryBudgetError
        When the chosen method does not fit ``max_memory`` (the message names the layer
        and the fix).

    Notes
    -----
    Guarantees. ``'dense'`` is exact to float64 rounding (``svdvals`` is backward stable:
    each singular value within about ``u * sigma_max * sqrt(k)``, ``u = 2.2e-16``).
    ``'gram'`` computes ``sigma_i = sqrt(lambda_i)`` from the eigenvalues of a float64 Gram
    matrix, each within ``delta ~ u * sqrt(k) * sigma_max^2``: a singular value well above
    ``sqrt(delta)`` has relative error ``~ delta / (2 sigma^2)`` (float64 accuracy for a
    well-conditioned ``P``), while one below ``sqrt(delta)`` (``~1e-8 sigma_max``) is
    noise of that size. Both exact methods set the singular values below their
    :func:`resolution` to 0 (otherwise each zero singular value of a rank-deficient ``P``
    would add ``noise ** alpha``), so ``sigma ** alpha`` of a true singular value below
    the resolution errs by at most ``resolution ** alpha``. ``'slq'`` returns
    unbiased Monte-Carlo estimates of ``tr f(M)`` with their standard errors over the
    probes, plus the Gauss-quadrature bias of ``lanczos_steps`` nodes: negligible for
    smooth ``f``, but ``lambda ** (alpha / 2)`` is not smooth at 0 and the indicators
    ``1[lambda > eps^2]`` are steps, so spectra with mass near 0 or near ``eps^2`` carry a
    bias the standard error does not show (``r_eps`` and ``Gamma_alpha(r_eps)`` most).
    """
    alpha, eps = _check_alpha(alpha), _check_eps(eps)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise OptionError(Opt("tol", tol), " must be a positive number (relative standard error)")
    if int(max_probes) < 2:
        raise OptionError(
            Opt("max_probes", max_probes), " must be at least 2 (for a standard error)"
        )
    if int(lanczos_steps) < 1:
        raise OptionError(Opt("lanczos_steps", lanczos_steps), " must be at least 1")
    conn, module, in_shape, label = _resolve_layer(layer, in_shape)
    if device is None:
        device = layer.device if isinstance(layer, MeasureLayer) else conn.device
    device = torch.device(device)
    budget = resolve_budget(
        max_memory if max_memory is not None else getattr(layer, "max_memory", None), device
    )
    norm_obj = get_norm(norm)
    conn.check_finite()
    method = choose_method(conn, norm_obj, method, budget, label)
    norm_obj, shift, c = _norm_and_shift(norm_obj, conn)
    n = conn.n_rows
    if method == "dense":
        p = _dense_p(conn, norm_obj, shift, device)
        s = _clean(torch.linalg.svdvals(p).cpu().numpy(), "dense", n, conn.n_cols)
        return Spectrum.from_singular_values(s, n, conn.n_cols, alpha, eps, "dense")
    if method == "gram":
        if isinstance(conn, FullyConnected):
            gram = _gram_fc(conn, norm_obj, shift, device, budget)
        else:
            gram = _gram_sparse(conn, norm_obj, shift, c, device, budget)
        s = _clean(_singular_values_from_gram(gram), "gram", n, conn.n_cols)
        floor = resolution("gram", n, conn.n_cols, float(s[0]) if s.size else 0.0)
        if 0 < eps < floor:
            warn_caller(
                f"{label}: eps={eps:g} is near the Gram method's resolution (~{floor:.1e}: "
                "singular values below it are rounding noise), so r_eps may count noise; use ",
                Opt("method", "dense"),
                " or a larger eps",
                param="eps",
            )
        return Spectrum.from_singular_values(s, n, conn.n_cols, alpha, eps, "gram")
    op = transition_operator(
        conn, norm_obj, module=module, in_shape=in_shape, dtype=slq_dtype, device=device,
        max_memory=budget,
    )  # fmt: skip
    logger.debug("%s: SLQ with the %s operator (k=%d)", label, op.kind, op.k)
    with torch.no_grad():
        return _slq(
            op, n, alpha, eps, float(tol), int(max_probes), int(lanczos_steps), int(seed),
            budget, label, int(deflate),
        )  # fmt: skip


# --------------------------------------------------------------------------- the measure


class Reversibility(Measure):
    """The SVD reversibility and causal emergence of Zhang et al. (2025), as a measure.

    Every counted layer's transition matrix ``P`` (the plan's norm) gets a
    :class:`Spectrum` from :func:`layer_spectrum`; the network's values are those of the
    block-diagonal matrix of all layers (:func:`combine`). ``determinism``,
    ``degeneracy`` and ``ei`` are None.

    Parameters
    ----------
    alpha : float, default 1.0
        In ``(0, 2)``.
    eps : float, default :data:`DEFAULT_EPS`
        Absolute threshold on singular values for ``r_eps``.
    method : {'auto', 'dense', 'gram', 'slq'}
        Per layer; ``'auto'`` picks by size (:func:`choose_method`).
    tol, max_probes, lanczos_steps, seed
        SLQ's settings (see :func:`layer_spectrum`).
    """

    name = "svd"
    columns = (
        "gamma_alpha",
        "gamma",
        "gamma_alpha_r",
        "r_eps",
        "delta_gamma",
        "n",
        "method",
        "stderr",
    )

    def __init__(
        self,
        alpha: float = 1.0,
        eps: float = DEFAULT_EPS,
        method: str = "auto",
        tol: float = 1e-3,
        max_probes: int = 64,
        lanczos_steps: int = 40,
        seed: int = 0,
    ):
        self.alpha = _check_alpha(alpha)
        self.eps = _check_eps(eps)
        if method not in METHODS:
            raise UnknownNameError(
                "unknown ", Opt("method", method), f"; valid methods are {', '.join(METHODS)}"
            )
        if not (math.isfinite(float(tol)) and tol > 0):
            raise OptionError(Opt("tol", tol), " must be a positive number")
        if int(max_probes) < 2 or int(lanczos_steps) < 1:
            raise OptionError(
                Opt("max_probes"),
                " must be at least 2 and ",
                Opt("lanczos_steps"),
                " at least 1",
                param="max_probes" if int(max_probes) < 2 else "lanczos_steps",
            )
        self.method, self.tol = method, float(tol)
        self.max_probes, self.lanczos_steps, self.seed = (
            int(max_probes),
            int(lanczos_steps),
            int(seed),
        )

    def settings(self) -> dict[str, Any]:
        """The settings as JSON-ready data."""
        return {
            "alpha": self.alpha,
            "eps": self.eps,
            "method": self.method,
            "tol": self.tol,
            "max_probes": self.max_probes,
            "lanczos_steps": self.lanczos_steps,
            "seed": self.seed,
        }

    def check(self, layer: MeasureLayer) -> None:
        """Refuse at plan time a layer whose method cannot fit the plan's budget."""
        method = choose_method(layer.conn, layer.norm, self.method, layer.max_memory, layer.label)
        if method == "slq":
            # only the sparse fallback needs memory beyond the Lanczos vectors
            if not _has_matrix_free(layer):
                check_budget(
                    layer.conn.sparse_bytes("csr") + 3 * 8 * layer.conn.nnz,
                    layer.max_memory,
                    f"{layer.label}: SLQ's sparse operator ({layer.conn.n_rows} x "
                    f"{layer.conn.n_cols}, {layer.conn.nnz} entries)",
                    ("pass a larger ", Opt("max_memory")),
                )

    def layer(self, layer: MeasureLayer) -> dict[str, Any]:
        """The layer's values: the core keys (None) and :attr:`columns`, plus the other
        :class:`Spectrum` fields that :meth:`network` combines."""
        spec = layer_spectrum(
            layer,
            layer.norm,
            alpha=self.alpha,
            eps=self.eps,
            method=self.method,
            tol=self.tol,
            max_probes=self.max_probes,
            lanczos_steps=self.lanczos_steps,
            seed=self.seed,
            max_memory=layer.max_memory,
            device=layer.device,
        )
        return _row(spec)

    def network(self, layers: list[dict[str, Any]]) -> dict[str, Any]:
        """The network's values: :func:`combine` of the layers'."""
        return _row(combine(layers))


def _has_matrix_free(layer: MeasureLayer) -> bool:
    m = layer.module
    return isinstance(m, (nn.Linear, *_POOLS)) or (type(m) in _CONVS and m.padding_mode == "zeros")


def _row(spec: Spectrum) -> dict[str, Any]:
    row: dict[str, Any] = {"determinism": None, "degeneracy": None, "ei": None}
    d = spec.as_dict()
    row.update({key: d[key] for key in Reversibility.columns if key != "stderr"})
    row["stderr"] = spec.stderr
    row.update({key: value for key, value in d.items() if key not in row})
    return row

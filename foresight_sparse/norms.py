"""Row normalisations that turn a layer's out-weights into transition probabilities.

A norm is a small object. Called on a dense matrix it behaves exactly like the old module's
function of the same name. It also carries what the sparse and implicit engines need to treat
absent entries exactly without materialising rows: an elementwise map ``f`` and its value at
zero ``c = f(0)`` (see the mathematics page of the docs), so a row with ``m`` absent
entries has total ``Z = sum f(a) + c * m``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .exceptions import Opt, OptionError, UnknownNameError

__all__ = [
    "Norm",
    "ElementwiseNorm",
    "LinNorm",
    "SoftNorm",
    "SigNorm",
    "Unnormalised",
    "RowwiseNorm",
    "lin_norm",
    "soft_norm",
    "sig_norm",
    "NORMS",
    "get_norm",
]

_LN2 = math.log(2.0)


class Norm:
    """A row-wise normalisation of a connectivity matrix.

    Attributes
    ----------
    name : str
        Short name (``'lin'``, ``'soft'``, ``'sig'``, ``'none'`` or a custom function's name).
    elementwise : bool
        True when the norm is "map each entry by ``f``, then divide by the row sum", which
        the sparse and implicit engines evaluate exactly.
    """

    name = "norm"
    elementwise = False

    def __call__(self, W: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<norm {self.name}>"


class ElementwiseNorm(Norm):
    """``P[r, :] = f(A[r, :]) / Z_r`` with ``Z_r`` the row sum of ``f``.

    Subclasses define :meth:`f`, :meth:`f_log2f`, :meth:`zero` and :meth:`zero_log2`,
    evaluated with a per-layer ``shift`` that keeps ``exp`` finite and cancels in the ratio.
    """

    elementwise = True
    #: Whether rows are divided by their sum (False only for :class:`Unnormalised`).
    normalizes = True
    #: Whether :meth:`shift` depends on its bound (True only for :class:`SoftNorm`): the
    #: engines scan a layer's weights for the bound only then.
    shifts = False

    def shift(self, bound: float) -> float:
        """The shift to use for a layer whose entries are all at most ``bound``."""
        return 0.0

    def f(self, a: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """The elementwise map."""
        raise NotImplementedError

    def f_log2f(self, a: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """``f(a) * log2 f(a)``, with ``0 log 0 = 0``, computed stably."""
        raise NotImplementedError

    def zero(self, shift: float = 0.0) -> float:
        """``c = f(0)``: what every absent entry contributes to the row sum."""
        raise NotImplementedError

    def zero_log2(self, shift: float = 0.0) -> float:
        """``c * log2 c`` (0 when ``c = 0``)."""
        raise NotImplementedError


class LinNorm(ElementwiseNorm):
    """ReLU, then divide each row by its sum; an all-zero row stays all zero."""

    name = "lin"

    def __call__(self, W):
        W = F.relu(W)
        sums = W.sum(dim=1, keepdim=True)
        return W / torch.where(sums == 0, torch.ones_like(sums), sums)

    def f(self, a, shift=0.0):
        return torch.relu(a)

    def f_log2f(self, a, shift=0.0):
        pos = a > 0
        return torch.where(pos, a * torch.log2(torch.where(pos, a, torch.ones_like(a))), 0.0)

    def zero(self, shift=0.0):
        return 0.0

    def zero_log2(self, shift=0.0):
        return 0.0


class SoftNorm(ElementwiseNorm):
    """Softmax over the whole row, so each absent entry counts ``exp(0) = 1``.

    Unlike ``torch.sparse.softmax`` (which treats absent entries as ``-inf``) this is the
    dense softmax of the old module. The engines evaluate ``exp(a - s)`` with
    ``s = max(0, largest entry)``, which leaves every ratio unchanged and cannot overflow.
    """

    name = "soft"
    shifts = True

    def __call__(self, W):
        return F.softmax(W, dim=1)

    def shift(self, bound):
        return max(0.0, float(bound))

    def f(self, a, shift=0.0):
        return torch.exp(a - shift)

    def f_log2f(self, a, shift=0.0):
        z = a - shift
        return torch.exp(z) * z / _LN2

    def zero(self, shift=0.0):
        return math.exp(-shift)

    def zero_log2(self, shift=0.0):
        return math.exp(-shift) * (-shift) / _LN2


class SigNorm(ElementwiseNorm):
    """Logistic sigmoid of every entry (absent ones count ``1/2``), then divide by the row sum."""

    name = "sig"

    def __call__(self, W):
        W = torch.sigmoid(W)
        return W / W.sum(dim=1, keepdim=True)

    def f(self, a, shift=0.0):
        return torch.sigmoid(a)

    def f_log2f(self, a, shift=0.0):
        return torch.sigmoid(a) * F.logsigmoid(a) / _LN2

    def zero(self, shift=0.0):
        return 0.5

    def zero_log2(self, shift=0.0):
        return -0.5


class Unnormalised(ElementwiseNorm):
    """``norm=None``: the raw weights are used as they are (row entropies of raw values).

    A row's entropy is then ``-sum a log2 a`` over its positive entries (zero and negative
    entries give NaN terms, counted as 0, as in the old module) and columns sum raw weights.
    """

    name = "none"
    normalizes = False

    def __call__(self, W):
        return W

    def f(self, a, shift=0.0):
        return a

    f_log2f = LinNorm.f_log2f

    def zero(self, shift=0.0):
        return 0.0

    def zero_log2(self, shift=0.0):
        return 0.0


class RowwiseNorm(Norm):
    """Any other callable, applied to dense row blocks of the connectivity matrix.

    The function receives a dense ``(rows, n_out)`` float64 block and must return a tensor of
    the same shape, normalising each row independently. The engines feed it blocks sized to
    the memory budget; the implicit engine hands such layers to the sparse engine.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, W):
        return self.fn(W)


lin_norm = LinNorm()
soft_norm = SoftNorm()
sig_norm = SigNorm()
UNNORMALISED = Unnormalised()

#: Codes of the elementwise maps the numba kernels (foresight_sparse._kernels) evaluate:
#: ReLU, the shifted exponential of the softmax, the logistic sigmoid, and the identity.
#: The kernels compare against these names; numba reads module globals as constants.
KIND_LIN, KIND_SOFT, KIND_SIG, KIND_NONE = 0, 1, 2, 3

#: Norm class -> the code of its elementwise map in the numba kernels.
KERNEL_CODES: dict[type, int] = {
    LinNorm: KIND_LIN,
    SoftNorm: KIND_SOFT,
    SigNorm: KIND_SIG,
    Unnormalised: KIND_NONE,
}

#: Name -> norm, for the CLI and for ``norm='soft'`` style arguments.
NORMS: dict[str, Norm] = {"lin": lin_norm, "soft": soft_norm, "sig": sig_norm, "none": UNNORMALISED}


def get_norm(norm) -> Norm:
    """Resolve a ``norm`` argument: a :class:`Norm`, ``None``, a name in :data:`NORMS`, or a
    row-wise callable.

    Raises
    ------
    UnknownNameError
        For an unknown name.
    OptionError
        For anything that is not callable (a ``TypeError``).
    """
    if norm is None:
        return UNNORMALISED
    if isinstance(norm, Norm):
        return norm
    if isinstance(norm, str):
        try:
            return NORMS[norm.lower()]
        except KeyError:
            raise UnknownNameError(
                f"unknown norm {norm!r}; valid names are "
                f"{', '.join(sorted(NORMS))}, or pass a callable",
                param="norm",
            ) from None
    if callable(norm):
        return RowwiseNorm(norm)
    raise OptionError(
        Opt("norm"),
        " must be a norm such as foresight_sparse.ei.lin_norm, a name "
        f"({', '.join(sorted(NORMS))}), None or a callable, not "
        f"{type(norm).__name__}",
    )

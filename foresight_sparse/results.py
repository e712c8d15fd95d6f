"""What an analysis returns (:class:`Report`): network totals and one row per layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerReport", "Report"]


@dataclass
class LayerReport:
    """One layer of a :class:`Report`.

    Attributes
    ----------
    name : str
        Qualified name in the model (``"features.0"``).
    type : str
        Module class name.
    in_shape : tuple of int
        Traced input shape.
    out_shape : tuple of int
        Traced output shape.
    n_in : int
        Input neurons (rows of the connectivity matrix).
    n_out : int
        Output neurons (columns).
    nnz : int
        Stored (structural) entries of the connectivity matrix.
    mean_row_entropy : float
        The layer's own determinism: mean entropy of its normalised rows, in bits.
    degeneracy : float
        Entropy of the layer's own normalised column sums, in bits.
    ei : float
        ``degeneracy - mean_row_entropy``: the EI of the layer alone.
    engine : str
        The engine that served the layer.
    seconds : float
        Wall time spent on the layer.
    """

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    n_in: int
    n_out: int
    nnz: int
    mean_row_entropy: float
    degeneracy: float
    ei: float
    engine: str
    seconds: float


@dataclass
class Report:
    """Determinism, degeneracy and EI of a network, with a per-layer breakdown.

    Attributes
    ----------
    determinism : float
        Mean entropy of every row of every layer, in bits.
    degeneracy : float
        Entropy of the pooled, normalised column sums, in bits.
    ei : float
        ``degeneracy - determinism``, in bits.
    layers : list of LayerReport
        In forward order.
    skipped : list of (str, str)
        ``(name, type)`` of leaf modules the forward pass ran that have no builder (they do
        not count, as in the old module).
    norm : str
        Name of the norm used.
    engine : str
        The engine requested (each layer says which engine served it).
    device : str
        Where the reductions ran.
    legacy : bool
        Whether the old module's cross-channel pooling was used.
    seconds : float
        Total wall time.
    """

    determinism: float
    degeneracy: float
    ei: float
    layers: list[LayerReport]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    norm: str = "lin"
    engine: str = "auto"
    device: str = "cpu"
    legacy: bool = False
    seconds: float = 0.0

    @property
    def nnz(self) -> int:
        """Stored entries over all layers."""
        return sum(layer.nnz for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data: totals, settings, ``layers`` and ``skipped``."""
        d = asdict(self)
        for layer in d["layers"]:
            layer["in_shape"] = list(layer["in_shape"])
            layer["out_shape"] = list(layer["out_shape"])
        d["skipped"] = [{"name": n, "type": t} for n, t in self.skipped]
        d["nnz"] = self.nnz
        return d

    def table(self) -> str:
        """A fixed-width text table of the layers and the totals."""
        head = (f"{'layer':<24} {'type':<10} {'in':>10} {'out':>10} {'entries':>14} "
                f"{'H(row)':>9} {'degen':>9} {'EI':>9} {'engine':>8} {'s':>7}")
        lines = [head, "-" * len(head)]
        for lay in self.layers:
            lines.append(f"{lay.name[:24]:<24} {lay.type[:10]:<10} {lay.n_in:>10} "
                         f"{lay.n_out:>10} {lay.nnz:>14} {lay.mean_row_entropy:>9.4f} "
                         f"{lay.degeneracy:>9.4f} {lay.ei:>9.4f} {lay.engine:>8} "
                         f"{lay.seconds:>7.3f}")
        lines.append("-" * len(head))
        lines.append(f"network: determinism {self.determinism:.6f}  degeneracy "
                     f"{self.degeneracy:.6f}  EI {self.ei:.6f} bits  ({self.nnz} entries, "
                     f"{self.seconds:.2f} s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

"""Shared hypothesis strategies and helpers of the test suite.

The strategies draw layer configurations that PyTorch accepts (they are built constructively,
so hypothesis rejects almost nothing): Conv2d with every padding kind and mode, AvgPool2d with
every option, and small random feed-forward networks of both plus Linear layers. Import them
with ``from conftest import ...`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

F64 = torch.float64

#: The engines whose numbers must equal the reference. 'implicit' and 'auto' fall back to
#: 'sparse' for the layers they cannot serve, which is legal, so they are tested today too.
ENGINES_UNDER_TEST = ["sparse", "auto", "implicit"]

#: Relative tolerance of each engine against the float64 dense reference (DESIGN.md 6).
ENGINE_RTOL = {"sparse": 1e-9, "dense": 1e-9, "auto": 1e-9, "implicit": 1e-9}
ABS_FLOOR = 1e-12

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "dev", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """``n`` examples under the CI profile, scaled with the loaded profile's count (so that
    ``HYPOTHESIS_PROFILE=dev`` runs the slow tests longer too)."""
    return max(1, n * settings.default.max_examples // 25)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        # the marker, not item.keywords: a parameter id "cuda" is a keyword too
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# --------------------------------------------------------------------------- helpers

#: The start of both of the library's skipped-layer warnings: "skipped layers with no
#: connectivity builder: ..." and "skipped MyConv (a Conv2d subclass): ...".
SKIPPED_WARNING = "skipped "


def quiet(fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` without the library's skipped-layer warnings, and only those
    (any other warning still shows).

    The test suite's one way to silence them, whatever the entry point: a callable that
    takes the library's ``skipped=`` option (``plan``, ``report``, ``sweep``, ``Tracker``,
    ...) gets ``skipped="ignore"``; the others (the drop-in functions, the CLI's ``main``)
    run with those warnings filtered out.
    """
    try:
        takes_skipped = "skipped" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature
        takes_skipped = False
    if takes_skipped:
        return fn(*args, **{"skipped": "ignore", **kwargs})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SKIPPED_WARNING, category=UserWarning)
        return fn(*args, **kwargs)


def densify(matrix) -> torch.Tensor:
    """A torch sparse (COO/CSR) tensor, a scipy sparse matrix or a dense tensor, as a dense
    float64 CPU tensor."""
    if scipy.sparse.issparse(matrix):
        return torch.from_numpy(np.asarray(matrix.toarray(), dtype=np.float64))
    if matrix.layout != torch.strided:
        matrix = matrix.to_dense()
    return matrix.detach().to("cpu", F64)


def storage_bytes(matrix) -> int:
    """Bytes a torch sparse (COO/CSR) tensor or a scipy CSR matrix holds, measured from its
    index and value arrays."""
    if scipy.sparse.issparse(matrix):
        return matrix.indptr.nbytes + matrix.indices.nbytes + matrix.data.nbytes
    if matrix.layout == torch.sparse_coo:
        parts = (matrix._indices(), matrix._values())
    else:
        parts = (matrix.crow_indices(), matrix.col_indices(), matrix.values())
    return sum(t.element_size() * t.numel() for t in parts)


def assert_close(
    actual: float, expected: float, rel: float, abs_: float = ABS_FLOOR, what: str = ""
) -> None:
    """``|actual - expected| <= max(rel * |expected|, abs_)``, with a readable failure."""
    err = abs(actual - expected)
    bound = max(rel * abs(expected), abs_)
    assert err <= bound, (
        f"{what}: {actual!r} vs reference {expected!r} "
        f"(error {err:.3e}, relative {err / max(abs(expected), 1e-300):.3e},"
        f" allowed {bound:.3e})"
    )


def out_shape_of(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape the module produces for a zero input of ``in_shape``."""
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else F64
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'same' with an even kernel
        return tuple(module(torch.zeros(in_shape, dtype=dtype)).shape)


def randomize_(module: nn.Module, seed: int, scale: float = 1.0, zero_frac: float = 0.0):
    """Fill the module's weights with seeded normal values, some set exactly to zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            values = torch.randn(p.shape, generator=gen, dtype=F64) * scale
            if zero_frac:
                values[torch.rand(p.shape, generator=gen, dtype=F64) < zero_frac] = 0.0
            p.copy_(values.to(p.dtype))
    return module


# --------------------------------------------------------------------------- strategies


@dataclass
class LayerCase:
    """A drawn layer with its (batched) input and output shapes."""

    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __repr__(self) -> str:
        return f"LayerCase({self.module!r}, in={self.in_shape}, out={self.out_shape})"


def _pad_limit(mode: str, size: int) -> int:
    """Largest padding PyTorch accepts on one side of an axis of ``size`` in ``mode``."""
    if mode == "reflect":
        return size - 1
    if mode == "circular":
        return size
    return 10**6


@st.composite
def conv2d_cases(draw, max_extra: int = 5) -> LayerCase:
    """A float64 Conv2d with any groups, kernel, stride, padding kind and mode, dilation, and
    an input size (odd sizes included) that PyTorch accepts for it."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(PADDING_MODES))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if kind == "same":
        stride = (1, 1)
        padding = "same"
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        if kind == "valid":
            padding, pads = "valid", [(0, 0), (0, 0)]
        elif kind == "int":
            p = draw(st.integers(0, 3))
            padding, pads = p, [(p, p), (p, p)]
        else:
            ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            padding, pads = (ph, pw), [(ph, ph), (pw, pw)]
    sizes = []
    for k, d, (pb, pa) in zip(kernel, dilation, pads):
        lo = max(1, d * (k - 1) + 1 - pb - pa)
        if mode == "reflect":
            lo = max(lo, max(pb, pa) + 1)
        elif mode == "circular":
            lo = max(lo, max(pb, pa))
        sizes.append(draw(st.integers(lo, lo + max_extra)))
    module = nn.Conv2d(
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        bias=draw(st.booleans()),
    ).double()
    randomize_(module, draw(st.integers(0, 2**16)), zero_frac=draw(st.sampled_from([0, 0.3])))
    in_shape = (1, c_in, *sizes)
    return LayerCase(module, in_shape, out_shape_of(module, in_shape))


@st.composite
def avgpool2d_cases(draw, max_extra: int = 5) -> LayerCase:
    """An AvgPool2d with any kernel, stride (None included), padding up to half the kernel,
    ceil_mode, count_include_pad and divisor_override, on an input it accepts."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(
        st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
    )
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    if draw(st.booleans()) and padding[0] == padding[1]:
        padding = padding[0]
    pads = padding if isinstance(padding, tuple) else (padding, padding)
    sizes = [
        draw(st.integers(max(1, k - 2 * p), max(1, k - 2 * p) + max_extra))
        for k, p in zip(kernel, pads)
    ]
    channels = draw(st.integers(1, 3))
    module = nn.AvgPool2d(
        kernel,
        stride=stride,
        padding=padding,
        ceil_mode=draw(st.booleans()),
        count_include_pad=draw(st.booleans()),
        divisor_override=draw(st.one_of(st.none(), st.integers(1, 5))),
    )
    in_shape = (1, channels, *sizes)
    return LayerCase(module, in_shape, out_shape_of(module, in_shape))


@st.composite
def linear_cases(draw) -> LayerCase:
    n_in, n_out = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    module = nn.Linear(n_in, n_out, bias=draw(st.booleans())).double()
    randomize_(module, draw(st.integers(0, 2**16)), zero_frac=draw(st.sampled_from([0, 0.3])))
    return LayerCase(module, (1, n_in), (1, n_out))


@dataclass
class NetCase:
    """A drawn network, an input for it, and whether the old module's pooling applies."""

    model: nn.Sequential
    input: torch.Tensor
    pools_unpadded: bool
    weight_scale: float = 1.0

    def __repr__(self) -> str:
        return f"NetCase({self.model!r}, input={tuple(self.input.shape)})"


def _conv_for(
    draw, c_in: int, h: int, w: int, modes=PADDING_MODES, plain: bool = False
) -> nn.Conv2d:
    """A Conv2d that accepts a (c_in, h, w) input, drawn constructively; ``plain``: no groups,
    no dilation (what the old module handled)."""
    groups = 1 if plain else draw(st.sampled_from([g for g in (1, 2) if c_in % g == 0]))
    c_out = groups * draw(st.integers(1, 3 // groups + 1))
    mode = draw(st.sampled_from(modes))
    kernel, dilation, padding, stride = [], [], [], []
    for n in (h, w):
        k = draw(st.integers(1, min(3, n)))
        d = draw(st.integers(1, 2)) if 2 * (k - 1) + 1 <= n and not plain else 1
        p = draw(st.integers(0, min(k // 2 * d, _pad_limit(mode, n))))
        kernel.append(k)
        dilation.append(d)
        padding.append(p)
        stride.append(draw(st.integers(1, 2)))
    return nn.Conv2d(
        c_in,
        c_out,
        tuple(kernel),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        groups=groups,
        padding_mode=mode,
    )


def _pool_for(draw, h: int, w: int, padded: bool) -> nn.AvgPool2d:
    kernel = (draw(st.integers(1, min(3, h))), draw(st.integers(1, min(3, w))))
    padding = (
        (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
        if padded
        else 0
    )
    return nn.AvgPool2d(
        kernel,
        stride=draw(st.one_of(st.none(), st.integers(1, 2))),
        padding=padding,
        ceil_mode=draw(st.booleans()),
        count_include_pad=draw(st.booleans()),
        divisor_override=draw(st.one_of(st.none(), st.integers(1, 4))),
    )


@st.composite
def random_nets(
    draw,
    max_spatial: int = 3,
    max_linear: int = 2,
    weight_scale=None,
    seed_compatible: bool = False,
    dtype=F64,
    big_weights: bool = False,
) -> NetCase:
    """A small ``nn.Sequential`` of Conv2d / AvgPool2d (ReLU between), then Flatten and
    Linear layers, with a matching input. Weights are seeded normal values scaled by a drawn
    factor, some exactly zero. ``seed_compatible``: only what the old module computed
    correctly (zero padding, no groups or dilation, unpadded pools). ``big_weights``: also
    draw weights scaled by 300 (exp and sigmoid far out in their tails)."""
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(2, 7))
    layers: list[nn.Module] = []
    pools_unpadded = True
    shape = (1, c, h, w)
    for _ in range(draw(st.integers(0 if max_linear else 1, max_spatial))):
        if draw(st.booleans()):
            modes = ("zeros",) if seed_compatible else PADDING_MODES
            layer = _conv_for(draw, shape[1], shape[2], shape[3], modes, seed_compatible)
        else:
            padded = not seed_compatible and draw(st.booleans())
            layer = _pool_for(draw, shape[2], shape[3], padded=padded)
            pools_unpadded &= layer.padding in (0, (0, 0))
        layers += [layer, nn.ReLU()]
        shape = out_shape_of(layer.double(), shape)
    n = math.prod(shape[1:])
    n_linear = draw(st.integers(0 if layers else 1, max_linear))
    if n_linear:
        layers.append(nn.Flatten())
    for _ in range(n_linear):
        n_out = draw(st.integers(1, 8))
        layers += [nn.Linear(n, n_out), nn.ReLU()]
        n = n_out
    model = nn.Sequential(*layers[:-1]).to(dtype)
    scales = [0.3, 1.0, 4.0, 300.0] if big_weights else [0.3, 1.0, 4.0]
    scale = draw(st.sampled_from(scales)) if weight_scale is None else weight_scale
    randomize_(
        model, draw(st.integers(0, 2**16)), scale=scale, zero_frac=draw(st.sampled_from([0, 0.2]))
    )
    return NetCase(model, torch.zeros((1, c, h, w), dtype=dtype), pools_unpadded, scale)


def jacobian_t(module: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The test suite's one Jacobian oracle: ``d out_flat / d in_flat`` of the bias-free
    float64 layer, transposed to (inputs, outputs), i.e. its connectivity matrix."""
    layer = copy.deepcopy(module).double()
    if getattr(layer, "bias", None) is not None:
        layer.bias = None

    def flat(x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return layer(x.reshape(in_shape)).reshape(-1)

    # torch.func.jacrev is autograd's reverse-mode Jacobian, as
    # torch.autograd.functional.jacobian(flat, x0, vectorize=True), about 3x faster here.
    x0 = torch.zeros(math.prod(in_shape), dtype=torch.float64)
    return torch.func.jacrev(flat)(x0).t().detach()


def smallest_budget(model: nn.Module, x: torch.Tensor, **kwargs) -> int:
    """The smallest ``max_memory`` that ``report(model, x, **kwargs)`` accepts, found from
    the refusals alone: start at one byte and raise the budget by each refusal's shortfall.
    No engine internals (per-thread buffers, bytes per entry, block sizes) are assumed."""
    from foresight_sparse import MemoryBudgetError, report

    budget = 1
    for _ in range(50):
        try:
            quiet(report, model, x, max_memory=budget, **kwargs)
            return budget
        except MemoryBudgetError as exc:
            assert exc.needed > exc.budget == budget, (exc.needed, exc.budget, budget)
            budget += exc.needed - exc.budget
    raise AssertionError(f"report({kwargs}) kept refusing ever larger budgets: {budget} B")


def structural_row_counts(module: nn.Module, in_shape: tuple[int, ...]) -> np.ndarray:
    """Entries per row of the layer's connectivity matrix, zero weights included: the
    nonzeros of the Jacobian of a copy whose weights are all one (positive, so no two taps
    landing on one entry can cancel)."""
    structure = copy.deepcopy(module)
    if getattr(structure, "weight", None) is not None:
        with torch.no_grad():
            structure.weight.fill_(1.0)
    return (jacobian_t(structure, in_shape) != 0).sum(dim=1).numpy()


@pytest.fixture
def no_blocks(monkeypatch):
    """Make building any rows of any connectivity matrix fail: a test that refuses a
    matrix before allocating it proves so by passing with this fixture (no wall clock)."""
    from foresight_sparse import connectivity as C

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} built rows {args} before refusing")

    for cls in (C.Stencil, C.FullyConnected, C.ExplicitMatrix):
        for name in ("block", "rows", "block_torch"):
            if name in vars(cls):
                monkeypatch.setattr(cls, name, refuse)


# --------------------------------------------------------------------------- parallel regions
#
# Whether a kernel ran its parallel form or its serial twin changes no number, so tests
# observe it from outside: numba's ``omp`` threading layer (GNU OpenMP) terminates, with
# SIGTERM, a forked child of a process that launched it as soon as the child opens a
# parallel region, and lets a child that opens none exit normally. The two functions below
# are for scripts run in a fresh process (Linux only) by :func:`run_parallel_probe`, which
# embeds their source and sets ``NUMBA_THREADING_LAYER=omp`` and ``NUMBA_NUM_THREADS``.


def opens_parallel_region(fn, threads: int) -> bool:
    """Whether ``fn()`` opens a numba parallel region on ``threads`` numba threads: run in
    a forked child, True when the ``omp`` layer's fork guard terminated the child, False
    when it returned. ``fn`` may assert: the child's failure raises here. Call
    :func:`parallel_probe_ready` first."""
    import os
    import signal
    import sys
    import traceback

    import numba

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            numba.set_num_threads(threads)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM:
        return True
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return False
    raise AssertionError(f"the child running {fn} failed: wait status {status}")


def parallel_probe_ready() -> bool:
    """Launch numba's threading layer in this process and check that
    :func:`opens_parallel_region` sees a parallel region and its absence: False where it
    cannot (another layer than GNU OpenMP's, or a numba without one)."""
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def total(a):
        s = 0.0
        for i in numba.prange(a.size):
            s += a[i]
        return s

    a = np.ones(1 << 12)
    try:
        total(a)
        if numba.threading_layer() != "omp":
            return False
    except Exception:  # no threading layer could be loaded
        return False
    return opens_parallel_region(lambda: total(a), 2) and not opens_parallel_region(
        lambda: total.py_func(a), 2
    )


def run_parallel_probe(script: str, *args: str, env: dict | None = None) -> list[str]:
    """Run ``script`` in a fresh Python process with numba's ``omp`` layer on at least two
    threads, and return the words it prints. ``{probe}`` in the script becomes the source of
    :func:`opens_parallel_region` and :func:`parallel_probe_ready`; a script prints
    ``no probe`` where the probe is not ready, and the calling test is skipped then."""
    import subprocess
    import sys

    probe = inspect.getsource(opens_parallel_region) + inspect.getsource(parallel_probe_ready)
    env = {
        **os.environ,
        "NUMBA_THREADING_LAYER": "omp",
        "NUMBA_NUM_THREADS": str(max(2, os.cpu_count() or 1)),
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script.format(probe=probe), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "no probe":
        pytest.skip("numba's threading layer is not GNU OpenMP's: no fork guard to observe")
    return proc.stdout.split()

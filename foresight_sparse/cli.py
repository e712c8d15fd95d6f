"""The ``foresight-sparse`` command: EI of a saved or named model, layer by layer.

``foresight-sparse ei MODEL`` loads a model (:func:`foresight_sparse.models.load_model`),
runs one forward pass on ``torch.zeros`` of the input shape to find its layers, and prints
:meth:`Report.table`; ``--json``, ``--csv`` and ``--plot`` save the numbers.
``foresight-sparse layers MODEL`` lists the supported layers, their shapes and matrix sizes
without computing anything. ``foresight-sparse sweep MODEL CKPT...`` evaluates every
checkpoint of one architecture (:func:`foresight_sparse.sweep`) and exits with status 1 when
any could not be evaluated. This module only reads the command line and prints: models come
from :mod:`foresight_sparse.models`, weights from :mod:`foresight_sparse.checkpoints`, charts
from :mod:`foresight_sparse.plotting`.

Exit status: 0 on success, 2 on a usage error (the command line cannot work as written), 1
when the computation fails; the reason is printed as one line on stderr, with the options
the library's error names spelled as this command's flags (:func:`cli_message`).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import Sequence

import torch

from ._version import __version__
from .analysis import report as _report
from .backends import BACKENDS
from .budget import parse_bytes
from .checkpoints import CheckpointError
from .connectivity import LAYER_SETS
from .conventions import CONVENTIONS
from .engines import ENGINE_NAMES
from .exceptions import (
    DeviceError,
    ForesightError,
    ForesightWarning,
    ForwardError,
    MissingDependencyError,
    Opt,
    UnknownNameError,
)
from .models import DEFAULT_IMAGE_SHAPE, ModelError, UsageError, load_model
from .norms import NORMS
from .plans import plan, resolve_device
from .plotting import PLOT_HINT, check_plot_path, plot_report
from .results import _cell
from .settings import MEASURES, SKIPPED, get_measure
from .sweeps import RAY_HINT, _keep_freed_memory, sweep
from .tracing import SKIPPED_HINT

__all__ = [
    "main",
    "build_parser",
    "load_model",
    "parse_shape",
    "cli_message",
    "UsageError",
    "ModelError",
    "DEFAULT_IMAGE_SHAPE",
]

PROG = "foresight-sparse"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``foresight-sparse: error: ...`` and status 2."""

    def error(self, message: str):
        hint = f"see {self.prog} --help"
        self.exit(2, f"{PROG}: error: {message} ({hint})\n")


# --------------------------------------------------------------------------- messages

# The library's errors and warnings mark the options they name (Opt parts); on the command
# line each option is the flag that sets it. An option without a flag keeps its Python form.
_FLAGS = {
    "engine": "--engine",
    "backend": "--backend",
    "device": "--device",
    "norm": "--norm",
    "max_memory": "--max-memory",
    "input_shape": "--input-shape",
    "weights_key": "--weights-key",
    "key": "--weights-key",
    "weights": "--weights",
    "legacy": "--legacy",
    "layers": "--layers",
    "trust_pickle": "--trust-pickle",
    "measure": "--measure",
    "convention": "--convention",
    "skipped": "--skipped",
    "workers": "--workers",
}


def cli_message(message: BaseException | str) -> str:
    """A library error or warning as the command line prints it: one line, every option
    it names (:class:`~foresight_sparse.exceptions.Opt`) spelled as its flag.

    A :class:`~foresight_sparse.exceptions.ForesightError` or
    :class:`~foresight_sparse.exceptions.ForesightWarning` renders its parts with the
    flags: ``Opt("engine", "sparse", "implicit")`` reads ``--engine sparse or implicit``,
    ``Opt("max_memory")`` ``--max-memory``, ``Opt("norm", None)`` ``--norm none`` and
    ``Opt("legacy", True)`` ``--legacy``; the skipped-layers warning points to the
    ``layers`` command. Anything else (another exception, or the text of an error stored in
    a history) is printed as it reads.

    Parameters
    ----------
    message : BaseException or str
        An exception or warning (a ``Warning`` is an exception), or a message's text.

    Returns
    -------
    str
        The message as the command line prints it.
    """
    if isinstance(message, (ForesightError, ForesightWarning)):
        text = message.render(_FLAGS)
    else:
        text = str(message)
    text = text.replace(SKIPPED_HINT, "foresight-sparse layers MODEL lists them")
    return " ".join(text.split())


# --------------------------------------------------------------------------- arguments


def parse_shape(text: str) -> tuple[int, ...]:
    """Read ``"1,3,224,224"`` as ``(1, 3, 224, 224)``; every size must be a positive int."""
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(
            f"--input-shape {text!r} is not a shape; write positive sizes separated by commas, "
            "e.g. 1,3,224,224"
        )
    return shape


def _memory(text: str) -> int:
    try:
        return parse_bytes(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(cli_message(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a torchvision model name (vgg16), package.module:callable returning "
        "an nn.Module, or a TorchScript / torch.save file (a module saved "
        "whole needs --trust-pickle)",
    )
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        metavar="N,C,H,W",
        help="shape of the example input (zeros); default 1,3,224,224 for "
        "torchvision image models, required otherwise",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="weights to load into the model: a state dict, a training checkpoint "
        "(the state dict found under the usual keys), a Lightning .ckpt or a "
        ".safetensors file",
    )
    p.add_argument(
        "--weights-key",
        metavar="KEY",
        help="the checkpoint key that holds the state dict in --weights, when it "
        "is not one of the usual ones (state_dict, model, ...)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a module saved whole (MODEL or --weights): this runs "
        "code from the file, so only use it for files you trust",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the random weights of a built model (default 0)",
    )
    p.add_argument(
        "--legacy",
        action="store_true",
        help="the old module's cross-channel AvgPool2d connectivity",
    )


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--norm", choices=sorted(NORMS), default="lin", help="row normalisation (default lin)"
    )
    p.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        default="auto",
        help="how layers are reduced (default auto: implicit where exact, else sparse)",
    )
    p.add_argument("--device", default="cpu", help="where the reductions run: cpu or cuda")
    p.add_argument(
        "--max-memory",
        type=_memory,
        metavar="SIZE",
        help="working-memory budget of the engines, e.g. 2GiB (the default)",
    )
    p.add_argument(
        "--layers",
        choices=LAYER_SETS,
        default="seed",
        help="which layers count: seed (the old module's Linear, Conv2d and "
        "AvgPool2d; the default) or all (every built-in type: 1-d/3-d, "
        "transposed and adaptive layers, and subclasses that inherit forward)",
    )
    p.add_argument(
        "--measure",
        choices=tuple(MEASURES),
        default="ei",
        help="what is computed: ei (the connectivity EI; the default), perturbation (the "
        "perturbation EI of the Entropy 2020 paper: ei_parts, sensitivity, degeneracy) or "
        "svd (SVD reversibility Gamma_alpha and causal emergence)",
    )
    p.add_argument(
        "--measure-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the measure, repeatable: --measure-arg samples=100000 "
        "--measure-arg in_range=[0,1] (VALUE is read as JSON, else as text)",
    )
    p.add_argument(
        "--convention",
        choices=CONVENTIONS,
        default="seed",
        help="how the EI is split: seed (the old module's; the default) or graph (einet's "
        "determinism and degeneracy, with effectiveness)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="the numeric forms: auto (numba kernels on the CPU, torch on CUDA; the "
        "default), numba or torch",
    )
    p.add_argument(
        "--skipped",
        choices=SKIPPED,
        default="warn",
        help="warn (the default) or ignore: whether a warning names the layers that ran "
        "but do not count",
    )


def _options(args: argparse.Namespace, device: torch.device, measure) -> dict:
    """The library's options (:class:`~foresight_sparse.settings.Settings`) from the flags:
    one flag per option, with the library's defaults."""
    return dict(
        norm=args.norm,
        device=device,
        engine=args.engine,
        backend=args.backend,
        legacy=args.legacy,
        max_memory=args.max_memory,
        layers=args.layers,
        measure=measure,
        convention=args.convention,
        skipped=args.skipped,
    )


def _measure(args: argparse.Namespace):
    """The ``measure=`` argument of the command line: a name, or the measure built with
    the ``--measure-arg`` settings."""
    if not args.measure_arg:
        return args.measure
    if args.measure == "ei":
        raise UsageError("--measure-arg sets a measure's options; give --measure too")
    settings = {}
    for item in args.measure_arg:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--measure-arg {item!r}: write KEY=VALUE, e.g. samples=100000")
        try:
            settings[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            settings[key.strip()] = text
    cls = type(get_measure(args.measure))
    try:
        inspect.signature(cls).bind(**settings)
    except TypeError as exc:
        raise UsageError(f"--measure-arg: {args.measure} takes no such setting ({exc})") from None
    try:
        return cls(**settings)
    except ForesightError as exc:  # MeasureSettingsError, OptionError: keep the parts
        raise UsageError("--measure-arg: ", *exc.parts, param=exc.param) from None
    except (TypeError, ValueError) as exc:  # the measure's own checks
        raise UsageError(f"--measure-arg: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``foresight-sparse`` command."""
    parser = _Parser(
        prog=PROG,
        description="Effective information of PyTorch networks from "
        "sparse and matrix-free layer connectivity.",
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__} (torch {torch.__version__})"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    ei = sub.add_parser(
        "ei",
        help="determinism, degeneracy and EI, layer by layer",
        description="Compute determinism, degeneracy and EI of MODEL and print "
        "them layer by layer.",
    )
    _add_model_args(ei)
    _add_plan_args(ei)
    ei.add_argument(
        "--json",
        metavar="FILE",
        help="write the report as JSON (Report.save; Report.load reads it)",
    )
    ei.add_argument(
        "--csv",
        metavar="FILE",
        help="write one row per layer as CSV, after '# key: value' lines of metadata",
    )
    ei.add_argument(
        "--plot",
        metavar="FILE",
        help="chart of per-layer EI, mean row entropy and degeneracy, written to "
        "exactly FILE; its extension (.png, .pdf, .svg, ...) picks the format "
        f"(needs matplotlib: {PLOT_HINT})",
    )
    ei.add_argument("--quiet", action="store_true", help="print only the totals, no table")
    ei.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ei.set_defaults(func=_cmd_ei)

    layers = sub.add_parser(
        "layers",
        help="list the supported layers without computing",
        description="List the layers of MODEL that count towards EI, "
        "with their shapes, matrix sizes, engines and "
        "working memory (the plan), without computing "
        "anything.",
    )
    _add_model_args(layers)
    _add_plan_args(layers)
    layers.set_defaults(func=_cmd_layers)
    _add_sweep_parser(sub)
    return parser


def _add_sweep_parser(sub) -> None:
    """The ``sweep`` command: EI of every checkpoint of one architecture."""
    p = sub.add_parser(
        "sweep",
        help="EI of every checkpoint of one architecture",
        description="Compute determinism, degeneracy and EI of MODEL with the "
        "weights of each checkpoint, print one line per checkpoint "
        "and append each to --csv as it finishes. Exit status 1 "
        "when any checkpoint could not be evaluated.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="the architecture, as for 'ei': a torchvision model name, "
        "package.module:callable, or a model file",
    )
    p.add_argument(
        "checkpoints",
        metavar="CKPT",
        nargs="+",
        help="checkpoint files (state dicts, training checkpoints, Lightning .ckpt, "
        ".safetensors) or folders of them; labels, steps and epochs come from "
        "the file names (epoch=3, step=1200, ...)",
    )
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        metavar="N,C,H,W",
        help="shape of the example input (zeros); default 1,3,224,224 for "
        "torchvision image models, required otherwise",
    )
    p.add_argument(
        "--weights-key",
        metavar="KEY",
        help="the checkpoint key that holds the state dict, when it is not one of "
        "the usual ones (state_dict, model, ...)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling modules saved whole (MODEL or CKPT): this runs code "
        "from the files, so only use it for files you trust",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for building the model (its own weights are not evaluated)",
    )
    p.add_argument(
        "--legacy",
        action="store_true",
        help="the old module's cross-channel AvgPool2d connectivity",
    )
    _add_plan_args(p)
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="checkpoints evaluated at once: worker processes (default 1, in this "
        "process), or with --ray the number of Ray actors (default one per CPU of the cluster)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="evaluate the checkpoints on Ray actors, each holding the plan: on the cluster "
        "at ADDRESS ('auto', 'ray://host:10001'), or alone, on a local Ray; put it after CKPT "
        f"(needs Ray: {RAY_HINT})",
    )
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="append each checkpoint's records (network and layers) to FILE as it "
        "finishes; rewritten in checkpoint order at the end",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the checkpoints already complete in --csv and compute the rest",
    )
    p.add_argument("--json", metavar="FILE", help="write the records as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="chart of every layer's EI and the network's over the checkpoints "
        f"(needs matplotlib: {PLOT_HINT})",
    )
    p.add_argument(
        "--plane-plot",
        metavar="FILE",
        help="chart of each layer's path in the determinism-degeneracy plane",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_sweep)


# --------------------------------------------------------------------------- loading and output


def _load(args: argparse.Namespace):
    """The model and input shape of the command line, weights loaded."""
    try:
        return load_model(
            args.model,
            seed=args.seed,
            weights=args.weights,
            input_shape=args.input_shape,
            weights_key=args.weights_key,
            trust_pickle=args.trust_pickle,
        )
    except CheckpointError as exc:  # the --weights file, not the model, is wrong
        raise UsageError("--weights: ", *exc.parts, param=exc.param or "weights") from None


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _check_writable(path: str | None, option: str) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: folder {folder!r} does not exist")


def _check_plot(path: str) -> None:
    try:
        check_plot_path(path)
    except MissingDependencyError:
        raise UsageError(f"--plot needs matplotlib: {PLOT_HINT}") from None
    except UnknownNameError as exc:
        raise UsageError("--plot ", *exc.parts, param=exc.param) from None


@contextlib.contextmanager
def _shape_hint(shape: tuple[int, ...]):
    """Add the input shape used to a failed forward pass's message."""
    try:
        yield
    except ForwardError as exc:
        raise ForwardError(
            *exc.parts,
            f" (the input had shape {','.join(map(str, shape))}; set it with ",
            Opt("input_shape"),
            ")",
            param=exc.param or "input_shape",
        ) from exc


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {cli_message(message)}", file=sys.stderr)


# --------------------------------------------------------------------------- commands


def _device(text: str) -> torch.device:
    """The ``--device`` argument checked, or a usage error."""
    try:
        return resolve_device(text)
    except (UnknownNameError, DeviceError):
        if text.startswith("cuda"):
            raise UsageError(
                f"--device {text}: CUDA is not available to this torch "
                f"({torch.__version__}); use --device cpu"
            ) from None
        raise UsageError(f"--device {text!r} is not a device; use cpu or cuda") from None


def _cmd_ei(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.plot:
        _check_plot(args.plot)
    for path, option in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot")):
        _check_writable(path, option)
    measure = _measure(args)
    model, shape = _load(args)
    progress = not args.no_progress and sys.stderr.isatty()
    with _shape_hint(shape):
        rep = _report(
            model,
            torch.zeros(shape),
            progress=progress,
            **_options(args, device, measure),
        )
    rep.meta.update(
        model=args.model,
        input_shape=list(shape),
        seed=args.seed,
        weights=args.weights,
        weights_key=args.weights_key,
    )
    if args.quiet:
        print(rep.table().splitlines()[-1])
    else:
        print(
            f"{args.model}: input {_dims(shape)}, "
            f"{'' if rep.measure == 'ei' else 'measure ' + rep.measure + ', '}"
            f"{'' if rep.convention == 'seed' else 'convention ' + rep.convention + ', '}"
            f"norm {rep.norm}, engine {rep.engine}, "
            f"device {rep.device}{', legacy' if rep.legacy else ''}"
            f"{', layers all' if args.layers == 'all' else ''}"
        )
        print(rep.table())
    if args.json:
        rep.save(args.json)
    if args.csv:
        rep.save_csv(args.csv)
    if args.plot:
        plot_report(rep, args.plot, title=os.path.basename(args.model))
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    device = _device(args.device)
    measure = _measure(args)
    model, shape = _load(args)
    with _shape_hint(shape):
        p = plan(
            model,
            torch.zeros(shape),
            **_options(args, device, measure),
        )
    print(f"{args.model}: input {_dims(shape)}")
    print(p.table())
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: give a positive number")
    if args.resume and not args.csv:
        raise UsageError("--resume needs --csv FILE, the output of the run to resume")
    for path in (args.plot, args.plane_plot):
        if path:
            _check_plot(path)
    for path, option in (
        (args.csv, "--csv"),
        (args.json, "--json"),
        (args.plot, "--plot"),
        (args.plane_plot, "--plane-plot"),
    ):
        _check_writable(path, option)
    measure = _measure(args)
    model, shape = load_model(
        args.model, seed=args.seed, input_shape=args.input_shape, trust_pickle=args.trust_pickle
    )
    executor = "ray" if args.ray is not None else None
    _keep_freed_memory()  # this process is the command's: serial sweeps reuse the memory
    with _shape_hint(shape):
        res = sweep(
            model,
            args.checkpoints,
            torch.zeros(shape),
            workers=args.workers,
            executor=executor,
            key=args.weights_key,
            trust_pickle=args.trust_pickle,
            output=args.csv,
            resume=args.resume,
            progress=not args.no_progress and sys.stderr.isatty(),
            ray_address=args.ray or None,
            meta={"model": args.model, "input_shape": list(shape)},
            **_options(args, device, measure),
        )
    hist = res.history
    print(
        f"{args.model}: input {_dims(shape)}, norm {args.norm}, {len(res.checkpoints)} checkpoints"
    )
    network = [r for r in hist.records if r.kind == "network"]
    extra = [k for k in hist.columns if any(isinstance(r.extra.get(k), float) for r in network)]
    core = [
        (title, name, width)
        for title, name, width in (
            ("determinism", "determinism", 12),
            ("degeneracy", "degeneracy", 11),
            ("EI", "ei", 10),
        )
        if not network or any(getattr(r, name) is not None for r in network)
    ]
    columns = core + [(k, k, max(12, len(k))) for k in extra]
    print(
        f"{'checkpoint':<32} {'step':>8} {'epoch':>6} "
        + " ".join(f"{title:>{width}}" for title, _, width in columns)
    )
    for rec in hist.records:
        step = "" if rec.step is None else rec.step
        epoch = "" if rec.epoch is None else rec.epoch
        if rec.kind == "network":
            cells = []
            for _, name, width in columns:
                value = (
                    getattr(rec, name)
                    if name in ("determinism", "degeneracy", "ei")
                    else rec.extra.get(name)
                )
                cells.append(_cell(value, width, 6))
            print(f"{rec.label[:32]:<32} {step:>8} {epoch:>6} " + " ".join(cells))
        elif rec.kind == "error":
            print(f"{rec.label[:32]:<32} {step:>8} {epoch:>6} {'error: see below':>35}")
    if args.json:
        hist.to_json(args.json)
    drawn = len(hist.errors) < len(res.checkpoints)
    if args.plot and drawn:
        hist.plot(args.plot, title=os.path.basename(args.model))
    if args.plane_plot and drawn:
        hist.plot(args.plane_plot, kind="plane", title=os.path.basename(args.model))
    for rec in res.errors:
        # a record keeps its error as text (a history is data, saved as CSV): it reads in
        # the library's words, options as keyword arguments
        print(f"{PROG}: error: {rec.label}: {cli_message(rec.error or '')}", file=sys.stderr)
    if res.errors:
        print(
            f"{PROG}: {len(res.errors)} of {len(res.checkpoints)} checkpoints could not be "
            "evaluated",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        print(
            f"{PROG}: error: choose a command: ei, layers or sweep (see {PROG} --help)",
            file=sys.stderr,
        )
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except UsageError as exc:
            print(f"{PROG}: error: {cli_message(exc)}", file=sys.stderr)
            return 2
        except (ForesightError, RuntimeError, MemoryError, OSError) as exc:
            msg = cli_message(exc)
            if not isinstance(exc, ForesightError):
                msg = f"{type(exc).__name__}: {msg}"
            print(f"{PROG}: error: {msg}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())

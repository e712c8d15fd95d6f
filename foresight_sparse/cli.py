"""The ``foresight-sparse`` command: EI of a saved or named model, layer by layer.

``foresight-sparse ei MODEL`` loads a model, runs one forward pass on ``torch.zeros`` of the
input shape to find its layers, and prints :meth:`Report.table`; ``--json``, ``--csv`` and
``--plot`` save the numbers. ``foresight-sparse layers MODEL`` lists the supported layers,
their shapes and matrix sizes without computing anything.

MODEL is one of:

- a torchvision model name (``vgg16``), built with random weights seeded by ``--seed``;
- ``package.module:callable``, a function or class returning an ``nn.Module`` (the current
  directory is importable, as with ``python -m``);
- a file: a module saved whole with ``torch.save(model, FILE)``, or a TorchScript archive of
  a scripted ``nn.Sequential`` of torch.nn layers (``torch.jit.save(torch.jit.script(m))``),
  which is rebuilt as an eager model because TorchScript modules cannot be hooked. A
  ``torch.save`` file is unpickled with ``weights_only=False``, which runs code from the
  file: use it only for files you trust.

Exit status: 0 on success, 2 on a usage error (the command line cannot work as written), 1
when the computation fails; the reason is printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import __version__
from .analysis import report as _report
from .analysis import resolve_device
from .budget import format_bytes, parse_bytes
from .connectivity import connectivity
from .engines import ENGINE_NAMES
from .exceptions import ForesightError, ForwardError, UnknownNameError
from .norms import NORMS
from .results import LayerReport, Report
from .tracing import trace, warn_skipped

__all__ = ["main", "build_parser", "load_model", "parse_shape", "UsageError", "ModelError"]

PROG = "foresight-sparse"

#: Input shape used for torchvision classification and segmentation models.
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)

# Suffixes that make a MODEL argument a file path even when the file is missing.
_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".ts", ".jit", ".torchscript", ".bin", ".zip")
_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UsageError(Exception):
    """The command line cannot work as written (exit status 2)."""


class ModelError(Exception):
    """The model's own code failed while it was imported or built (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``foresight-sparse: error: ...`` and status 2."""

    def error(self, message: str):
        hint = f"see {self.prog} --help"
        self.exit(2, f"{PROG}: error: {message} ({hint})\n")


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
            "e.g. 1,3,224,224")
    return shape


def _memory(text: str) -> int:
    try:
        return parse_bytes(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("max_memory=", "--max-memory ")) \
            from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a torchvision model name (vgg16), package.module:callable returning "
                        "an nn.Module, or a TorchScript / torch.save file (a torch.save file "
                        "is unpickled: only use files you trust)")
    p.add_argument("--input-shape", type=parse_shape, metavar="N,C,H,W",
                   help="shape of the example input (zeros); default 1,3,224,224 for "
                        "torchvision image models, required otherwise")
    p.add_argument("--weights", metavar="FILE",
                   help="a state_dict (torch.save(model.state_dict(), FILE)) to load into "
                        "the model")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the random weights of a built model (default 0)")
    p.add_argument("--legacy", action="store_true",
                   help="the old module's cross-channel AvgPool2d connectivity")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``foresight-sparse`` command."""
    parser = _Parser(prog=PROG, description="Effective information of PyTorch networks from "
                                            "sparse and matrix-free layer connectivity.")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    ei = sub.add_parser("ei", help="determinism, degeneracy and EI, layer by layer",
                        description="Compute determinism, degeneracy and EI of MODEL and print "
                                    "them layer by layer.")
    _add_model_args(ei)
    ei.add_argument("--norm", choices=sorted(NORMS), default="lin",
                    help="row normalisation (default lin)")
    ei.add_argument("--engine", choices=ENGINE_NAMES, default="auto",
                    help="how layers are reduced (default auto: implicit where exact, else "
                         "sparse)")
    ei.add_argument("--device", default="cpu", help="where the reductions run: cpu or cuda")
    ei.add_argument("--max-memory", type=_memory, metavar="SIZE",
                    help="working-memory budget of the engines, e.g. 2GiB (the default)")
    ei.add_argument("--json", metavar="FILE", help="write Report.to_dict() as JSON")
    ei.add_argument("--csv", metavar="FILE", help="write one row per layer as CSV")
    ei.add_argument("--plot", metavar="FILE.png",
                    help="bar chart of per-layer EI and mean row entropy (needs matplotlib: "
                         "pip install foresight-sparse[plot])")
    ei.add_argument("--quiet", action="store_true", help="print only the totals, no table")
    ei.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ei.set_defaults(func=_cmd_ei)

    layers = sub.add_parser("layers", help="list the supported layers without computing",
                            description="List the layers of MODEL that count towards EI, "
                                        "with their shapes and matrix sizes, without "
                                        "computing anything.")
    _add_model_args(layers)
    layers.set_defaults(func=_cmd_layers)
    return parser


# --------------------------------------------------------------------------- loading models


def _kind(spec: str) -> str:
    """``'file'``, ``'callable'`` or ``'torchvision'``: how to read a MODEL argument."""
    if os.path.exists(spec):
        return "file"
    if _CALLABLE_RE.match(spec):
        return "callable"
    if os.sep in spec or "/" in spec or spec.lower().endswith(_FILE_SUFFIXES):
        raise UsageError(f"model file {spec!r} does not exist")
    return "torchvision"


def _torchvision_models():
    try:
        import torchvision.models as tvm
    except ImportError:
        raise UsageError("torchvision is not installed, so MODEL cannot be a torchvision "
                         "name; pip install foresight-sparse[vision], or pass "
                         "package.module:callable or a model file") from None
    return tvm


def _image_model_names(tvm) -> set[str]:
    names = set(tvm.list_models(module=tvm))
    names.update(tvm.list_models(module=tvm.segmentation))
    return names


def _from_torchvision(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...] | None]:
    tvm = _torchvision_models()
    key = name.lower()
    known = tvm.list_models()
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else \
            "; see torchvision.models.list_models()"
        raise UsageError(f"unknown model {name!r}: not a file, not package.module:callable "
                         f"and not a torchvision model name{hint}")
    builder = tvm.get_model_builder(key)
    kwargs: dict[str, Any] = {"weights": None}
    # Never download anything: detection models would fetch a pretrained backbone.
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    torch.manual_seed(seed)
    model = tvm.get_model(key, **kwargs)
    shape = DEFAULT_IMAGE_SHAPE if key in _image_model_names(tvm) else None
    return model, shape


def _from_callable(spec: str, seed: int) -> nn.Module:
    mod_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise UsageError(f"cannot import module {mod_name!r} of {spec!r}: {exc}") from None
        raise ModelError(f"importing {mod_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ModelError(f"importing {mod_name!r} failed: {type(exc).__name__}: {exc}") \
            from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {mod_name!r} has no attribute {attr_path!r}") from None
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, not a callable returning an "
                         "nn.Module")
    torch.manual_seed(seed)
    try:
        model = obj()
    except Exception as exc:
        raise ModelError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_file(path: str) -> nn.Module:
    if os.path.isdir(path):
        raise UsageError(f"model file {path!r} is a directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            model = torch.jit.load(path, map_location="cpu")
    except Exception:  # not TorchScript: try a pickled module next
        model = None
    if model is not None:
        return _unscript(model, os.path.basename(path))
    try:
        # weights_only=False unpickles arbitrary objects, i.e. runs code from the file.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file is the same usage error
        raise UsageError(f"cannot load {path!r} as a TorchScript file or a torch.save'd "
                         f"module: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise UsageError(f"{path!r} holds a {type(obj).__name__} (a state_dict?), not a "
                         "module; pass the model as a torchvision name or "
                         f"package.module:callable and add --weights {path}")
    raise UsageError(f"{path!r} holds a {type(obj).__name__}, not a torch.nn.Module")


# Layers are found with forward hooks, which TorchScript modules refuse. A scripted model built
# only of nn.Sequential and torch.nn layers is rebuilt as the eager model it was made from;
# anything else has compiled forward code that cannot be hooked, and a traced model has lost
# its layers' settings (stride, padding, ...) to the graph.

_TORCH_NN = "__torch__.torch.nn.modules."


def _unscript(module: nn.Module, where: str) -> nn.Module:
    if not isinstance(module, torch.jit.ScriptModule):
        return module
    return _rebuild(module, where, "")


def _rebuild(module, where: str, name: str) -> nn.Module:
    qual = module._c.qualified_name
    cls = getattr(nn, module.original_name, None)
    children = list(module.named_children())
    supported = qual.startswith(_TORCH_NN) and isinstance(cls, type) and \
        issubclass(cls, nn.Module)
    if supported and cls is nn.Sequential:
        return nn.Sequential(OrderedDict(
            (n, _rebuild(c, where, f"{name}.{n}" if name else n)) for n, c in children))
    if not supported or children:
        what = f"module {name!r} ({module.original_name})" if name else \
            f"its top module ({module.original_name})"
        raise UsageError(
            f"{where} is TorchScript, and {what} has compiled forward code that foresight-"
            "sparse cannot hook to find layer shapes (only nn.Sequential models of torch.nn "
            "layers are converted); save the eager model with torch.save(model, FILE) or "
            "pass package.module:callable")
    missing = [n for n in getattr(cls, "__constants__", ()) if not module._c.hasattr(n)]
    if missing:
        raise UsageError(
            f"{where} is TorchScript, and its {module.original_name} {name!r} does not keep "
            f"its settings ({', '.join(missing)}), as with torch.jit.trace; save the model "
            "with torch.jit.script or torch.save(model, FILE), or pass package.module:callable")
    return _eager_leaf(module, cls)


def _attribute_names(cls: type) -> set[str]:
    """Attributes the eager forward of a torch.nn layer may read."""
    names = set(getattr(cls, "__constants__", ()))
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not klass.__module__.startswith("torch.nn"):
            continue
        try:
            names.update(re.findall(r"self\.([A-Za-z_]\w*)", inspect.getsource(klass)))
        except (OSError, TypeError):  # pragma: no cover - source not shipped
            pass
    return names


def _eager_leaf(script, cls: type) -> nn.Module:
    leaf = cls.__new__(cls)
    nn.Module.__init__(leaf)
    for n, p in script.named_parameters(recurse=False):
        leaf.register_parameter(n, nn.Parameter(p.detach().clone(), p.requires_grad))
    for n, b in script.named_buffers(recurse=False):
        leaf.register_buffer(n, b.detach().clone())
    done = set(leaf._parameters) | set(leaf._buffers) | {"training"}
    for n in sorted(_attribute_names(cls) - done):
        if script._c.hasattr(n):
            value = getattr(script, n)
            if not isinstance(value, torch.Tensor):
                setattr(leaf, n, value)
    leaf.train(script.training)
    return leaf


def _load_weights(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same usage error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"--weights {path!r} is not a state_dict file: "
                         f"{type(exc).__name__}: {first}") from None
    if not isinstance(state, dict):
        raise UsageError(f"--weights {path!r} holds a {type(state).__name__}, not a "
                         "state_dict; save it with torch.save(model.state_dict(), FILE)")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = "; ".join(lines[:3]) or " ".join(str(exc).split())
        raise UsageError(f"--weights {path!r} does not fit the model: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise UsageError(f"--weights {path!r} does not fit the model: "
                         f"{'; '.join(problems)}")


def _few(keys: Sequence[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_model(spec: str, *, seed: int = 0, weights: str | None = None,
               input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module,
                                                                    tuple[int, ...]]:
    """The model a MODEL argument names, with ``weights`` loaded, and its input shape.

    Raises
    ------
    UsageError
        When the model cannot be found or loaded, the weights do not fit, or no input
        shape is known.
    """
    kind = _kind(spec)
    if weights is not None and not os.path.isfile(weights):
        raise UsageError(f"--weights file {weights!r} does not exist")
    default_shape = None
    if kind == "torchvision":
        model, default_shape = _from_torchvision(spec, seed)
    elif kind == "callable":
        model = _from_callable(spec, seed)
    else:
        model = _from_file(spec)
    if weights is not None:
        _load_weights(model, weights)
    shape = input_shape or default_shape
    if shape is None:
        raise UsageError(f"--input-shape is required for {spec!r} (e.g. --input-shape "
                         "1,3,224,224)")
    return model, shape


# --------------------------------------------------------------------------- output


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _write_json(rep: Report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rep.to_dict(), fh, indent=2)
        fh.write("\n")


def _write_csv(rep: Report, path: str) -> None:
    names = [f.name for f in dataclasses.fields(LayerReport)]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for layer in rep.layers:
            row = dataclasses.asdict(layer)
            row["in_shape"] = _dims(layer.in_shape)
            row["out_shape"] = _dims(layer.out_shape)
            writer.writerow(row)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install foresight-sparse[plot]") \
            from None


def _write_plot(rep: Report, path: str, title: str) -> None:
    # Figure without pyplot: no GUI backend and no global state.
    from matplotlib.figure import Figure

    names = [layer.name or layer.type for layer in rep.layers]
    x = list(range(len(names)))
    width = 0.4
    fig = Figure(figsize=(max(6.0, 0.4 * len(names) + 2.0), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar([i - width / 2 for i in x], [layer.ei for layer in rep.layers], width, label="EI")
    ax.bar([i + width / 2 for i in x], [layer.mean_row_entropy for layer in rep.layers], width,
           label="mean row entropy")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("bits")
    ax.set_title(f"{title}: EI {rep.ei:.4f} bits (determinism {rep.determinism:.4f}, "
                 f"degeneracy {rep.degeneracy:.4f})", fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)


def _check_writable(path: str | None, option: str) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: folder {folder!r} does not exist")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _shape_hint(shape: tuple[int, ...]):
    """Add the input shape used to a failed forward pass's message."""
    try:
        yield
    except ForwardError as exc:
        raise ForwardError(f"{exc} (the input had shape {','.join(map(str, shape))}; set it "
                           "with --input-shape)") from exc


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


# --------------------------------------------------------------------------- commands


def _cmd_ei(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
    except UnknownNameError:
        if args.device.startswith("cuda"):
            raise UsageError(f"--device {args.device}: CUDA is not available to this torch "
                             f"({torch.__version__}); use --device cpu") from None
        raise UsageError(f"--device {args.device!r} is not a device; use cpu or cuda") \
            from None
    if args.plot:
        _check_matplotlib()
    for path, option in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot")):
        _check_writable(path, option)
    model, shape = load_model(args.model, seed=args.seed, weights=args.weights,
                              input_shape=args.input_shape)
    progress = not args.no_progress and sys.stderr.isatty()
    with _shape_hint(shape):
        rep = _report(model, torch.zeros(shape), norm=args.norm, device=device,
                      engine=args.engine, legacy=args.legacy, max_memory=args.max_memory,
                      progress=progress)
    if args.quiet:
        print(rep.table().splitlines()[-1])
    else:
        print(f"{args.model}: input {_dims(shape)}, norm {rep.norm}, engine {rep.engine}, "
              f"device {rep.device}{', legacy' if rep.legacy else ''}")
        print(rep.table())
    if args.json:
        _write_json(rep, args.json)
    if args.csv:
        _write_csv(rep, args.csv)
    if args.plot:
        _write_plot(rep, args.plot, os.path.basename(args.model))
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    model, shape = load_model(args.model, seed=args.seed, weights=args.weights,
                              input_shape=args.input_shape)
    with _shape_hint(shape):
        tr = trace(model, torch.zeros(shape))
    head = (f"{'layer':<24} {'type':<10} {'in':>18} {'out':>18} {'rows':>10} {'cols':>10} "
            f"{'entries':>14} {'as COO':>11}")
    print(f"{args.model}: input {_dims(shape)}")
    print(head)
    print("-" * len(head))
    total = 0
    for layer in tr.layers:
        conn = connectivity(layer.module, layer.in_shape, layer.out_shape, legacy=args.legacy,
                            label=layer.label)
        nnz = conn.nnz
        total += nnz
        print(f"{layer.name[:24]:<24} {type(layer.module).__name__[:10]:<10} "
              f"{_dims(layer.in_shape):>18} {_dims(layer.out_shape):>18} {conn.n_rows:>10} "
              f"{conn.n_cols:>10} {nnz:>14} {format_bytes(conn.sparse_bytes('coo')):>11}")
    print("-" * len(head))
    print(f"{len(tr.layers)} layers, {total} entries")
    warn_skipped(tr)
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
        print(f"{PROG}: error: choose a command: ei or layers (see {PROG} --help)",
              file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except UsageError as exc:
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except (ForesightError, ModelError, RuntimeError, MemoryError, OSError) as exc:
            msg = _one_line(exc) if isinstance(exc, (ForesightError, ModelError)) else \
                f"{type(exc).__name__}: {_one_line(exc)}"
            print(f"{PROG}: error: {msg}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())

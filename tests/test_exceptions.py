"""The exceptions and warnings: every one is exported, none of the package's raises is a bare
built-in outside a named allowlist, and errors carry the option they concern as parts that
render as Python or as the command line's flags."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pickle
import pkgutil
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import foresight_sparse as fs
from foresight_sparse import exceptions, svd
from foresight_sparse.budget import parse_bytes
from foresight_sparse.checkpoints import load_state_dict
from foresight_sparse.connectivity import LayerSelection
from foresight_sparse.conventions import check_convention
from foresight_sparse.exceptions import (
    ForesightDeprecationWarning,
    ForesightError,
    ForesightFutureWarning,
    ForesightWarning,
    MeasureSettingsError,
    MemoryBudgetError,
    Opt,
    OptionError,
    ReportFileError,
    UnknownLayerError,
    UnknownNameError,
    warn_caller,
)
from foresight_sparse.geometry import conv_padding
from foresight_sparse.history import History, Record
from foresight_sparse.perturbation.estimator import check_settings
from foresight_sparse.settings import get_measure

PACKAGE = Path(fs.__file__).parent

# --------------------------------------------------------------------------- exported


def _defined_in(module) -> list[type]:
    return [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if obj.__module__ == module.__name__
    ]


def test_every_class_of_the_exceptions_module_is_in_its_all():
    missing = [c.__name__ for c in _defined_in(exceptions) if not c.__name__.startswith("_")]
    missing = [n for n in missing if n not in exceptions.__all__]
    assert not missing, f"add {missing} to foresight_sparse.exceptions.__all__"


def test_every_exception_and_warning_is_exported_by_the_package():
    classes = [c for c in _defined_in(exceptions) if issubclass(c, BaseException)]
    assert len(classes) > 15  # the scan found the module's classes
    for cls in classes:
        assert cls.__name__ in fs.__all__, f"add {cls.__name__} to foresight_sparse.__all__"
        assert getattr(fs, cls.__name__) is cls


def _package_modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], "foresight_sparse."):
        try:
            yield importlib.import_module(info.name)
        except ImportError:  # an optional integration whose package is not installed
            continue


def test_every_error_class_of_the_package_is_in_its_modules_all():
    found = []
    for module in _package_modules():
        for cls in _defined_in(module):
            if issubclass(cls, (ForesightError, ForesightWarning)):
                found.append(cls)
                assert cls.__name__ in getattr(module, "__all__", ()), (
                    f"{module.__name__}.{cls.__name__} is raised to callers but not exported"
                )
    assert {"UsageError", "ModelError", "OptionError"} <= {c.__name__ for c in found}


def test_errors_subclass_the_builtin_a_caller_expects():
    assert issubclass(OptionError, ValueError) and issubclass(OptionError, TypeError)
    assert issubclass(UnknownLayerError, KeyError)
    assert issubclass(MemoryBudgetError, MemoryError)
    assert issubclass(ForesightWarning, UserWarning)
    assert issubclass(ForesightFutureWarning, FutureWarning)
    assert issubclass(ForesightDeprecationWarning, DeprecationWarning)


# --------------------------------------------------------------------------- no bare builtins

# The built-in exceptions a public function must not let escape bare: it raises the exported
# ForesightError subclass that derives from it instead. NotImplementedError (abstract
# methods) and AssertionError (impossible branches) are not on the list.
BARE = {
    name
    for name in dir(builtins)
    if isinstance(getattr(builtins, name), type)
    and issubclass(getattr(builtins, name), BaseException)
    and not issubclass(getattr(builtins, name), Warning)
} - {"NotImplementedError", "AssertionError", "BaseException"}


# Raises that stay bare on purpose: (file, enclosing function, exception) -> why.
KEPT = {
    ("metatwin.py", "_shape_only_batchnorm.forward", "RuntimeError"): (
        "the meta twin's batch norm fails as torch's own would; trace() catches it and "
        "runs the real forward pass"
    ),
    ("history.py", "_record_from_row", "TypeError"): (
        "caught three lines below and raised again as HistoryFileError"
    ),
    ("ei.py", "_ValidModules.__getitem__", "KeyError"): (
        "the mapping protocol: VALID_MODULES is a drop-in for the old module's dict, whose "
        "missing key is a bare KeyError (Mapping.get and `in` rely on it)"
    ),
    ("ei.py", "_ValidModules.__delitem__", "KeyError"): (
        "the mapping protocol, as for __getitem__"
    ),
    ("sweeps.py", "__getattr__", "AttributeError"): (
        "the module __getattr__ protocol: hasattr() and getattr(..., default) rely on it"
    ),
}


def _bare_raises(path: Path):
    """``(enclosing function, exception, line)`` of every ``raise Builtin(...)`` in path."""
    found = []
    scope: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_scope(self, node):
            scope.append(node.name)
            self.generic_visit(node)
            scope.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_scope

        def visit_Raise(self, node):
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BARE:
                found.append((".".join(scope), exc.id, node.lineno))

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_the_scan_finds_bare_raises(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    raise ValueError('x')\n\ndef g():\n    raise NotImplementedError\n",
        encoding="utf-8",
    )
    assert _bare_raises(probe) == [("f", "ValueError", 2)]


def test_no_public_function_raises_a_bare_builtin():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for where, name, line in _bare_raises(path):
            if (rel, where, name) not in KEPT:
                bad.append(f"{rel}:{line} ({where}) raises a bare {name}")
    assert not bad, "raise the exported ForesightError subclass instead:\n" + "\n".join(bad)


# The calls whose arguments are an error's or a warning's message parts.
_MESSAGE_CALLS = {"warn_caller", "check_budget"}


def _options_spelled_as_text(path: Path, options) -> list[tuple[int, str]]:
    """``(line, text)`` of every message string, in a raise or a warning, that writes one
    of ``options`` as ``name=``: such an option reads as Python on the command line too,
    where it should be an :class:`Opt` that renders as the flag."""
    pattern = re.compile(rf"(?<![\w.])({'|'.join(map(re.escape, options))})=")
    found = []

    def texts(node):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Opt":
            return  # an Opt's own arguments are the option, not text
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node
        for child in ast.iter_child_nodes(node):
            yield from texts(child)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        call = node.func if isinstance(node, ast.Call) else None
        name = getattr(call, "id", getattr(call, "attr", None))
        if isinstance(node, ast.Raise) or name in _MESSAGE_CALLS:
            found += [(c.lineno, c.value) for c in texts(node) if pattern.search(c.value)]
    return sorted(set(found))


def test_the_text_option_scan_finds_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    raise OptionError(f'use engine=sparse', Opt('engine', 'x=1'))\n",
        encoding="utf-8",
    )
    assert _options_spelled_as_text(probe, ["engine"]) == [(2, "use engine=sparse")]


def test_no_message_spells_a_flagged_option_as_text():
    from foresight_sparse.cli import _FLAGS

    bad = [
        f"{path.relative_to(PACKAGE).as_posix()}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, text in _options_spelled_as_text(path, _FLAGS)
    ]
    assert not bad, "write the option as an Opt part, which the CLI shows as its flag:\n" + (
        "\n".join(bad)
    )


def test_every_kept_raise_is_still_there():
    for rel, where, name in KEPT:
        sites = [(w, n) for w, n, _ in _bare_raises(PACKAGE / rel)]
        assert (where, name) in sites, f"remove ({rel}, {where}, {name}) from KEPT"


# --------------------------------------------------------------------------- param and parts


def _error(call, *args, **kwargs) -> ForesightError:
    with pytest.raises(ForesightError) as info:
        call(*args, **kwargs)
    return info.value


def _conv():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_a_budget_too_small_is_a_memory_budget_error_about_max_memory():
    x = torch.zeros(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exc = _error(fs.report, _conv(), x, max_memory=16, engine="sparse")
    assert isinstance(exc, MemoryBudgetError) and exc.param == "max_memory"
    assert exc.budget == 16 and exc.needed > 16
    assert "max_memory is 16 B" in str(exc)
    assert "--max-memory is 16 B" in exc.render({"max_memory": "--max-memory"})


@pytest.mark.parametrize(
    "make, cls, param",
    [
        (
            lambda: fs.report(nn.Linear(3, 2), torch.zeros(1, 3), norm="foo"),
            UnknownNameError,
            "norm",
        ),
        (lambda: fs.report(nn.Linear(3, 2), torch.zeros(1, 3), norm=3), OptionError, "norm"),
        (lambda: parse_bytes("lots"), OptionError, "max_memory"),
        (lambda: parse_bytes([1]), OptionError, "max_memory"),
        (lambda: check_convention("einet", None), UnknownNameError, "convention"),
        (lambda: get_measure("phi"), UnknownNameError, "measure"),
        (lambda: LayerSelection("most"), UnknownNameError, "layers"),
        (lambda: svd.Reversibility(alpha=3.0), OptionError, "alpha"),
        (lambda: svd.Reversibility(alpha="x"), OptionError, "alpha"),
        (lambda: check_settings(in_bins=1), MeasureSettingsError, "in_bins"),
        (lambda: conv_padding("full", (3,), (1,)), UnknownNameError, "padding"),
        (lambda: fs.unregister(nn.Bilinear), UnknownLayerError, "module_type"),
        (lambda: History().series("nope"), UnknownLayerError, "layer"),
        (lambda: Record(kind="odd", label="x"), UnknownNameError, "kind"),
    ],
)
def test_errors_carry_the_option_they_concern(make, cls, param):
    exc = _error(make)
    assert type(exc) is cls, repr(exc)
    assert exc.param == param


def test_a_wrong_checkpoint_key_names_key(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"ema": nn.Linear(2, 2).state_dict(), "student": {}}, path)
    exc = _error(load_state_dict, path, key="teacher")
    assert exc.param == "key"
    exc = _error(load_state_dict, path)
    assert exc.param == "key" and str(exc).endswith("choose one with key=NAME")
    assert exc.render({"key": "--weights-key"}).endswith("choose one with --weights-key NAME")


def test_an_unknown_layer_reads_as_its_message_though_a_keyerror():
    exc = _error(History().series, "nope")
    assert str(exc).startswith("the history has no layer 'nope'")  # not quoted as KeyError


def test_a_message_wrapped_by_another_keeps_its_parts(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"determinism": 1.0}', encoding="utf-8")
    exc = _error(fs.Report.load, path)
    assert isinstance(exc, ReportFileError)
    assert exc.parts[0] == f"{str(path)!r}: " and "needs" in exc.parts[1]


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "opt, python, cli",
    [
        (
            Opt("engine", "sparse", "implicit"),
            "engine='sparse' or 'implicit'",
            "--engine sparse or implicit",
        ),
        (
            Opt("norm", "lin", "soft", "sig"),
            "norm='lin', 'soft' or 'sig'",
            "--norm lin, soft or sig",
        ),
        (Opt("norm", None), "norm=None", "--norm none"),
        (Opt("max_memory"), "max_memory", "--max-memory"),
        (Opt("legacy", True), "legacy=True", "--legacy"),
        (Opt("legacy", False), "legacy=False", "no --legacy"),
        (Opt("key", metavar="NAME"), "key=NAME", "--weights-key NAME"),
        (Opt("weights", metavar=""), "weights=", "--weights"),
        (Opt("alpha", 1.5), "alpha=1.5", "alpha=1.5"),  # no flag: stays Python
    ],
)
def test_an_option_renders_as_python_or_as_its_flag(opt, python, cli):
    flags = {
        "engine": "--engine",
        "norm": "--norm",
        "max_memory": "--max-memory",
        "legacy": "--legacy",
        "key": "--weights-key",
        "weights": "--weights",
    }
    assert opt.render() == python
    assert opt.render(flags) == cli
    exc = OptionError("use ", opt, "!")
    assert str(exc) == f"use {python}!" and exc.render(flags) == f"use {cli}!"
    assert exc.param == opt.name


def test_param_defaults_to_the_first_option_and_can_be_given():
    assert ForesightError("a ", Opt("norm"), " and ", Opt("engine")).param == "norm"
    assert ForesightError("a ", Opt("norm"), param="device").param == "device"
    assert ForesightError("no option").param is None


@pytest.mark.parametrize(
    "exc",
    [
        OptionError(Opt("max_memory", "lots"), " is not a byte count"),
        MemoryBudgetError("x needs ", Opt("max_memory"), needed=10, budget=5),
        UnknownLayerError("no layer 'a'", param="layer"),
        ForesightWarning("skipped ", Opt("layers", "all"), param="layers"),
    ],
)
def test_errors_and_warnings_pickle_with_their_parts(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert back.param == exc.param
    assert back.render({"max_memory": "--max-memory", "layers": "--layers"}) == exc.render(
        {"max_memory": "--max-memory", "layers": "--layers"}
    )
    if isinstance(exc, MemoryBudgetError):
        assert (back.needed, back.budget) == (10, 5)


# --------------------------------------------------------------------------- warnings


def test_the_skipped_layers_warning_is_a_foresight_warning_with_parts():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))
    with pytest.warns(ForesightWarning, match="skipped layers with no connectivity") as caught:
        fs.plan(model, torch.zeros(1, 3, 8, 8))
    warning = next(w for w in caught if "skipped layers" in str(w.message))
    assert warning.filename == __file__  # pointed at this line, not the package's
    assert isinstance(warning.message, UserWarning)
    assert "".join(map(str, warning.message.parts)) == str(warning.message)


@pytest.mark.parametrize(
    "category, cls",
    [
        (UserWarning, ForesightWarning),
        (ForesightWarning, ForesightWarning),
        (FutureWarning, ForesightFutureWarning),
        (DeprecationWarning, ForesightDeprecationWarning),
    ],
)
def test_warn_caller_keeps_the_parts_in_every_category(category, cls):
    with pytest.warns(category) as caught:
        warn_caller("pass ", Opt("engine", "sparse"), category=category)
    (w,) = caught
    assert type(w.message) is cls and isinstance(w.message, category)
    assert str(w.message) == "pass engine='sparse'" and w.message.param == "engine"
    assert w.message.render({"engine": "--engine"}) == "pass --engine sparse"
    assert w.filename == __file__


def test_warn_caller_takes_the_category_as_its_last_positional_argument():
    with pytest.warns(FutureWarning) as caught:
        warn_caller("use ", Opt("executor", "process"), FutureWarning)
    (w,) = caught
    assert type(w.message) is ForesightFutureWarning
    assert str(w.message) == "use executor='process'"


def test_warn_caller_gives_another_category_the_text():
    with pytest.warns(RuntimeWarning, match=r"^pass engine='sparse'$") as caught:
        warn_caller("pass ", Opt("engine", "sparse"), category=RuntimeWarning)
    assert type(caught[0].message) is RuntimeWarning

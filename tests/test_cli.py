"""The ``foresight-sparse`` command: every MODEL form, every output, every exit status.

Most tests call :func:`foresight_sparse.cli.main` in-process; two run the installed command
in a subprocess to check the entry points. Numbers written by ``--json`` must equal
:func:`foresight_sparse.report` on the same model exactly.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from _cli_models import SHAPE, TinyNet, tiny_cnn
from conftest import quiet, structural_row_counts
from torch import nn

import foresight_sparse
from foresight_sparse import Report, reference, svd
from foresight_sparse.budget import parse_bytes
from foresight_sparse.checkpoints import load_state_dict
from foresight_sparse.cli import cli_message, main
from foresight_sparse.connectivity import LayerSelection
from foresight_sparse.conventions import check_convention
from foresight_sparse.exceptions import ForesightWarning
from foresight_sparse.models import load_model
from foresight_sparse.norms import get_norm
from foresight_sparse.settings import get_measure
from foresight_sparse.tracing import trace

SHAPE_ARG = ",".join(map(str, SHAPE))
SMALL_IMAGE = "1,3,64,64"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: exit status, stdout, stderr."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def expected(model: nn.Module, shape=SHAPE, **kwargs) -> dict:
    """What ``--json`` must hold: the library's report on the same model, without timings."""
    rep = quiet(foresight_sparse.report, model, torch.zeros(shape), **kwargs)
    return _numbers(rep.to_dict())


def _numbers(d: dict) -> dict:
    """The report's numbers and settings: no timings, no creation time, no metadata."""
    d = dict(d)
    for key in ("seconds", "created", "meta"):
        d.pop(key)
    d["layers"] = [{k: v for k, v in layer.items() if k != "seconds"} for layer in d["layers"]]
    return d


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return _numbers(json.load(fh))


def seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def assert_usage_error(rc: int, err: str, *fragments: str, status: int = 2) -> None:
    """One line on stderr, ``foresight-sparse: error: ...``, no traceback."""
    assert rc == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("foresight-sparse: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


# --------------------------------------------------------------------------- MODEL forms


def test_torchvision_name_matches_report(capsys, tmp_path):
    out_json = tmp_path / "alexnet.json"
    rc, out, err = run(capsys, "ei", "alexnet", "--input-shape", SMALL_IMAGE, "--json", out_json)
    assert rc == 0, err
    model = seeded(lambda: torchvision.models.get_model("alexnet", weights=None))
    assert read_json(out_json) == expected(model, (1, 3, 64, 64))
    assert "classifier.6" in out and "network: determinism" in out
    # The library's warning about skipped layers, as one line without a source location.
    assert err.startswith("foresight-sparse: warning: skipped layers") and "MaxPool2d" in err
    assert len(err.strip().splitlines()) == 1


def test_callable_matches_report(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--json", out_json
    )
    assert rc == 0, err
    assert err == ""  # no progress bar when stderr is not a terminal, nothing skipped
    got = read_json(out_json)
    assert got == expected(seeded(tiny_cnn))
    assert [layer["name"] for layer in got["layers"]] == ["0", "2", "3", "5"]
    assert f"EI {got['ei']:.6f} bits" in out


def test_callable_may_name_a_module_instance(capsys, tmp_path):
    import _cli_models

    out_json = tmp_path / "r.json"
    rc, _, err = run(
        capsys, "ei", "_cli_models:INSTANCE", "--input-shape", SHAPE_ARG, "--json", out_json
    )
    assert rc == 0, err
    assert read_json(out_json) == expected(_cli_models.INSTANCE)


def test_seed_changes_the_random_weights(capsys, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for seed, path in ((0, a), (1, b)):
        rc, _, err = run(
            capsys,
            "ei",
            "_cli_models:tiny_cnn",
            "--input-shape",
            SHAPE_ARG,
            "--seed",
            seed,
            "--json",
            path,
        )
        assert rc == 0, err
    assert read_json(b) == expected(seeded(tiny_cnn, 1))
    assert read_json(a)["ei"] != read_json(b)["ei"]


def _save_torchscript(model: nn.Module, path, how: str = "script") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        scripted = (
            torch.jit.script(model)
            if how == "script"
            else torch.jit.trace(model, torch.zeros(SHAPE))
        )
        torch.jit.save(scripted, str(path))


def test_torchscript_file(capsys, tmp_path):
    model = seeded(tiny_cnn, 3)
    path = tmp_path / "model.ts"
    _save_torchscript(model, path)
    out_json = tmp_path / "r.json"
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG, "--json", out_json)
    assert rc == 0, err
    assert read_json(out_json) == expected(model)


def test_traced_torchscript_is_a_usage_error(capsys, tmp_path):
    # A traced module keeps weights but not stride, padding, ...: it cannot be rebuilt.
    path = tmp_path / "model.ts"
    _save_torchscript(tiny_cnn(), path, "trace")
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG)
    assert_usage_error(rc, err, "does not keep its settings", "torch.jit.script")


def test_torchscript_with_its_own_forward_is_a_usage_error(capsys, tmp_path):
    path = tmp_path / "net.ts"
    _save_torchscript(TinyNet(), path)
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG)
    assert_usage_error(rc, err, "TorchScript", "torch.save(model, FILE)")


def test_torch_save_file_needs_trust_pickle(capsys, tmp_path):
    model = seeded(TinyNet, 4)
    path = tmp_path / "net.pt"
    torch.save(model, path)
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG)
    assert_usage_error(
        rc,
        err,
        "net.pt",
        "pickled",
        "TinyNet",
        "runs code from the file",
        "--trust-pickle",
        "--weights",
    )
    out_json = tmp_path / "r.json"
    rc, _, err = run(
        capsys, "ei", path, "--input-shape", SHAPE_ARG, "--json", out_json, "--trust-pickle"
    )
    assert rc == 0, err
    assert read_json(out_json) == expected(model)


@pytest.mark.parametrize("trust", [[], ["--trust-pickle"]])
def test_torch_save_of_a_main_class_explains(capsys, tmp_path, monkeypatch, trust):
    # A class defined in the script that saved the model pickles as __main__.<name>.
    main_module = sys.modules["__main__"]
    cls = type("ScriptNet", (nn.Sequential,), {"__module__": "__main__"})
    monkeypatch.setattr(main_module, "ScriptNet", cls, raising=False)
    path = tmp_path / "script.pt"
    torch.save(cls(nn.Linear(4, 2)), path)
    monkeypatch.delattr(main_module, "ScriptNet")
    rc, _, err = run(capsys, "ei", path, "--input-shape", "1,4", *trust)
    assert_usage_error(
        rc,
        err,
        "ScriptNet",
        "__main__",
        "define the class in a module",
        "state dict",
        "package.module:callable",
        "--weights",
    )


def _save_weights(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("layout", ["bare", "checkpoint", "ddp", "lightning", "safetensors"])
def test_weights_file_layouts(capsys, tmp_path, layout):
    trained = seeded(tiny_cnn, 7)
    sd = trained.state_dict()
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    if layout == "bare":
        path = _save_weights(tmp_path, "w.pt", sd)
    elif layout == "checkpoint":
        path = _save_weights(
            tmp_path, "ckpt.pt", {"model": sd, "epoch": 3, "optimizer": opt.state_dict()}
        )
    elif layout == "ddp":
        path = _save_weights(tmp_path, "ddp.pth", {f"module.{k}": v for k, v in sd.items()})
    elif layout == "lightning":
        path = _save_weights(
            tmp_path,
            "last.ckpt",
            {
                "epoch": 3,
                "global_step": 120,
                "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in sd.items()},
                "optimizer_states": [opt.state_dict()],
                "lr_schedulers": [],
                "callbacks": {},
                "hyper_parameters": {"lr": 0.1},
            },
        )
    else:
        import safetensors.torch as safetensors_torch

        path = str(tmp_path / "w.safetensors")
        safetensors_torch.save_file(sd, path)
    out_json = tmp_path / "r.json"
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--json",
        out_json,
        "--weights",
        path,
    )
    assert rc == 0, err
    assert read_json(out_json) == expected(trained)
    assert Report.load(out_json).meta["weights"] == path


def test_weights_key_chooses_and_a_wrong_key_names_candidates(capsys, tmp_path):
    trained = seeded(tiny_cnn, 7)
    path = _save_weights(tmp_path, "ckpt.pt", {"ema": trained.state_dict(), "epoch": 3})
    rc, _, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--weights", path
    )
    assert_usage_error(rc, err, "--weights", "'ema'", "--weights-key NAME")
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--weights",
        path,
        "--weights-key",
        "emma",
    )
    assert_usage_error(rc, err, "no key 'emma'", "'ema'")
    out_json = tmp_path / "r.json"
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--weights",
        path,
        "--weights-key",
        "ema",
        "--json",
        out_json,
    )
    assert rc == 0, err
    assert read_json(out_json) == expected(trained)
    assert Report.load(out_json).meta["weights_key"] == "ema"


def test_weights_holding_a_pickled_module_need_trust(capsys, tmp_path):
    trained = seeded(tiny_cnn, 7)
    path = _save_weights(tmp_path, "whole.pt", trained)
    rc, _, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--weights", path
    )
    assert_usage_error(rc, err, "--weights", "pickled code", "--trust-pickle")
    out_json = tmp_path / "r.json"
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--weights",
        path,
        "--trust-pickle",
        "--json",
        out_json,
    )
    assert rc == 0, err
    assert read_json(out_json) == expected(trained)


def test_weights_state_dict_round_trip(capsys, tmp_path):
    trained = seeded(tiny_cnn, 7)
    weights = tmp_path / "w.pt"
    torch.save(trained.state_dict(), weights)
    with_w, without = tmp_path / "with.json", tmp_path / "without.json"
    for path, extra in ((with_w, ["--weights", weights]), (without, [])):
        rc, _, err = run(
            capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--json", path, *extra
        )
        assert rc == 0, err
    assert read_json(with_w) == expected(trained)
    assert read_json(with_w)["ei"] != read_json(without)["ei"]


def test_weights_that_do_not_fit(capsys, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(TinyNet().state_dict(), weights)
    rc, _, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--weights", weights
    )
    assert_usage_error(
        rc,
        err,
        "does not fit the model",
        "missing",
        "unexpected",
        "closest match of '0.weight' is 'features.0.weight'",
    )


def test_state_dict_given_as_model(capsys, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_cnn().state_dict(), path)
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG)
    assert_usage_error(
        rc, err, "holds an OrderedDict (a state dict): pass it with --weights to a model"
    )


def test_checkpoint_given_as_model(capsys, tmp_path):
    path = _save_weights(tmp_path, "ckpt.pt", {"model": tiny_cnn().state_dict(), "epoch": 3})
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG)
    assert_usage_error(rc, err, "'model', 'epoch'", "training checkpoint", "--weights")


# --------------------------------------------------------------------------- options and outputs


def test_options_reach_the_library(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--norm",
        "soft",
        "--engine",
        "sparse",
        "--legacy",
        "--max-memory",
        "1MiB",
        "--device",
        "cpu",
        "--json",
        out_json,
    )
    assert rc == 0, err
    got = read_json(out_json)
    assert got == expected(
        seeded(tiny_cnn), norm="soft", engine="sparse", legacy=True, max_memory="1MiB"
    )
    assert (got["norm"], got["engine"], got["legacy"]) == ("soft", "sparse", True)
    assert "norm soft, engine sparse, device cpu, legacy" in out


def test_csv_has_one_row_per_layer(capsys, tmp_path):
    out_csv = tmp_path / "r.csv"
    rc, _, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--csv", out_csv
    )
    assert rc == 0, err
    with open(out_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    want = expected(seeded(tiny_cnn))["layers"]
    assert [r["name"] for r in rows] == [layer["name"] for layer in want]
    for row, layer in zip(rows, want):
        assert row["in_shape"] == "x".join(map(str, layer["in_shape"]))
        assert int(row["nnz"]) == layer["nnz"]
        assert float(row["ei"]) == layer["ei"]
        assert float(row["mean_row_entropy"]) == layer["mean_row_entropy"]


@pytest.mark.parametrize(
    "name, magic", [("r.png", b"\x89PNG\r\n\x1a\n"), ("r.pdf", b"%PDF"), ("r.SVG", b"<?xml")]
)
def test_plot_writes_exactly_the_file(capsys, tmp_path, name, magic):
    out = tmp_path / name
    rc, _, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--plot", out
    )
    assert rc == 0, err
    assert out.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("out", ["has no extension", ".png", ".pdf", ".svg"]),
        ("out.xyz", ["cannot write .xyz", ".png", ".svg"]),
    ],
)
def test_plot_refuses_unknown_formats(capsys, tmp_path, name, fragments):
    rc, out, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--plot", tmp_path / name
    )
    assert_usage_error(rc, err, "--plot", *fragments)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--plot",
        tmp_path / "r.png",
    )
    assert_usage_error(rc, err, "pip install 'foresight-sparse[plot]'")
    assert not (tmp_path / "r.png").exists()


def test_json_describes_itself_and_loads_back(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--seed",
        "3",
        "--norm",
        "soft",
        "--json",
        out_json,
    )
    assert rc == 0, err
    with open(out_json, encoding="utf-8") as fh:
        data = json.load(fh)
    assert data["meta"] == {
        "model": "_cli_models:tiny_cnn",
        "input_shape": list(SHAPE),
        "seed": 3,
        "weights": None,
        "weights_key": None,
    }
    assert data["version"] == foresight_sparse.__version__
    assert data["torch_version"] == torch.__version__
    assert (data["norm"], data["engine"], data["device"]) == ("soft", "auto", "cpu")
    rep = Report.load(out_json)
    assert rep == Report.from_dict(data)
    assert rep.to_dict() == data


def test_csv_leads_with_metadata(capsys, tmp_path):
    out_csv = tmp_path / "r.csv"
    out_json = tmp_path / "r.json"
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--csv",
        out_csv,
        "--json",
        out_json,
    )
    assert rc == 0, err
    lines = out_csv.read_text(encoding="utf-8").splitlines()
    comments = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert comments["model"] == "_cli_models:tiny_cnn"
    assert json.loads(comments["input_shape"]) == list(SHAPE)
    assert comments["seed"] == "0" and comments["norm"] == "lin"
    assert comments["version"] == foresight_sparse.__version__
    assert comments["torch_version"] == torch.__version__
    assert comments["created"] == data["created"]
    assert float(comments["ei"]) == data["ei"]
    assert json.loads(comments["max_memory"]) == data["max_memory"]


def test_quiet_prints_only_the_totals(capsys):
    rc, out, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--quiet")
    assert rc == 0, err
    rep = expected(seeded(tiny_cnn))
    assert out.count("\n") == 1
    assert out.startswith("network: determinism") and f"EI {rep['ei']:.6f}" in out


@pytest.mark.parametrize("flag, shown", [([], True), (["--no-progress"], False)])
def test_progress_bar_on_a_terminal(capsys, monkeypatch, flag, shown):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, *flag)
    assert rc == 0, err
    assert ("4/4" in err and "layer" in err) is shown, err


def test_layers_lists_entries_without_computing(capsys):
    rc, out, err = run(capsys, "layers", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG)
    assert rc == 0, err
    model = seeded(tiny_cnn)
    tr = trace(model, torch.zeros(SHAPE))
    # entries counted from each layer's Jacobian, at the shapes the reference's hooks record
    shapes = reference.get_shapes(model, torch.zeros(SHAPE))
    nnz = [int(structural_row_counts(m, in_shape).sum()) for m, (in_shape, _) in shapes.items()]
    body = out.splitlines()[3 : 3 + len(nnz)]
    assert [line.split()[0] for line in body] == [layer.name for layer in tr.layers]
    assert [int(line.split()[6]) for line in body] == nnz
    assert out.splitlines()[-1].startswith(f"{len(nnz)} layers, {sum(nnz)} entries; norm lin")
    # the planned engines are those that serve the layers when EI is computed
    rep = foresight_sparse.report(seeded(tiny_cnn), torch.zeros(SHAPE))
    served = [layer.engine for layer in rep.layers]
    assert [line.split()[7] for line in body] == served


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert main(["ei", "--help"]) == 0
    assert main(["--version"]) == 0
    assert foresight_sparse.__version__ in capsys.readouterr().out


# --------------------------------------------------------------------------- exit statuses


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["ei", "alexnetx"], ["unknown model 'alexnetx'", "did you mean alexnet"]),
        (["ei", "_cli_models:tiny_cnn"], ["--input-shape is required"]),
        (["ei", "alexnet", "--input-shape", "1,3,x"], ["--input-shape", "1,3,224,224"]),
        (["ei", "alexnet", "--input-shape", "1,0,8,8"], ["--input-shape"]),
        (["ei", "alexnet", "--input-shape", ""], ["--input-shape"]),
        (["ei", "alexnet", "--norm", "max"], ["--norm", "invalid choice"]),
        (["ei", "alexnet", "--engine", "magic"], ["--engine", "invalid choice"]),
        (["ei", "alexnet", "--max-memory", "lots"], ["--max-memory", "GiB"]),
        (["ei", "alexnet", "--device", "tpu"], ["--device"]),
        (["ei", "missing.pt", "--input-shape", SHAPE_ARG], ["'missing.pt' does not exist"]),
        (["ei", "alexnet", "--weights", "missing.pt"], ["--weights", "does not exist"]),
        (["ei", "no_such_module_xyz:f", "--input-shape", "1,2"], ["cannot import"]),
        (["ei", "_cli_models:nope", "--input-shape", "1,2"], ["no attribute 'nope'"]),
        (["ei", "_cli_models:not_a_module", "--input-shape", "1,2"], ["not a torch.nn.Module"]),
        (
            [
                "ei",
                "_cli_models:tiny_cnn",
                "--input-shape",
                SHAPE_ARG,
                "--json",
                "/no/such/d/r.json",
            ],
            ["--json", "does not exist"],
        ),
        (["frobnicate"], ["invalid choice"]),
        ([], ["choose a command"]),
    ],
)
def test_usage_errors_exit_2(capsys, argv, fragments):
    rc, out, err = run(capsys, *argv)
    assert_usage_error(rc, err, *fragments)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(capsys):
    rc, _, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--device", "cuda"
    )
    assert_usage_error(rc, err, "--device cuda", "CUDA is not available", "--device cpu")


def test_forward_failure_in_the_top_module_names_its_class(capsys):
    rc, _, err = run(capsys, "ei", "_cli_models:FlattensWrongly", "--input-shape", SHAPE_ARG)
    assert_usage_error(
        rc, err, "forward pass failed", "FlattensWrongly (the top-level module)", status=1
    )
    assert "''" not in err


def _raised(call, *args, **kwargs) -> Exception:
    """The library error ``call(*args, **kwargs)`` raises."""
    with pytest.raises(foresight_sparse.ForesightError) as info:
        call(*args, **kwargs)
    return info.value


def _bad_checkpoint(tmp_path) -> str:
    path = tmp_path / "two.pt"
    torch.save({"ema": TinyNet().state_dict(), "student": TinyNet().state_dict()}, path)
    return str(path)


def _state_dict_file(tmp_path) -> str:
    path = tmp_path / "sd.pt"
    torch.save(TinyNet().state_dict(), path)
    return str(path)


@pytest.mark.parametrize(
    "make, python, cli",
    [
        (
            lambda _: _raised(parse_bytes, "lots"),
            "max_memory='lots' is not a byte count",
            "--max-memory lots is not a byte count",
        ),
        (
            lambda _: _raised(parse_bytes, float("inf")),
            "max_memory must be a finite number",
            "--max-memory must be a finite number",
        ),
        (
            lambda _: _raised(check_convention, "graph", get_norm(None)),
            "convention='graph' needs rows that are distributions, but norm='none' does not "
            "normalise them; use norm='lin', 'soft' or 'sig'",
            "--convention graph needs rows that are distributions, but --norm none does not "
            "normalise them; use --norm lin, soft or sig",
        ),
        (
            lambda _: _raised(get_measure, "phi"),
            "unknown measure='phi'",
            "unknown --measure phi",
        ),
        (
            lambda _: _raised(LayerSelection, "most"),
            "unknown layers='most'",
            "unknown --layers most",
        ),
        (
            lambda tmp: _raised(load_state_dict, _bad_checkpoint(tmp)),
            "choose one with key=NAME",
            "choose one with --weights-key NAME",
        ),
        (
            lambda tmp: _raised(load_model, _state_dict_file(tmp)),
            "pass it with weights= to a model",
            "pass it with --weights to a model",
        ),
        (
            lambda _: _raised(load_model, "_cli_models:tiny_cnn"),
            "input_shape= is required",
            "--input-shape is required",
        ),
        (  # an option without a flag keeps its Python form
            lambda _: _raised(svd.Reversibility, alpha=3.0),
            "alpha=3.0 is outside (0, 2)",
            "alpha=3.0 is outside (0, 2)",
        ),
    ],
)
def test_cli_message_spells_the_options_of_real_errors_as_flags(tmp_path, make, python, cli):
    exc = make(tmp_path)
    assert python in str(exc)
    assert cli in cli_message(exc)
    assert python not in cli_message(exc) or python == cli


def test_cli_message_prints_other_text_as_it_reads():
    # an error kept as text (a sweep's record) and a foreign exception are not rewritten
    assert cli_message("use engine='sparse',\n or raise max_memory") == (
        "use engine='sparse', or raise max_memory"
    )
    assert cli_message(ValueError("norm='soft' is bad")) == "norm='soft' is bad"


def test_cli_message_renders_warnings_and_points_to_the_layers_command():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))
    with pytest.warns(ForesightWarning, match="skipped layers") as caught:
        foresight_sparse.plan(model, torch.zeros(1, 3, 8, 8))
    (warning,) = [w.message for w in caught if "skipped layers" in str(w.message)]
    assert "foresight_sparse.plan(model, input).skipped" in str(warning)
    assert cli_message(warning).endswith("foresight-sparse layers MODEL lists them")


@pytest.mark.parametrize(
    "engine",
    [
        "sparse",
        "dense",
    ],
)
def test_memory_budget_error_names_the_flags(capsys, engine):
    rc, _, err = run(
        capsys,
        "ei",
        "_cli_models:tiny_cnn",
        "--input-shape",
        SHAPE_ARG,
        "--engine",
        engine,
        "--max-memory",
        "16",
    )
    assert_usage_error(rc, err, "--max-memory is 16 B", status=1)
    assert "max_memory" not in err and "engine=" not in err
    if engine == "dense":
        assert "use --engine sparse or implicit, or raise --max-memory" in err


def test_forward_failure_exits_1(capsys):
    rc, out, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", "1,5,8,8")
    assert_usage_error(rc, err, "forward pass failed", "'0'", "1,5,8,8", "--input-shape", status=1)
    assert out == ""


def test_unwritable_output_exits_1(capsys, tmp_path):
    rc, _, err = run(
        capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--json", tmp_path
    )  # a folder, not a file
    assert_usage_error(rc, err, "IsADirectoryError", status=1)


def test_failing_factory_exits_1(capsys):
    rc, _, err = run(capsys, "ei", "_cli_models:fails_to_build", "--input-shape", "1,2")
    assert_usage_error(rc, err, "fails_to_build() failed", "always fails", status=1)


# --------------------------------------------------------------------------- entry points


def test_python_m_version():
    proc = subprocess.run(
        [sys.executable, "-m", "foresight_sparse", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"foresight-sparse {foresight_sparse.__version__}")


def test_console_script_alexnet(tmp_path):
    exe = shutil.which("foresight-sparse", path=os.path.dirname(sys.executable)) or shutil.which(
        "foresight-sparse"
    )
    assert exe, "the foresight-sparse console script is not installed (pip install -e .)"
    proc = subprocess.run(
        [exe, "ei", "alexnet", "--input-shape", SMALL_IMAGE, "--json", "out.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = read_json(tmp_path / "out.json")
    assert len(data["layers"]) == 8
    # the installed command computes what the library computes in this process
    assert data == expected(
        seeded(lambda: torchvision.models.get_model("alexnet", weights=None)), (1, 3, 64, 64)
    )
    assert "network: determinism" in proc.stdout

"""The ``foresight-sparse`` command: every MODEL form, every output, every exit status.

Most tests call :func:`foresight_sparse.cli.main` in-process; two run the installed command
in a subprocess to check the entry points. Numbers written by ``--json`` must equal
:func:`foresight_sparse.report` on the same model exactly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from _cli_models import SHAPE, TinyNet, tiny_cnn
from torch import nn

import foresight_sparse
from foresight_sparse.cli import main
from foresight_sparse.connectivity import connectivity
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = foresight_sparse.report(model, torch.zeros(shape), **kwargs)
    return _numbers(rep.to_dict())


def _numbers(d: dict) -> dict:
    d = dict(d)
    d.pop("seconds")
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
    torchvision = pytest.importorskip("torchvision")
    out_json = tmp_path / "alexnet.json"
    rc, out, err = run(capsys, "ei", "alexnet", "--input-shape", SMALL_IMAGE, "--json",
                       out_json)
    assert rc == 0, err
    model = seeded(lambda: torchvision.models.get_model("alexnet", weights=None))
    assert read_json(out_json) == expected(model, (1, 3, 64, 64))
    assert "classifier.6" in out and "network: determinism" in out
    # The library's warning about skipped layers, as one line without a source location.
    assert err.startswith("foresight-sparse: warning: skipped layers") and "MaxPool2d" in err
    assert len(err.strip().splitlines()) == 1


def test_callable_matches_report(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                       "--json", out_json)
    assert rc == 0, err
    assert err == ""  # no progress bar when stderr is not a terminal, nothing skipped
    got = read_json(out_json)
    assert got == expected(seeded(tiny_cnn))
    assert [layer["name"] for layer in got["layers"]] == ["0", "2", "3", "5"]
    assert f"EI {got['ei']:.6f} bits" in out


def test_callable_may_name_a_module_instance(capsys, tmp_path):
    import _cli_models

    out_json = tmp_path / "r.json"
    rc, _, err = run(capsys, "ei", "_cli_models:INSTANCE", "--input-shape", SHAPE_ARG,
                     "--json", out_json)
    assert rc == 0, err
    assert read_json(out_json) == expected(_cli_models.INSTANCE)


def test_seed_changes_the_random_weights(capsys, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for seed, path in ((0, a), (1, b)):
        rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                         "--seed", seed, "--json", path)
        assert rc == 0, err
    assert read_json(b) == expected(seeded(tiny_cnn, 1))
    assert read_json(a)["ei"] != read_json(b)["ei"]


def _save_torchscript(model: nn.Module, path, how: str = "script") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        scripted = torch.jit.script(model) if how == "script" else \
            torch.jit.trace(model, torch.zeros(SHAPE))
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


def test_torch_save_file(capsys, tmp_path):
    model = seeded(TinyNet, 4)
    path = tmp_path / "net.pt"
    torch.save(model, path)
    out_json = tmp_path / "r.json"
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG, "--json", out_json)
    assert rc == 0, err
    assert read_json(out_json) == expected(model)


def test_weights_state_dict_round_trip(capsys, tmp_path):
    trained = seeded(tiny_cnn, 7)
    weights = tmp_path / "w.pt"
    torch.save(trained.state_dict(), weights)
    with_w, without = tmp_path / "with.json", tmp_path / "without.json"
    for path, extra in ((with_w, ["--weights", weights]), (without, [])):
        rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                         "--json", path, *extra)
        assert rc == 0, err
    assert read_json(with_w) == expected(trained)
    assert read_json(with_w)["ei"] != read_json(without)["ei"]


def test_weights_that_do_not_fit(capsys, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(TinyNet().state_dict(), weights)
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                     "--weights", weights)
    assert_usage_error(rc, err, "does not fit the model", "missing", "unexpected")


def test_state_dict_given_as_model(capsys, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_cnn().state_dict(), path)
    rc, _, err = run(capsys, "ei", path, "--input-shape", SHAPE_ARG)
    assert_usage_error(rc, err, "state_dict", "--weights")


# --------------------------------------------------------------------------- options and outputs


def test_options_reach_the_library(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                       "--norm", "soft", "--engine", "sparse", "--legacy", "--max-memory",
                       "1MiB", "--device", "cpu", "--json", out_json)
    assert rc == 0, err
    got = read_json(out_json)
    assert got == expected(seeded(tiny_cnn), norm="soft", engine="sparse", legacy=True,
                           max_memory="1MiB")
    assert (got["norm"], got["engine"], got["legacy"]) == ("soft", "sparse", True)
    assert "norm soft, engine sparse, device cpu, legacy" in out


def test_csv_has_one_row_per_layer(capsys, tmp_path):
    out_csv = tmp_path / "r.csv"
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                     "--csv", out_csv)
    assert rc == 0, err
    with open(out_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    want = expected(seeded(tiny_cnn))["layers"]
    assert [r["name"] for r in rows] == [layer["name"] for layer in want]
    for row, layer in zip(rows, want):
        assert row["in_shape"] == "x".join(map(str, layer["in_shape"]))
        assert int(row["nnz"]) == layer["nnz"]
        assert float(row["ei"]) == layer["ei"]
        assert float(row["mean_row_entropy"]) == layer["mean_row_entropy"]


def test_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "r.png"
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                     "--plot", out_png)
    assert rc == 0, err
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                     "--plot", tmp_path / "r.png")
    assert_usage_error(rc, err, "pip install foresight-sparse[plot]")
    assert not (tmp_path / "r.png").exists()


def test_quiet_prints_only_the_totals(capsys):
    rc, out, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                       "--quiet")
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
    tr = trace(seeded(tiny_cnn), torch.zeros(SHAPE))
    nnz = [connectivity(layer.module, layer.in_shape, layer.out_shape).nnz
           for layer in tr.layers]
    body = out.splitlines()[3:3 + len(nnz)]
    assert [line.split()[0] for line in body] == [layer.name for layer in tr.layers]
    assert [int(line.split()[6]) for line in body] == nnz
    assert out.splitlines()[-1] == f"{len(nnz)} layers, {sum(nnz)} entries"


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert main(["ei", "--help"]) == 0
    assert main(["--version"]) == 0
    assert foresight_sparse.__version__ in capsys.readouterr().out


# --------------------------------------------------------------------------- exit statuses


@pytest.mark.parametrize("argv, fragments", [
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
    (["ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG, "--json", "/no/such/d/r.json"],
     ["--json", "does not exist"]),
    (["frobnicate"], ["invalid choice"]),
    ([], ["choose a command"]),
])
def test_usage_errors_exit_2(capsys, argv, fragments):
    rc, out, err = run(capsys, *argv)
    assert_usage_error(rc, err, *fragments)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(capsys):
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                     "--device", "cuda")
    assert_usage_error(rc, err, "--device cuda", "CUDA is not available", "--device cpu")


def test_forward_failure_exits_1(capsys):
    rc, out, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", "1,5,8,8")
    assert_usage_error(rc, err, "forward pass failed", "'0'", "1,5,8,8", "--input-shape",
                       status=1)
    assert out == ""


def test_unwritable_output_exits_1(capsys, tmp_path):
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                     "--json", tmp_path)  # a folder, not a file
    assert_usage_error(rc, err, "IsADirectoryError", status=1)


def test_failing_factory_exits_1(capsys):
    rc, _, err = run(capsys, "ei", "_cli_models:fails_to_build", "--input-shape", "1,2")
    assert_usage_error(rc, err, "fails_to_build() failed", "always fails", status=1)


def test_memory_budget_error_exits_1(capsys):
    rc, _, err = run(capsys, "ei", "_cli_models:tiny_cnn", "--input-shape", SHAPE_ARG,
                     "--engine", "sparse", "--max-memory", "16")
    assert_usage_error(rc, err, "max_memory", status=1)


# --------------------------------------------------------------------------- entry points


def test_python_m_version():
    proc = subprocess.run([sys.executable, "-m", "foresight_sparse", "--version"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"foresight-sparse {foresight_sparse.__version__}")


def test_console_script_alexnet(tmp_path):
    pytest.importorskip("torchvision")
    exe = shutil.which("foresight-sparse", path=os.path.dirname(sys.executable)) or \
        shutil.which("foresight-sparse")
    assert exe, "the foresight-sparse console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "ei", "alexnet", "--input-shape", SMALL_IMAGE, "--json",
                           "out.json"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert len(data["layers"]) == 8 and math.isfinite(data["ei"])
    assert math.isclose(data["ei"], data["degeneracy"] - data["determinism"])
    assert "network: determinism" in proc.stdout

"""Reports describe themselves and read back: to_dict / from_dict, save / load, CSV, table."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone

import pytest
import torch
from _cli_models import SHAPE, tiny_cnn
from conftest import quiet
from torch import nn

import foresight_sparse
from foresight_sparse import LayerReport, Report
from foresight_sparse.exceptions import ReportFileError


@pytest.fixture(scope="module")
def rep() -> Report:
    torch.manual_seed(0)
    # AvgPool2d is counted, ReLU and Flatten are not; add a MaxPool2d so `skipped` is filled.
    model = nn.Sequential(*tiny_cnn()[:3], nn.MaxPool2d(1), *tiny_cnn()[3:])
    r = quiet(foresight_sparse.report, model, torch.zeros(SHAPE), norm="sig")
    r.meta.update(model="tiny", input_shape=list(SHAPE), seed=0)
    return r


def test_describes_itself(rep):
    assert rep.version == foresight_sparse.__version__
    assert rep.torch_version == torch.__version__
    created = datetime.fromisoformat(rep.created)
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 600
    assert rep.skipped, "the fixture should have skipped layers to round-trip"


def test_json_round_trip(rep, tmp_path):
    path = tmp_path / "r.json"
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rep.to_dict(), fh)
    with open(path, encoding="utf-8") as fh:
        back = Report.from_dict(json.load(fh))
    assert back == rep
    assert isinstance(back.layers[0].in_shape, tuple)
    assert all(isinstance(s, tuple) for s in back.skipped)


def test_save_and_load(rep, tmp_path):
    path = tmp_path / "r.json"
    rep.save(path)
    assert Report.load(path) == rep
    assert json.loads(path.read_text(encoding="utf-8")) == rep.to_dict()


def test_from_dict_of_an_older_file_claims_no_version(rep):
    d = rep.to_dict()
    for key in ("version", "torch_version", "created", "meta", "max_memory"):
        d.pop(key)
    back = Report.from_dict(d)
    assert (back.version, back.torch_version, back.created) == (None, None, None)
    assert back.layers == rep.layers and back.ei == rep.ei


def test_from_dict_names_what_is_missing(rep):
    d = rep.to_dict()
    del d["ei"]
    with pytest.raises(ReportFileError, match="needs ei"):
        Report.from_dict(d)
    d = rep.to_dict()
    del d["layers"][1]["nnz"]
    with pytest.raises(ReportFileError, match="layer 1 .* lacks nnz"):
        Report.from_dict(d)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ReportFileError, match="bad.json.*not JSON"):
        Report.load(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ReportFileError, match="bad.json.*list"):
        Report.load(path)


def test_csv_carries_the_metadata_then_the_rows(rep, tmp_path):
    path = tmp_path / "r.csv"
    rep.save_csv(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    head = [ln for ln in lines if ln.startswith("# ")]
    assert lines[: len(head)] == head  # the comments come first
    meta = dict(ln[2:].split(": ", 1) for ln in head)
    assert meta["model"] == "tiny" and json.loads(meta["input_shape"]) == list(SHAPE)
    assert meta["norm"] == "sig" and meta["version"] == rep.version
    assert float(meta["ei"]) == rep.ei and int(meta["nnz"]) == rep.nnz
    rows = list(csv.DictReader(lines[len(head) :]))
    assert [r["name"] for r in rows] == [lay.name for lay in rep.layers]
    assert [float(r["degeneracy"]) for r in rows] == [lay.degeneracy for lay in rep.layers]
    assert rows[0]["in_shape"] == "x".join(map(str, rep.layers[0].in_shape))


@pytest.mark.parametrize("value", [-0.0, -1e-17, -4e-7])
def test_table_prints_no_negative_zero(value):
    layer = LayerReport("d", "Linear", (1, 2), (1, 2), 2, 2, 2, value, value, value, "sparse", 0.0)
    table = Report(value, value, value, [layer]).table()
    assert "-0.0" not in table
    assert "    0.0000" in table and "determinism 0.000000" in table

"""The checkpoint loader: every file layout training code writes, and every way it can fail.

Each file is written here by hand (torch.save of the structure a trainer would save), then
read back with :func:`load_state_dict` and :func:`fit_state_dict`; the weights that come out
must equal the model's own tensors, compared one by one.
"""

from __future__ import annotations

import pytest
import torch
from _cli_models import TinyNet, tiny_cnn
from torch import nn

from foresight_sparse import CheckpointError
from foresight_sparse.checkpoints import fit_state_dict, load_state_dict, load_weights


def seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def assert_same_weights(state: dict, model: nn.Module) -> None:
    want = model.state_dict()
    assert list(state) == list(want)
    for k, v in want.items():
        assert torch.equal(state[k], v), k


@pytest.fixture
def trained():
    return seeded(tiny_cnn, 11)


def test_bare_state_dict(tmp_path, trained):
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    state = load_state_dict(path)
    assert all(t.device.type == "cpu" for t in state.values())
    assert_same_weights(fit_state_dict(state, seeded(tiny_cnn)), trained)


def test_training_checkpoint_under_model(tmp_path, trained):
    opt = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    loss = trained(torch.ones(1, 3, 8, 8)).sum()
    loss.backward()
    opt.step()  # the optimizer state now holds momentum tensors
    path = tmp_path / "ckpt.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3, "optimizer": opt.state_dict()}, path)
    model = load_weights(seeded(tiny_cnn), path)
    assert_same_weights(model.state_dict(), trained)


@pytest.mark.parametrize("usual", ["state_dict", "model_state_dict", "net", "params"])
def test_usual_keys_are_found(tmp_path, trained, usual):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 1, usual: trained.state_dict(), "best_acc": 0.5}, path)
    assert_same_weights(load_state_dict(path), trained)


def test_usual_keys_are_tried_in_order(tmp_path, trained):
    other = seeded(tiny_cnn, 12)
    path = tmp_path / "ckpt.pt"
    # "state_dict" comes before "model" in the documented order, whatever the dict order.
    torch.save({"model": other.state_dict(), "state_dict": trained.state_dict()}, path)
    assert_same_weights(load_state_dict(path), trained)
    assert_same_weights(load_state_dict(path, key="model"), other)


def test_ddp_module_prefix(tmp_path, trained):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, path)
    state = load_state_dict(path)
    assert all(k.startswith("module.") for k in state)
    assert_same_weights(fit_state_dict(state, seeded(tiny_cnn)), trained)


def test_lightning_ckpt(tmp_path):
    net = seeded(TinyNet, 5)
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    # A LightningModule's other attributes (here a weighted loss) are saved beside the model.
    state["loss_fn.weight"] = torch.ones(10)
    path = tmp_path / "epoch=2-step=30.ckpt"
    torch.save(
        {
            "epoch": 2,
            "global_step": 30,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": state,
            "loops": {"fit_loop": {"epoch_progress": {"total": 3}}},
            "callbacks": {},
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.01},
        },
        path,
    )
    model = load_weights(seeded(TinyNet), path)
    assert_same_weights(model.state_dict(), net)


def test_ddp_wrapped_lightning_prefix(trained):
    state = {f"module.net.{k}": v for k, v in trained.state_dict().items()}
    assert_same_weights(fit_state_dict(state, seeded(tiny_cnn)), trained)


def test_two_copies_of_the_model_are_ambiguous(trained):
    state = {f"{p}.{k}": v for p in ("student", "teacher") for k, v in trained.state_dict().items()}
    with pytest.raises(CheckpointError, match="several times.*'student.'.*'teacher.'"):
        fit_state_dict(state, seeded(tiny_cnn))


def test_safetensors(tmp_path, trained):
    import safetensors.torch as safetensors_torch

    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(trained.state_dict(), str(path))
    assert_same_weights(fit_state_dict(load_state_dict(path), seeded(tiny_cnn)), trained)
    # Found by its header too, whatever the file is called.
    other = tmp_path / "weights.bin"
    other.write_bytes(path.read_bytes())
    assert_same_weights(fit_state_dict(load_state_dict(other), seeded(tiny_cnn)), trained)


def test_safetensors_missing_package_gives_install_hint(tmp_path, trained, monkeypatch):
    import safetensors.torch as safetensors_torch

    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(trained.state_dict(), str(path))
    import sys

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"pip install 'foresight-sparse\[safetensors\]'"):
        load_state_dict(path)


def test_pickled_module_needs_trust(tmp_path, trained):
    path = tmp_path / "whole.pt"
    torch.save(trained, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert "pickled code" in msg and "runs code" in msg and "trust_pickle=True" in msg
    assert str(path) in msg
    assert_same_weights(load_state_dict(path, trust_pickle=True), trained)


def test_truncated_file(tmp_path, trained):
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*w.pt.*zip archive"):
        load_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")


def test_wrong_key_names_the_candidates(tmp_path, trained):
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": trained.state_dict(), "student": trained.state_dict(), "epoch": 3}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path, key="modle")
    assert "no key 'modle'" in str(info.value) and "'ema', 'student'" in str(info.value)
    # Without key and without a usual key the message says how to choose.
    with pytest.raises(CheckpointError, match="'ema', 'student'.*key=NAME"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="key 'epoch' holds a int"):
        load_state_dict(path, key="epoch")
    assert_same_weights(load_state_dict(path, key="ema"), trained)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict(path)


def test_mismatched_architecture(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(seeded(TinyNet).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        fit_state_dict(load_state_dict(path), seeded(tiny_cnn), source=path)
    msg = str(info.value)
    assert str(path) in msg and "Sequential" in msg
    # tiny_cnn has 0.weight, 0.bias, 3.weight, 5.weight, 5.bias; TinyNet has
    # features.0.weight, features.0.bias, fc.weight, fc.bias.
    assert "missing 0.weight, 0.bias, 3.weight and 2 more" in msg
    assert "unexpected features.0.weight, features.0.bias, fc.weight and 1 more" in msg
    assert "closest match of '0.weight' is 'features.0.weight'" in msg


def test_shape_mismatch_names_key_and_shapes():
    small = nn.Sequential(nn.Linear(4, 3))
    big = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(CheckpointError) as info:
        fit_state_dict(big.state_dict(), small, source="big.pt")
    msg = str(info.value)
    assert "'big.pt'" in msg
    assert "0.weight: 5x4 in the file, 3x4 in the model" in msg
    assert "0.bias: 5 in the file, 3 in the model" in msg


def test_closest_match_of_a_renamed_key():
    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 3)

    class New(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_1 = nn.Linear(4, 3)

    with pytest.raises(CheckpointError, match="closest match of 'fc_1.weight' is 'fc1.weight'"):
        fit_state_dict(seeded(Old).state_dict(), seeded(New))


def test_bytes_naming_no_module_are_unreadable_not_pickled_code(tmp_path):
    """A GLOBAL opcode whose name is no ``module.name`` (bytes that only look like a
    pickle) is reported as unreadable, never as pickled code that trust_pickle would
    unlock; the message carries no terminal escape codes."""
    path = tmp_path / "noise.pt"
    path.write_bytes(b"\x80\x02cut\n\x01\x02\n.")
    with pytest.raises(CheckpointError, match="cannot read") as info:
        load_state_dict(path)
    assert "pickled code" not in str(info.value) and "\x1b" not in str(info.value)

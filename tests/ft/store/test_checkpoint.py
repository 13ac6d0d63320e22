"""trace_ft.store.checkpoint: what an adapt run saves comes back exactly; a checkpoint of
another run, or a damaged one, is refused with a message that says so."""

import pytest
import torch

from trace_ft.store.checkpoint import AdaptCheckpoint, CheckpointError
from trace_kernels import CoreMask

INPUTS = {"task": {"train_sha256": "a"}, "config": {"steps": 10}, "history_tasks": 0}


def _core():
    return CoreMask.from_dense({"w": torch.arange(12).reshape(3, 4) % 5 == 0})


def test_selection_and_steps_round_trip(tmp_path):
    ck = AdaptCheckpoint(tmp_path / "ck")
    assert not ck.exists()
    updates = {"w": torch.randn(3, 4)}
    ck.start(INPUTS, _core(), updates, {"probe_loss": 1.5})
    state = ck.check_inputs(INPUTS)
    core, upd, info = ck.selection(state)
    assert core == _core() and torch.equal(upd["w"], updates["w"]) and info == {"probe_loss": 1.5}
    assert ck.load_step(state) == (0, {}, None, [])
    values = {"w": torch.randn(3)}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    ck.save_step(4, values, opt.state_dict(), [3.0, 2.0, 1.5, 1.0])
    torch.manual_seed(7)
    ck.save_step(8, values, opt.state_dict(), [3.0, 2.0, 1.5, 1.0, 0.9, 0.8, 0.7, 0.6])
    after_save = torch.randn(3)
    torch.randn(5)
    # only the newest step is kept
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["selection", "state.json", "step-000008"]
    step, tensors, opt_state, losses = ck.load_step(ck.state())
    assert step == 8 and torch.equal(tensors["w"], values["w"]) and len(losses) == 8
    assert opt_state["param_groups"][0]["lr"] == 0.1
    assert torch.equal(torch.randn(3), after_save)  # the RNG stands where it stood at the save
    ck.remove()
    assert not (tmp_path / "ck").exists()


def test_another_runs_checkpoint_is_refused(tmp_path):
    ck = AdaptCheckpoint(tmp_path / "ck")
    ck.start(INPUTS, _core(), {}, {})
    with pytest.raises(CheckpointError, match="its config differs"):
        ck.check_inputs({**INPUTS, "config": {"steps": 11}})


def test_a_damaged_checkpoint_is_refused(tmp_path):
    ck = AdaptCheckpoint(tmp_path / "ck")
    ck.start(INPUTS, _core(), {"w": torch.randn(3, 4)}, {})
    f = tmp_path / "ck" / "selection" / "updates.safetensors"
    f.write_bytes(f.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CheckpointError, match="missing or damaged"):
        ck.selection(ck.state())
    (tmp_path / "ck" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable state.json"):
        ck.state()

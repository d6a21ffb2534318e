"""Checkpoint manager: atomic writes, top-k retention, exact RNG / optimizer state round trips."""

import json
import random

import numpy as np
import pytest
import torch

from diffpolicy.policies.errors import CheckpointError, CheckpointNotFoundError
from diffpolicy.train.checkpoints import (
    CheckpointManager,
    capture_rng_state,
    flatten_optimizer_state,
    resolve_policy_dir,
    restore_rng_state,
    unflatten_optimizer_state,
)


def export_stub(directory):
    """Writes what `save_pretrained` writes (the manager only calls it)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"")


def save(manager, step, score):
    return manager.save(step, export=export_stub, groups={"model": {"w": torch.full((2,), float(step))}},
                        meta={"epoch": 0}, score=score)


def test_keeps_top_k_by_score_plus_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_top_k=2)
    for step, score in [(10, 0.2), (20, 0.9), (30, 0.5), (40, 0.1), (50, None)]:
        save(manager, step, score)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["step_00000020", "step_00000030", "step_00000050"]
    assert manager.latest().name == "step_00000050"
    assert manager.best().name == "step_00000020"
    index = json.loads((tmp_path / "index.json").read_text())
    assert [c["step"] for c in index["checkpoints"]] == [20, 30, 50]
    groups, meta = CheckpointManager.load_state(manager.latest())
    assert torch.equal(groups["model"]["w"], torch.full((2,), 50.0)) and meta["step"] == 50


def test_list_scores_rank_lexicographically(tmp_path):
    manager = CheckpointManager(tmp_path, keep_top_k=1)
    for step, score in [(10, [0.0, 0.4]), (20, [0.0, 0.2]), (30, [0.1, 0.0]), (40, [0.0, 0.9])]:
        save(manager, step, score)
    assert manager.best().name == "step_00000030"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000030", "step_00000040"]


def test_without_scores_only_the_latest_survives(tmp_path):
    manager = CheckpointManager(tmp_path, keep_top_k=3)
    for step in (1, 2, 3):
        save(manager, step, None)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000003"]
    assert manager.best() == manager.latest()


def test_pruning_a_checkpoint_keeps_the_evaluations_written_into_it(tmp_path):
    """`diffpolicy eval` writes `<checkpoint>/eval_*/`; a later save that prunes the checkpoint (a run
    resumed with a larger budget) moves them to `evaluations/<checkpoint>/` instead of deleting them."""
    manager = CheckpointManager(tmp_path, keep_top_k=0)

    def evaluate(checkpoint, text):
        (checkpoint / "eval_seed100000_n100").mkdir()
        (checkpoint / "eval_seed100000_n100" / "episodes.json").write_text(text)

    evaluate(save(manager, 1, None), "first")
    evaluate(save(manager, 2, None), "second")
    save(manager, 3, None)
    kept = tmp_path / "evaluations"
    assert (kept / "step_00000001" / "eval_seed100000_n100" / "episodes.json").read_text() == "first"
    assert (kept / "step_00000002" / "eval_seed100000_n100" / "episodes.json").read_text() == "second"
    assert not (tmp_path / "step_00000001").exists() and manager.latest().name == "step_00000003"
    # the same step saved, evaluated and pruned again: both evaluations stay
    evaluate(save(manager, 2, None), "again")
    save(manager, 4, None)
    assert (kept / "step_00000002" / "eval_seed100000_n100_1" / "episodes.json").read_text() == "again"
    assert (kept / "step_00000002" / "eval_seed100000_n100" / "episodes.json").read_text() == "second"


def test_keep_all_keeps_every_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_top_k=0, keep_all=True)
    for step, score in [(1, None), (2, 0.5), (3, None)]:
        save(manager, step, score)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000001", "step_00000002",
                                                                        "step_00000003"]
    assert [c["step"] for c in manager.read_index()["checkpoints"]] == [1, 2, 3]


def test_a_failed_write_leaves_the_previous_checkpoint_and_index(tmp_path):
    manager = CheckpointManager(tmp_path, keep_top_k=1)
    save(manager, 10, 0.5)
    before = (tmp_path / "index.json").read_text()

    def crash(directory):
        export_stub(directory)
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        manager.save(20, export=crash, groups={}, meta={}, score=1.0)
    assert (tmp_path / "index.json").read_text() == before
    assert not (tmp_path / "step_00000020").exists()
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the torn write...
    CheckpointManager(tmp_path)                                         # ...is swept on the next start
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert manager.latest().name == "step_00000010"


def test_rng_states_round_trip_exactly():
    torch_gen, numpy_gen = torch.Generator().manual_seed(3), np.random.default_rng(4)
    random.seed(1), np.random.seed(2), torch.manual_seed(5)
    torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=torch_gen), numpy_gen.random()
    tensors, meta = capture_rng_state({"t": torch_gen, "n": numpy_gen})
    meta = json.loads(json.dumps(meta))  # it is stored as JSON

    def draw():
        return (torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist(), random.gauss(0, 1),
                torch.rand(4, generator=torch_gen).tolist(), numpy_gen.random(3).tolist())

    first = draw()
    restore_rng_state(tensors, meta, {"t": torch_gen, "n": numpy_gen})
    assert draw() == first


def test_optimizer_state_round_trips_through_tensors_and_json():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        optimizer.step()
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    original = optimizer.state_dict()
    assert restored["param_groups"][0]["lr"] == original["param_groups"][0]["lr"]
    for param_id, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][param_id][name], value)
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    other.load_state_dict(restored)
    assert other.state_dict()["param_groups"][0]["lr"] == 1e-2


def test_resolve_policy_dir(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints", keep_top_k=2)
    save(manager, 10, 0.8)
    save(manager, 20, 0.3)
    best = run / "checkpoints" / "step_00000010" / "policy"
    assert resolve_policy_dir(run) == best
    assert resolve_policy_dir(run / "checkpoints") == best
    assert resolve_policy_dir(run / "checkpoints" / "step_00000020") == run / "checkpoints" / "step_00000020" / "policy"
    assert resolve_policy_dir(best) == best
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_policy_dir(tmp_path / "missing")
    with pytest.raises(CheckpointNotFoundError, match="expected a policy directory"):
        resolve_policy_dir(tmp_path)


def test_load_state_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="state.json"):
        CheckpointManager.load_state(tmp_path)
    manager = CheckpointManager(tmp_path / "c")
    path = save(manager, 1, None)
    (path / "state" / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        CheckpointManager.load_state(path)
    (path / "state" / "state.json").write_text('{"format_version": 99}')
    with pytest.raises(CheckpointError, match="format_version"):
        CheckpointManager.load_state(path)

"""DDP through torchrun with 2 CPU processes (gloo) equals single-process training of the same
global batch: `train.loss_shards=2` gives every sample the same noise whatever the process count."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY, make_pusht_dataset

from diffpolicy.policies.errors import ConfigError
from diffpolicy.train.config import build_config
from diffpolicy.train.trainer import train

OVERRIDES = [*TINY, "train.loss_shards=2", "train.steps=12", "train.checkpoint_every=12", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_pusht_dataset(tmp_path_factory.mktemp("data") / "pusht.zarr", episodes=3)


def test_two_process_ddp_matches_single_process(tmp_path, dataset):
    overrides = [*OVERRIDES, f"data.path={dataset}"]
    single = train(build_config("pusht", "diffusion", overrides), tmp_path / "single", progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "diffpolicy.cli", "train", "--task", "pusht", "--out", str(tmp_path / "ddp"),
               "--no-progress", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 12 steps") == 1  # only rank 0 reports

    name = single.latest.name
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["index.json", name]
    for group in ("model", "ema"):
        expected = load_file(single.latest / "state" / f"{group}.safetensors")
        got = load_file(tmp_path / "ddp" / "checkpoints" / name / "state" / f"{group}.safetensors")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=f"{group}/{key}")


def test_shards_must_fit_the_processes_and_batch(tmp_path, dataset):
    config = build_config("pusht", "diffusion", [*TINY, "train.loss_shards=3", f"data.path={dataset}"])
    with pytest.raises(ConfigError, match="loss_shards=3"):
        train(config, tmp_path / "run", progress=False)


def test_ranks_meet_at_a_barrier_before_leaving_only_after_a_clean_run(monkeypatch):
    from diffpolicy.train import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with distributed.process_group("cpu") as ctx:
        assert not ctx.enabled
    assert calls == ["barrier", "destroy"]
    calls.clear()
    with pytest.raises(KeyError):  # a failed rank leaves at once: the others must not wait for it
        with distributed.process_group("cpu"):
            raise KeyError("boom")
    assert calls == ["destroy"]

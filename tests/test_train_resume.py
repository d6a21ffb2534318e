"""A run killed mid-training and resumed continues bit-exactly (CPU) as if never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY, make_pusht_dataset

from diffpolicy.train.config import build_config
from diffpolicy.train.trainer import RunDirectoryError, train

STEPS = 120
OVERRIDES = [*TINY, f"train.steps={STEPS}", "train.checkpoint_every=20", "train.log_every=10"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_pusht_dataset(tmp_path_factory.mktemp("data") / "pusht.zarr", episodes=3)


def final_state(run_dir):
    """Model, EMA, optimizer tensors and the exported policy of the last checkpoint."""
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    tensors = {f"{group}/{k}": v for group in ("model", "ema", "optimizer")
               for k, v in load_file(checkpoint / "state" / f"{group}.safetensors").items()}
    tensors.update({f"policy/{k}": v for k, v in load_file(checkpoint / "policy" / "model.safetensors").items()})
    return tensors, json.loads((checkpoint / "state" / "state.json").read_text())


def kill_after_first_checkpoint(run_dir, args):
    """Start `diffpolicy train` in a subprocess and SIGKILL it once a checkpoint exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffpolicy.cli", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    index = run_dir / "checkpoints" / "index.json"
    deadline = time.monotonic() + 240
    while not index.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr.decode()[-2000:]}"
    latest = json.loads(index.read_text())["latest"]
    return int(latest.split("_")[1])


@pytest.mark.parametrize("ema_every", [1, 3])  # 3: checkpoints at multiples of 20 fall between EMA updates
def test_kill_and_resume_is_bit_exact(tmp_path, dataset, ema_every):
    overrides = [*OVERRIDES, f"train.ema_every={ema_every}", f"data.path={dataset}"]
    config = build_config("pusht", "diffusion", overrides)
    train(config, tmp_path / "straight", progress=False)

    killed = tmp_path / "killed"
    args = ["--task", "pusht", "--out", str(killed), "--no-progress", *overrides]
    stopped_at = kill_after_first_checkpoint(killed, args)
    assert 0 < stopped_at < STEPS
    with pytest.raises(RunDirectoryError, match="--resume"):
        train(config, killed, progress=False)
    result = train(config, killed, resume=True, progress=False)
    assert result.step == STEPS

    expected, expected_meta = final_state(tmp_path / "straight")
    got, got_meta = final_state(killed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"resumed run differs from the straight run in {different[:5]}"
    for key in ("epoch", "batch_in_epoch", "scheduler", "ema"):
        assert got_meta[key] == expected_meta[key]
    assert got_meta["ema"]["step"] == STEPS  # the EMA is caught up at every checkpoint
    # the log of the resumed run has each step once
    rows = [row for row in map(json.loads, (killed / "log.jsonl").read_text().splitlines()) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(10, STEPS + 1, 10))
    # training time adds up over the resume: cumulative, never restarting from 0
    for key in ("wall_s", "cpu_s"):
        values = [row[key] for row in rows]
        assert all(0 < a < b for a, b in zip(values, values[1:])), (key, values)


def test_resume_of_a_finished_run_does_nothing_more(tmp_path, dataset):
    config = build_config("pusht", "flow", [*TINY, f"data.path={dataset}"])
    first = train(config, tmp_path / "run", progress=False)
    before = load_file(first.latest / "state" / "model.safetensors")
    again = train(config, tmp_path / "run", resume=True, progress=False)
    assert again.step == first.step == 20 and again.latest == first.latest
    after = load_file(again.latest / "state" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_every_checkpoint_step_has_a_loss_row_with_its_training_time(tmp_path, dataset):
    config = build_config("pusht", "diffusion", [*TINY, "train.log_every=7", "train.checkpoint_every=10",
                                                 f"data.path={dataset}"])
    train(config, tmp_path / "run", progress=False)
    rows = [row for row in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in row]
    assert [row["step"] for row in rows] == [7, 10, 14, 20]  # a checkpoint's time is read off its own row
    assert all(row["cpu_s"] > 0 and row["wall_s"] > 0 for row in rows)

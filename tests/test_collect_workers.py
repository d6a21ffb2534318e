"""`collect(workers=N, write_batch=B)`: the same store bit for bit whatever N and B, resuming after an
interruption, and worker failures raised as CollectError naming the seed (no hung pool)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from collect_helpers import faulty_card, modules_loaded, pusht_card

import diffpolicy.collection.collect as collect_module
import diffpolicy.collection.episodes as episodes_module
from diffpolicy.cli import main
from diffpolicy.collection.collect import CollectError, collect
from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.envs.tasks import load_task


def store_files(path: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file of a store."""
    return {str(f.relative_to(path)): hashlib.sha1(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    """The same data arrays, meta and attrs, and the same files with the same bytes."""
    first, second = ReplayBuffer.open(a), ReplayBuffer.open(b)
    assert first.keys() == second.keys() and first.meta_keys() == second.meta_keys()
    assert dict(first.attrs) == dict(second.attrs)
    np.testing.assert_array_equal(first.episode_ends, second.episode_ends)
    for key in first.keys():
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), err_msg=key)
    for name in first.meta_keys():
        np.testing.assert_array_equal(first.episode_meta(name), second.episode_meta(name), err_msg=name)
    assert store_files(a) == store_files(b)


def test_workers_and_write_batches_give_the_same_store_bit_for_bit(tmp_path):
    # 100 steps: seed 0 and some others fail, so discarded seeds are part of what must match;
    # DART noise makes each episode depend on its seed's noise stream too.
    card = pusht_card(tmp_path, "pusht_short", max_episode_steps=100)
    runs = {}
    for workers, write_batch in ((1, 1), (2, 3)):
        out = tmp_path / f"w{workers}b{write_batch}.zarr"
        runs[out] = collect(card, episodes=6, out=out, only_success=True, action_noise=0.02, workers=workers,
                            write_batch=write_batch, progress=False)
    (reference, summary), *others = runs.items()
    buffer = ReplayBuffer.open(reference)
    discarded = buffer.attrs["collection"]["discarded_seeds"]
    assert buffer.n_episodes == 6 and discarded and buffer.episode_meta("success").all()
    assert sorted(buffer.episode_meta("seed").tolist() + discarded) == list(range(summary.attempted))
    assert "states" in buffer.keys()
    for out, other in others:
        assert (other.episodes, other.attempted, other.successes) == (6, summary.attempted, 6)
        assert_same_store(reference, out)


def test_image_task_with_states_is_the_same_with_workers(tmp_path):
    for workers in (1, 2):
        collect("pusht_image", episodes=2, out=tmp_path / f"w{workers}.zarr", seed_start=4, workers=workers,
                progress=False)
    assert ReplayBuffer.open(tmp_path / "w1.zarr").keys() == ["action", "agent_pos", "image", "reward", "states"]
    assert_same_store(tmp_path / "w1.zarr", tmp_path / "w2.zarr")


def test_interrupted_batched_run_resumes_to_the_uninterrupted_store(tmp_path, monkeypatch):
    card = pusht_card(tmp_path, "pusht_short", max_episode_steps=100)
    whole = tmp_path / "whole.zarr"
    collect(card, episodes=6, out=whole, only_success=True, progress=False)

    real_run_episode = episodes_module.run_episode
    played = []

    def interrupted_on_seventh(env, expert, seed, noise_scale=None):
        played.append(seed)
        if len(played) == 7:
            raise KeyboardInterrupt
        return real_run_episode(env, expert, seed, noise_scale)

    resumed = tmp_path / "resumed.zarr"
    monkeypatch.setattr(episodes_module, "run_episode", interrupted_on_seventh)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C with episodes still queued (write_batch 64)
        collect(card, episodes=6, out=resumed, only_success=True, progress=False)
    partial = ReplayBuffer.open(resumed)
    kept = partial.episode_meta("seed").tolist()
    assert sorted(kept + partial.attrs["collection"]["discarded_seeds"]) == played[:6]  # written on Ctrl-C
    assert 0 < len(kept) < 6
    monkeypatch.setattr(episodes_module, "run_episode", real_run_episode)
    summary = collect(card, episodes=6, out=resumed, only_success=True, workers=2, progress=False)
    assert summary.new_episodes == 6 - len(kept)
    assert_same_store(whole, resumed)


def test_store_killed_with_an_unwritten_batch_resumes_to_the_uninterrupted_store(tmp_path, monkeypatch):
    """A run killed outright loses its queue; the store it leaves resumes to the same store."""
    card = pusht_card(tmp_path, "pusht_short", max_episode_steps=100)
    whole = tmp_path / "whole.zarr"
    collect(card, episodes=6, out=whole, only_success=True, progress=False)

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs, so the writer's last flush is skipped too."""

    real_flush = collect_module.EpisodeWriter.flush
    flushes = []

    def flush_then_die(writer):
        flushes.append(len(writer._queue))
        if len(flushes) >= 2:  # the second write, and the one `collect` tries on its way out
            raise Killed
        real_flush(writer)

    killed = tmp_path / "killed.zarr"
    monkeypatch.setattr(collect_module.EpisodeWriter, "flush", flush_then_die)
    with pytest.raises(Killed):
        collect(card, episodes=6, out=killed, only_success=True, write_batch=2, progress=False)
    assert ReplayBuffer.open(killed).n_episodes == 2  # the first batch only
    monkeypatch.setattr(collect_module.EpisodeWriter, "flush", real_flush)
    collect(card, episodes=6, out=killed, only_success=True, write_batch=2, progress=False)
    assert_same_store(whole, killed)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_episode_raises_collect_error_naming_its_seed(tmp_path, workers):
    card = faulty_card(tmp_path, fault_seed=3, fault="raise")
    out = tmp_path / "faulty.zarr"
    with pytest.raises(CollectError, match="the episode of seed 3 failed.*RuntimeError: simulated fault") as info:
        collect(card, episodes=8, out=out, workers=workers, progress=False)
    if workers > 1:
        assert "worker traceback" in str(info.value) and "in step" in str(info.value)
    assert ReplayBuffer.open(out).episode_meta("seed").tolist() == [0, 1, 2]  # the seeds before it, whole


def test_an_episode_the_store_refuses_raises_collect_error_naming_its_seed(tmp_path):
    card = faulty_card(tmp_path, fault_seed=2, fault="nan")
    out = tmp_path / "nan.zarr"
    message = r"the episode of seed 2 cannot be stored: .*episode 2 of 4: data key 'reward' has a non-finite value nan"
    with pytest.raises(CollectError, match=message):
        collect(card, episodes=8, out=out, write_batch=4, progress=False)
    assert ReplayBuffer.open(out).episode_meta("seed").tolist() == [0, 1]  # its batch, up to it


def test_a_worker_that_dies_raises_collect_error_naming_its_seed(tmp_path):
    card = faulty_card(tmp_path, fault_seed=2, fault="exit")
    out = tmp_path / "died.zarr"
    with pytest.raises(CollectError, match=r"a worker process died while seeds \[.*\] were in flight") as info:
        collect(card, episodes=8, out=out, workers=2, progress=False)
    in_flight = [int(seed) for seed in str(info.value).split("[")[1].split("]")[0].split(",")]
    assert 2 in in_flight and in_flight == sorted(in_flight)
    store = ReplayBuffer.open(out)
    # Under load no episode may have finished before the worker died (seeds 0.. all in flight): an
    # empty store, which has no meta keys yet.
    stored = store.episode_meta("seed").tolist() if store.n_episodes else []
    assert stored == list(range(in_flight[0])) and len(stored) <= 2  # whole episodes before the first in flight


def test_workers_start_without_the_parents_torch(tmp_path):
    import torch  # noqa: F401  (the parent has it, as in `diffpolicy main`)

    context = multiprocessing.get_context(episodes_module.START_METHOD)
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        loaded = pool.submit(modules_loaded, ["torch", "diffpolicy.collection.episodes"]).result()
        pool.submit(episodes_module._start_worker, episodes_module.EpisodeJob(load_task("pusht")), 1).result()
        data, success, _ = pool.submit(episodes_module._play, 5).result()
        after = pool.submit(modules_loaded, ["torch", "zarr"]).result()
    assert loaded == {"torch": False, "diffpolicy.collection.episodes": False}
    assert success and len(data["action"]) > 10 and after == {"torch": False, "zarr": False}  # an episode needs neither


def test_bad_workers_and_write_batch_are_refused(tmp_path):
    for name, bad in (("workers", 0), ("workers", 1.5), ("write_batch", 0), ("workers", True)):
        with pytest.raises(CollectError, match=f"{name} must be a positive integer"):
            collect("pusht", episodes=1, out=tmp_path / "x.zarr", progress=False, **{name: bad})
    assert not (tmp_path / "x.zarr").exists()


def test_cli_takes_workers(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    assert main(["collect", "--task", "pusht", "--episodes", "3", "--out", str(out), "--no-progress",
                 "--workers", "2"]) == 0
    assert "3 episodes (3 new)" in capsys.readouterr().out
    assert main(["collect", "--task", "pusht", "--episodes", "1", "--out", str(tmp_path / "y.zarr"),
                 "--workers", "0"]) == 2
    assert "workers must be a positive integer, got 0" in capsys.readouterr().err


def test_ctrl_c_on_the_cli_with_workers_leaves_a_resumable_store_and_no_workers(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the workers ignore it, the command
    writes the episodes played, closes the pool and exits 130; the same command then completes."""
    out = tmp_path / "ctrl_c.zarr"
    command = [sys.executable, "-m", "diffpolicy.cli", "collect", "--task", "pusht", "--episodes", "2000",
               "--out", str(out), "--workers", "2", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,  # its own process group, like a terminal job
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _stored(out) == 0:  # a first batch written, more being played
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted; rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert _group_members_after_exit(process.pid) == []  # no worker outlives the command
    stored = ReplayBuffer.open(out).episode_meta("seed").tolist()
    assert 0 < len(stored) < 2000
    resume = [*command[:7], str(len(stored) + 2), "--out", str(out), "--workers", "1", "--no-progress"]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert ReplayBuffer.open(out).episode_meta("seed").tolist()[: len(stored)] == stored


def _stored(path: Path) -> int:
    """Episodes committed to the store at `path` (0 before it exists)."""
    try:
        return ReplayBuffer.open(path).n_episodes
    except (FileNotFoundError, ValueError):
        return 0


def _group_members_after_exit(pgid: int, grace_s: float = 10.0) -> list[int]:
    """The live processes of group `pgid`, once they had `grace_s` to finish exiting: a process closes
    its pipes before it leaves /proc, and the multiprocessing resource tracker exits only after it
    reads its caller's exit, so a check right after the caller's exit can catch one of them leaving."""
    deadline = time.monotonic() + grace_s
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return members


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members

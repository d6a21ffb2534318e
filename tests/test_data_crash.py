"""A writer killed by SIGKILL in the middle of an append (one episode or a batch) leaves a store of whole episodes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from diffpolicy.data import ReplayBuffer

# The writer appends episode k = 0, 1, 2, ... (content a function of k alone), `batch` episodes per
# `add_episodes` call, and prints "committed k" for the last episode of each commit. Images make one
# append take many chunk writes.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from diffpolicy.data import ReplayBuffer

    def episode(k):
        rng = np.random.default_rng(k)
        length = 40 + k % 7
        return {"action": rng.normal(size=(length, 2)),
                "img": rng.integers(0, 256, size=(length, 32, 32, 3), dtype=np.uint8)}

    path, first, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    buffer = ReplayBuffer.create(path) if first == 0 else ReplayBuffer.open(path, mode="a")
    k = first
    while True:
        buffer.add_episodes([(episode(j), {"seed": j, "model_file": "<mujoco/>" * j}) for j in range(k, k + batch)])
        k += batch
        print("committed", k - 1, flush=True)
""")


def expected_episode(k):
    namespace = {}
    exec(WRITER.split("path, first")[0], namespace)
    return namespace["episode"](k)


def kill_writer_mid_append(path, first, rng, batch):
    """Start the writer, let it commit two appends, then SIGKILL it a random fraction of an
    append's write time later. Returns the last episode it reported committed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(first), str(batch)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        stamps, reported = [], []
        for _ in range(2):
            line = writer.stdout.readline()
            assert line.startswith("committed"), f"writer failed: {line!r}"
            stamps.append(time.monotonic())
            reported.append(int(line.split()[1]))
        time.sleep(rng.uniform(0.1, 0.9) * (stamps[1] - stamps[0]))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    reported += [int(line.split()[1]) for line in writer.stdout.read().splitlines() if line.startswith("committed")]
    writer.stdout.close()
    return reported[-1]


def check_whole_episodes(path, at_least):
    buffer = ReplayBuffer.open(path)
    assert buffer.n_episodes >= at_least + 1
    np.testing.assert_array_equal(buffer.episode_meta("seed"), np.arange(buffer.n_episodes))
    for k in range(buffer.n_episodes):
        got, expected = buffer.get_episode(k), expected_episode(k)
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value)
        assert buffer.episode_meta("model_file")[k] == "<mujoco/>" * k
    return buffer.n_episodes


@pytest.mark.parametrize("batch", [1, 3])
def test_sigkill_mid_append_leaves_only_whole_episodes(tmp_path, batch):
    rng = np.random.default_rng(batch)
    path = tmp_path / "crash.zarr"
    first = 0
    for _ in range(2):
        last_reported = kill_writer_mid_append(path, first, rng, batch)
        first = check_whole_episodes(path, last_reported)
    buffer = ReplayBuffer.open(path, mode="a")
    buffer.add_episode(expected_episode(first), {"seed": first, "model_file": "<mujoco/>" * first})
    assert check_whole_episodes(path, first) == first + 1

"""SequenceSampler throughput and memory against a per-index Python loop over the same zarr store.

Datasets (written to a temporary directory in Diffusion Policy's layout with plain zarr calls):
  state: 2000 episodes x 500 steps (1M steps), state 20-D, action 2-D, float32
  image: 20k frames of 96x96x3 uint8 (100 episodes x 200), one compressed frame per chunk, plus
         agent_pos 2-D and action 2-D
Paths, all with To=2, Tp=16 and the same random window indices:
  baseline  for each window, slice every key from the zarr arrays and edge-pad in numpy
  per-item  sampler[i] (low-dim arrays cached in memory, images lazy)
  batched   sampler.sample_batch(indices) in batches of 256
  batched, images in memory  the same with the image arrays read into memory once at open
            (`ReplayBuffer.open(image_cache_bytes=...)`, the trainer's `data.image_cache_gb`); the
            one-time read is printed
Memory: tracemalloc peak during each path (a separate pass with tracing on) and the process RSS.

    python benchmarks/sampler.py            # default: about 1 min of CPU time on an idle core
    python benchmarks/sampler.py --quick    # smaller datasets and fewer windows
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from diffpolicy.data import ReplayBuffer, SequenceSampler
from diffpolicy.data.replay_buffer import default_chunks

OBS_HORIZON, PRED_HORIZON, BATCH = 2, 16, 256


def write_store(path: Path, episode_length: int, arrays: dict[str, tuple[tuple, np.dtype]],
                fill, n_steps: int, block: int) -> None:
    """Write data/<key> (N, ...) block by block with `fill(key, start, stop)` + meta/episode_ends,
    chunked and compressed as `ReplayBuffer.add_episode` does (bulk writes are far faster than
    thousands of appends and give the same arrays)."""
    root = zarr.open_group(str(path), mode="w")
    for key, (frame, dtype) in arrays.items():
        array = root.create_array(f"data/{key}", shape=(n_steps, *frame), dtype=dtype,
                                  chunks=default_chunks(frame, dtype),
                                  compressors=zarr.codecs.ZstdCodec(level=3))
        for start in range(0, n_steps, block):
            stop = min(n_steps, start + block)
            array[start:stop] = fill(key, start, stop)
    ends = np.arange(episode_length, n_steps + 1, episode_length, dtype=np.int64)
    episode_ends = root.create_array("meta/episode_ends", shape=ends.shape, dtype=np.int64)
    episode_ends[:] = ends


def state_dataset(path: Path, n_episodes: int, rng: np.random.Generator) -> list[str]:
    n_steps = n_episodes * 500
    dims = {"state": 20, "action": 2}

    def fill(key, start, stop):
        return rng.normal(size=(stop - start, dims[key])).astype(np.float32)

    specs = {key: ((dim,), np.float32) for key, dim in dims.items()}
    write_store(path, 500, specs, fill, n_steps, block=1 << 18)
    return ["state"]


def image_dataset(path: Path, n_frames: int, rng: np.random.Generator) -> list[str]:
    """Synthetic frames that compress like renders: a fixed background, a moving square, noise."""
    yy, xx = np.mgrid[0:96, 0:96]
    background = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).astype(np.uint8)

    def fill(key, start, stop):
        count = stop - start
        if key != "img":
            return rng.normal(size=(count, 2)).astype(np.float32)
        frames = np.repeat(background[None], count, axis=0)
        corners = rng.integers(0, 80, size=(count, 2))
        for row, (y, x) in enumerate(corners):
            frames[row, y:y + 16, x:x + 16] = (200, 40, 40)
        noisy = rng.random(frames.shape[:3]) < 0.01
        frames[noisy] = 255
        return frames

    specs = {"img": ((96, 96, 3), np.uint8), "agent_pos": ((2,), np.float32),
             "action": ((2,), np.float32)}
    write_store(path, 200, specs, fill, n_frames, block=1000)
    return ["img", "agent_pos"]


def baseline_window(arrays: dict[str, zarr.Array], episode_start: int, episode_end: int,
                    first: int, horizon: int, key: str) -> np.ndarray:
    """One key's window by slicing zarr and edge padding (the per-index loop's body)."""
    start = episode_start + first
    lo, hi = max(start, episode_start), min(start + horizon, episode_end)
    rows = arrays[key][lo:hi]
    before, after = lo - start, start + horizon - hi
    return np.concatenate([rows[:1]] * before + [rows] + [rows[-1:]] * after)


def run_baseline(sampler: SequenceSampler, arrays, ends: np.ndarray, indices: np.ndarray):
    """Yield `(obs dict, action)` per window index, one zarr slice per key and window."""
    starts = np.concatenate([[0], ends[:-1]])
    for index in indices:
        episode, offset = sampler.window_episode[index], sampler.window_offset[index]
        bounds = int(starts[episode]), int(ends[episode])
        obs = {key: baseline_window(arrays, *bounds, int(offset), OBS_HORIZON, key)
               for key in sampler.obs_keys}
        yield obs, baseline_window(arrays, *bounds, int(offset), PRED_HORIZON, "action")


def consume(windows) -> None:
    """Drain an iterator of windows without keeping them (memory = one window or batch)."""
    for _ in windows:
        pass


def measure(run, indices: np.ndarray, traced: int) -> tuple[float, float, float]:
    """`run(indices)` -> (windows per wall second, windows per CPU second of this process,
    tracemalloc peak MiB of `run(indices[:traced])` in a second, traced pass)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run(indices)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tracemalloc.start()
    run(indices[:traced])
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return len(indices) / wall, len(indices) / cpu, peak


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def bench(name: str, path: Path, obs_keys: list[str], n_windows: int, n_baseline: int,
          rng: np.random.Generator) -> list[tuple]:
    buffer = ReplayBuffer.open(path, cache_low_dim=True)
    sampler = SequenceSampler(buffer, obs_keys, OBS_HORIZON, PRED_HORIZON)
    arrays = {key: zarr.open_group(str(path), mode="r")["data"][key] for key in buffer.keys()}
    ends = np.asarray(buffer.episode_ends)
    indices = rng.integers(0, len(sampler), size=n_windows - n_windows % BATCH)

    reference = list(run_baseline(sampler, arrays, ends, indices[:8]))
    check = sampler.sample_batch(indices[:8])
    for row, (obs, action) in enumerate(reference):
        np.testing.assert_array_equal(check["action"][row], action)
        for key in obs_keys:
            np.testing.assert_array_equal(check["obs"][key][row], obs[key])

    paths = {
        "baseline loop": (lambda idx: consume(run_baseline(sampler, arrays, ends, idx)),
                          n_baseline),
        "per-item": (lambda idx: consume(sampler[int(i)] for i in idx),
                     min(n_windows, 2 * n_baseline)),
        f"batched B={BATCH}": (lambda idx: consume(sampler.sample_batch(b)
                                                   for b in idx.reshape(-1, BATCH)), n_windows),
    }
    if buffer.image_bytes():
        begin = time.perf_counter()
        in_memory = SequenceSampler(ReplayBuffer.open(path, cache_low_dim=True, image_cache_bytes=2**40),
                                    obs_keys, OBS_HORIZON, PRED_HORIZON)
        print(f"{name}: read {buffer.image_bytes() / 2**20:.0f} MiB of images into memory in "
              f"{time.perf_counter() - begin:.1f} s")
        np.testing.assert_array_equal(in_memory.sample_batch(indices[:8])["obs"][obs_keys[0]],
                                      check["obs"][obs_keys[0]])
        paths["batched, images in memory"] = (lambda idx: consume(in_memory.sample_batch(b)
                                                                  for b in idx.reshape(-1, BATCH)), n_windows)
    size = sum(np.prod(a.shape) * a.dtype.itemsize for a in arrays.values()) / 2**20
    label = f"{name} ({buffer.n_steps} steps, {size:.0f} MiB raw)"
    rows = []
    for path_name, (run, count) in paths.items():
        rates = measure(run, indices[:count], traced=min(count, BATCH))
        rows.append((label, path_name, *rates))
    base = rows[0]
    return [(*row[:2], row[2], row[2] / base[2], row[3], row[3] / base[3], row[4]) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller datasets, fewer windows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    episodes, frames = (200, 4000) if args.quick else (2000, 20000)
    n_windows, n_baseline = (1024, 128) if args.quick else (8192, 512)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        state_keys = state_dataset(Path(tmp) / "state.zarr", episodes, rng)
        image_keys = image_dataset(Path(tmp) / "image.zarr", frames, rng)
        print(f"wrote datasets in {time.perf_counter() - begin:.1f} s")
        rows += bench("state", Path(tmp) / "state.zarr", state_keys, n_windows, n_baseline, rng)
        rows += bench("image", Path(tmp) / "image.zarr", image_keys, n_windows // 8,
                      n_baseline // 2, rng)
    print(f"\nTo={OBS_HORIZON}, Tp={PRED_HORIZON}; ratios are over the baseline loop on the same "
          "dataset; CPU rates count every thread of this process")
    print(f"{'dataset':<36} {'path':<26} {'windows/s':>10} {'ratio':>8} {'win/CPU-s':>10} "
          f"{'ratio':>8} {'peak traced MiB':>16}")
    for label, path, rate, ratio, cpu_rate, cpu_ratio, peak in rows:
        print(f"{label:<36} {path:<26} {rate:>10.0f} {ratio:>7.1f}x {cpu_rate:>10.0f} "
              f"{cpu_ratio:>7.1f}x {peak:>16.2f}")
    current, peak = rss_mib()
    print(f"\nprocess RSS now {current:.0f} MiB, peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()

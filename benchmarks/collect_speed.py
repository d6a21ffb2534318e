"""Demonstration collection speed: worker processes and batched store writes against the old path.

Each row runs `collect(task, N, only_success=True)` (the main job's recipe) into a fresh store
in a temporary directory, in this process, and reports wall time, episodes per second, the CPU
seconds of this (the writing) process and of all processes (this one plus its reaped workers),
and the wall-time speed-up over the first row, the old path: one process, each episode written
as it comes (`write_batch=1`, the write pattern `collect` had before batching: one resize and one
write per key per episode). On a machine busy with other jobs the CPU columns still measure the
work; the wall-time speed-up of the worker rows needs idle cores. Every row's store must be
byte-for-byte the first's (the same files with the same bytes); the run fails otherwise.

    python benchmarks/collect_speed.py                    # 200 PushT episodes
    python benchmarks/collect_speed.py --episodes 50 --task pusht_image
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import tempfile
import time
from pathlib import Path

import diffpolicy.collection.episodes as episodes_module
from diffpolicy.collection.collect import WRITE_BATCH, collect

# (row name, workers, write_batch, start method)
ROWS = [
    ("old path: 1 process, per-episode writes", 1, 1, None),
    ("1 process, batched writes", 1, WRITE_BATCH, None),
    ("2 workers (spawn), per-episode writes", 2, 1, "spawn"),
    ("2 workers (spawn), batched writes", 2, WRITE_BATCH, "spawn"),
    ("2 workers (fork), batched writes", 2, WRITE_BATCH, "fork"),
]


def store_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file of a store."""
    return {str(f.relative_to(path)): hashlib.sha1(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def children_cpu() -> float:
    """CPU seconds of this process's terminated and reaped children (the pool's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_row(task: str, episodes: int, workers: int, write_batch: int, start_method: str | None,
            out: Path) -> tuple[float, float, float, int]:
    """(wall s, CPU s of this process, CPU s of its workers, seeds attempted) of one collection."""
    if start_method is not None:
        episodes_module.START_METHOD = start_method
    wall, cpu, child = time.perf_counter(), time.process_time(), children_cpu()
    summary = collect(task, episodes, out, only_success=True, workers=workers, write_batch=write_batch,
                      progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu, children_cpu() - child, summary.attempted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args()

    print(f"{args.task}: {args.episodes} episodes, only_success; rows print as they finish", flush=True)
    print(f"{'row':<42}{'wall s':>8}{'ep/s':>8}{'parent cpu s':>14}{'total cpu s':>13}{'speed-up':>10}", flush=True)
    base, reference = None, None
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, workers, write_batch, start_method) in enumerate(ROWS):
            out = Path(tmp) / f"row{index}.zarr"
            wall, cpu, workers_cpu, attempted = run_row(args.task, args.episodes, workers, write_batch,
                                                        start_method, out)
            digest = store_digest(out)
            reference = reference or digest
            if digest != reference:
                raise SystemExit(f"{name}: the store differs from the first row's")
            base = base or wall
            print(f"{name:<42}{wall:>8.1f}{args.episodes / wall:>8.1f}{cpu:>14.1f}{cpu + workers_cpu:>13.1f}"
                  f"{base / wall:>9.2f}x", flush=True)
    print(f"every store byte-for-byte identical ({len(reference)} files); {attempted} seeds attempted")

if __name__ == "__main__":
    main()

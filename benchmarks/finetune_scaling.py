"""How DPPO's throughput scales with the machine's cores: one process against a `torchrun` job.

Every configuration steps the same number of environments in all (`--envs`) through `diffpolicy
finetune --algo dppo` as a subprocess, for 1 and for 1 + `--iterations` iterations; the difference
of the two wall times, divided by `--iterations`, is the wall time of one iteration without the
start-up (imports, loading, the first environments). Configurations:
  1 process, 1 thread          --n-envs E --threads 1
  1 process, 2 threads         --n-envs E --threads 2
  1 process, subprocess envs   --n-envs E --threads 1 --async
  torchrun, 2 processes        --n-envs E/2 per process, --threads 1 each

    python benchmarks/finetune_scaling.py --checkpoint runs/e1_b128/checkpoints/step_00048000 --task pusht
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "1 process, 1 thread": ([], 1, ["--threads", "1"]),
    "1 process, 2 threads": ([], 1, ["--threads", "2"]),
    "1 process, subprocess envs (--async)": ([], 1, ["--threads", "1", "--async"]),
    "torchrun, 2 processes of 1 thread": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], 2,
                                          ["--threads", "1"]),
}


def run(prefix: list[str], processes: int, flags: list[str], args: argparse.Namespace, out: Path,
        iterations: int) -> tuple[float, int]:
    """Wall seconds of a fresh run of `iterations` iterations, and the environment steps it took."""
    most = args.envs * args.n_steps * args.exec_horizon  # an iteration's steps when no episode ends mid-chunk
    budget = (iterations - 1) * most + 1  # reached in exactly `iterations` iterations
    command = [sys.executable, *prefix, "-m", "diffpolicy.cli", "finetune", "--algo", "dppo", "--checkpoint",
               args.checkpoint, "--task", args.task, "--out", str(out), "--n-envs", str(args.envs // processes),
               "--env-steps", str(budget),
                "--no-progress", *flags, f"n_steps={args.n_steps}", "eval_every=0", "eval_episodes=1",
                f"batch_size={args.batch_size // processes}", "critic_warmup=0"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    rows = list(csv.DictReader((out / "curves.csv").open()))
    return wall, int(rows[-1]["env_steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a diffusion policy of the task")
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--envs", type=int, default=32, help="environments in all (split over processes)")
    parser.add_argument("--n-steps", type=int, default=20, help="chunks per environment per iteration")
    parser.add_argument("--exec-horizon", type=int, default=8, help="the policy's Ta (steps per chunk)")
    parser.add_argument("--batch-size", type=int, default=256, help="PPO minibatch in all (split over processes)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs; {args.envs} environments in all, {args.n_steps} chunks "
          f"each per iteration; wall of {args.iterations} iterations after the first")
    print("| configuration | env steps / wall s | iteration wall s | speed-up |")
    print("|---|---|---|---|")
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            prefix, processes, flags = CONFIGS[name]
            short, short_steps = run(prefix, processes, flags, args, Path(tmp) / f"{len(name)}a", 1)
            long, long_steps = run(prefix, processes, flags, args, Path(tmp) / f"{len(name)}b", 1 + args.iterations)
            per_iteration = (long - short) / args.iterations
            rate = (long_steps - short_steps) / (long - short)
            baseline = baseline or rate
            print(f"| {name} | {rate:.0f} | {per_iteration:.1f} | {rate / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

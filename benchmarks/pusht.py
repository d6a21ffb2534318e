"""PushT speed and expert quality: env steps, rendering, the scripted expert, and `collect`.

Rows (times per unit, CPU time of this process and wall time; ratios against the baseline row,
one env step with random actions, measured in the same process):
  env step (baseline)     PushTEnv(obs_type="state").step with uniform random targets
  render 96 / 256         one frame drawn with Pillow at 96 x 96 (observation) and 256 x 256 (video)
  expert act              PushTExpert.act, per step, during expert episodes
  expert episode          env + expert until success or 300 steps, per episode (seeds 0 .. N-1)
  collect episode         `collect("pusht", N)` into a temporary zarr store, per episode
Quality: the expert's success rate (coverage > 0.95 within 300 steps) over the seeds, mean
episode length, and the largest / 99th-percentile change of the commanded target between steps.

    python benchmarks/pusht.py                 # N = 100 seeds from 0
    python benchmarks/pusht.py --episodes 300 --seed-start 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from diffpolicy.collection.collect import collect
from diffpolicy.envs.experts.pusht import PushTExpert
from diffpolicy.envs.pusht import PushTEnv


class Clock:
    """Accumulates CPU and wall seconds over `with` blocks."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def __enter__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu += time.process_time() - self._cpu
        self.wall += time.perf_counter() - self._wall


def time_env_steps(n: int) -> Clock:
    env = PushTEnv()
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(0, 512, size=(n, 2))
    clock = Clock()
    with clock:
        for action in actions:
            if env.step(action)[2]:
                env.reset()
    return clock


def time_render(size: int, n: int) -> Clock:
    env = PushTEnv()
    env.reset(seed=0)
    clock = Clock()
    with clock:
        for _ in range(n):
            env.render_frame(size)
    return clock


def run_expert(episodes: int, seed_start: int):
    env = PushTEnv()
    expert = PushTExpert(env)
    act_clock, episode_clock = Clock(), Clock()
    successes, lengths, jumps = 0, [], []
    for seed in range(seed_start, seed_start + episodes):
        with episode_clock:
            obs, _ = env.reset(seed=seed)
            expert.reset(seed)
            actions = []
            for _ in range(300):
                with act_clock:
                    actions.append(expert.act(obs))
                obs, _, terminated, _, info = env.step(actions[-1])
                if terminated:
                    break
        successes += info["is_success"]
        lengths.append(len(actions))
        jumps.append(np.linalg.norm(np.diff(np.array(actions), axis=0), axis=1))
    return act_clock, episode_clock, successes, np.array(lengths), np.concatenate(jumps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed-start", type=int, default=0)
    args = parser.parse_args()

    n_steps = 3000
    base = time_env_steps(n_steps)
    base_ms = base.cpu / n_steps * 1e3
    rows = [("env step (baseline)", "step", base.cpu / n_steps * 1e3, base.wall / n_steps * 1e3)]
    for size in (96, 256):
        clock = time_render(size, 300)
        rows.append((f"render {size}", "frame", clock.cpu / 300 * 1e3, clock.wall / 300 * 1e3))
    act, episode, successes, lengths, jumps = run_expert(args.episodes, args.seed_start)
    total_steps = int(lengths.sum())
    rows.append(("expert act", "step", act.cpu / total_steps * 1e3, act.wall / total_steps * 1e3))
    rows.append(("expert episode", "episode", episode.cpu / args.episodes * 1e3, episode.wall / args.episodes * 1e3))
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        with clock:
            collect("pusht", episodes=args.episodes, out=Path(tmp) / "pusht.zarr",
                    seed_start=args.seed_start, progress=False)
    rows.append(("collect episode", "episode", clock.cpu / args.episodes * 1e3, clock.wall / args.episodes * 1e3))

    print(f"{'row':<22}{'per':>9}{'cpu ms':>10}{'wall ms':>10}{'x baseline':>12}")
    for name, unit, cpu_ms, wall_ms in rows:
        print(f"{name:<22}{unit:>9}{cpu_ms:>10.3f}{wall_ms:>10.3f}{cpu_ms / base_ms:>12.1f}")
    print(f"\ncollect {args.episodes} episodes: {clock.cpu:.1f} s CPU, {clock.wall:.1f} s wall")
    print(f"expert success {successes}/{args.episodes} = {successes / args.episodes:.3f} "
          f"(seeds {args.seed_start}..{args.seed_start + args.episodes - 1}), "
          f"mean length {lengths.mean():.1f} steps, max {lengths.max()}; "
          f"target change per step max {jumps.max():.1f} px, p99 {np.percentile(jumps, 99):.1f} px, "
          f"median {np.median(jumps):.1f} px")


if __name__ == "__main__":
    main()

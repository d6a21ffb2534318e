"""Success rate and speed of a task card's expert: any card with an env and an expert entry point.

For seeds `seed_start .. seed_start + N - 1` the card's env is reset with `reset(seed=seed)`, the
expert with `reset(seed)`, and the expert acts until the episode terminates or the card's time
limit cuts it. An episode succeeds if `info["is_success"]` is true at any step.

Rows (per-step times are wall time; the ratio is against the baseline row, measured in the same
process on the same env):
  env step (baseline)   env.step with uniform random actions from the action space
  expert episode step   env.step + expert.act during the expert's episodes
Quality: success rate with its 95 % Wilson interval, mean episode length and return, episodes per
minute of the expert.

    python benchmarks/experts.py --task lift --episodes 50
    python benchmarks/experts.py --task square --episodes 100 --seed-start 100000
    python benchmarks/experts.py --task pusht --episodes 100
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from diffpolicy.envs.tasks import load_task, make_env, make_expert  # noqa: E402
from diffpolicy.evaluation.stats import success_rate  # noqa: E402


def time_random_steps(env, n: int, seed: int) -> float:
    """Seconds per env step with random actions (resetting when an episode ends)."""
    env.reset(seed=seed)
    env.action_space.seed(seed)
    start = time.perf_counter()
    for _ in range(n):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return (time.perf_counter() - start) / n


def run_expert(env, expert, seed: int) -> tuple[bool, int, float]:
    """One expert episode: (success, steps, return)."""
    obs, info = env.reset(seed=seed)
    expert.reset(seed)
    success, steps, episode_return = bool(info.get("is_success", False)), 0, 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(expert.act(obs))
        steps += 1
        episode_return += float(reward)
        success = success or bool(info.get("is_success", False))
        if terminated or truncated:
            return success, steps, episode_return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="task card name or path (envs/<task>.yaml)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed-start", type=int, default=0)
    parser.add_argument("--baseline-steps", type=int, default=200, help="random-action steps timed")
    parser.add_argument("--verbose", action="store_true", help="print every episode")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    card = load_task(args.task)
    env = make_env(card)
    expert = make_expert(card, env)
    step_baseline = time_random_steps(env, args.baseline_steps, seed=args.seed_start)

    outcomes, lengths, returns = [], [], []
    start = time.perf_counter()
    for seed in range(args.seed_start, args.seed_start + args.episodes):
        success, steps, episode_return = run_expert(env, expert, seed)
        outcomes.append(success)
        lengths.append(steps)
        returns.append(episode_return)
        if args.verbose:
            print(f"seed {seed}: success={success} steps={steps} return={episode_return:.3f}", flush=True)
    seconds = time.perf_counter() - start
    step_expert = seconds / sum(lengths)
    rate = success_rate(outcomes)

    print(f"task {card.name}: expert {card.expert['entry_point']}, seeds {args.seed_start}.."
          f"{args.seed_start + args.episodes - 1}")
    print(f"{'row':<24}{'ms/step':>10}{'steps/s':>10}{'ratio':>8}")
    for name, per_step in (("env step (baseline)", step_baseline), ("expert episode step", step_expert)):
        print(f"{name:<24}{1e3 * per_step:>10.2f}{1 / per_step:>10.1f}{per_step / step_baseline:>8.2f}")
    print(f"success rate            {rate}  (95% Wilson interval)")
    print(f"episode length          mean {np.mean(lengths):.1f}, min {min(lengths)}, max {max(lengths)}")
    print(f"episode return          mean {np.mean(returns):.3f}")
    print(f"episodes per minute     {60 * args.episodes / seconds:.1f}  ({seconds:.1f} s total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

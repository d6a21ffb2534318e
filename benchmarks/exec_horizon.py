"""Success of chunk policies against the number of actions executed per chunk (Ta), same seeds.

Each checkpoint is evaluated with its own sampler on the task's chunk environments (batched, the
evaluator RL fine-tuning uses), once per executed horizon, with `action_horizon` set to it; every
other setting is the checkpoint's. Choose settings on validation seeds, never on the held-out ones.

    python benchmarks/exec_horizon.py --horizons 4 6 8 10 12 --seed 200000 --episodes 100 \
        runs/main/train/checkpoints/step_00022000 [more checkpoints]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import time

import torch

from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.rl.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="runs, checkpoints or policy directories")
    parser.add_argument("--horizons", type=int, nargs="+", default=[4, 6, 8, 10, 12])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=200_000, help="first seed (default: validation seeds)")
    parser.add_argument("--n-envs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch thread, seeds {args.seed}.."
          f"{args.seed + args.episodes - 1}")
    print("| checkpoint | executed actions per chunk | success | mean return | wall s |")
    print("|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        for horizon in args.horizons:
            policy = ChunkPolicy.from_pretrained(resolve_policy_dir(checkpoint))
            limit = policy.config.pred_horizon - policy.config.obs_horizon + 1
            if not 1 <= horizon <= limit:
                raise SystemExit(f"--horizons: {horizon} is outside 1..{limit} (Tp - To + 1) for {checkpoint}")
            policy.config = dataclasses.replace(policy.config, action_horizon=horizon)
            card = load_task(policy.metadata["task"])
            start = time.time()
            result = evaluate(policy.sample, policy.config, functools.partial(make_env, card),
                              range(args.seed, args.seed + args.episodes), args.n_envs)
            successes = round(result["eval_success"] * args.episodes)
            print(f"| {checkpoint} | {horizon} | {successes}/{args.episodes} | {result['eval_return']:.1f} | "
                  f"{time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()

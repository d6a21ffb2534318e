"""Success of chunk policies under other rollout settings than their own, on the same seeds.

Each checkpoint is evaluated on the task's chunk environments (batched: the evaluator RL
fine-tuning uses), once per setting, every other setting being the checkpoint's:
  --horizons H ...    actions executed per chunk (the policy's `action_horizon` set to H), own sampler;
  --std-floors S ...  (diffusion) DPPO's training sampler: DDIM eta = 1 with every step's std at
                      least S (`StepNoise(std_floor=S)`), the exploration noise a DPPO run acts with.
Choose settings on validation seeds (the default), never on the held-out ones.

    python benchmarks/rollout_settings.py runs/main/train/checkpoints/step_00022000 --horizons 4 6 8 10 12
    python benchmarks/rollout_settings.py runs/e1_b128 --std-floors 0 0.02 0.05 0.1 --episodes 50
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import time

import torch

from diffpolicy.core.samplers import StepNoise
from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.rl.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="runs, checkpoints or policy directories")
    parser.add_argument("--horizons", type=int, nargs="+", default=[])
    parser.add_argument("--std-floors", type=float, nargs="+", default=[])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=200_000, help="first seed (default: validation seeds)")
    parser.add_argument("--n-envs", type=int, default=10)
    args = parser.parse_args()
    if not args.horizons and not args.std_floors:
        parser.error("give --horizons and / or --std-floors")
    torch.set_num_threads(1)
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch thread, seeds {args.seed}.."
          f"{args.seed + args.episodes - 1}")
    print("| checkpoint | setting | success | mean return | wall s |")
    print("|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        settings = [("executed actions per chunk", h) for h in args.horizons]
        settings += [("DPPO sampler, std floor", s) for s in args.std_floors]
        for name, value in settings:
            policy = ChunkPolicy.from_pretrained(resolve_policy_dir(checkpoint))
            act = policy.sample
            if name.startswith("executed"):
                limit = policy.config.pred_horizon - policy.config.obs_horizon + 1
                if not 1 <= value <= limit:
                    raise SystemExit(f"--horizons: {value} is outside 1..{limit} (Tp - To + 1) for {checkpoint}")
                policy.config = dataclasses.replace(policy.config, action_horizon=value)
            else:
                act = dppo_sampler(policy, value)
            card = load_task(policy.metadata["task"])
            start = time.time()
            result = evaluate(act, policy.config, functools.partial(make_env, card),
                              range(args.seed, args.seed + args.episodes), args.n_envs)
            successes = round(result["eval_success"] * args.episodes)
            print(f"| {checkpoint} | {name} {value:g} | {successes}/{args.episodes} | {result['eval_return']:.1f} | "
                  f"{time.time() - start:.0f} |", flush=True)


def dppo_sampler(policy: ChunkPolicy, std_floor: float):
    """`act(obs, generator)` -> chunks in data units, sampled as DPPO's rollouts sample."""
    if policy.config.process.type != "diffusion":
        raise SystemExit(f"--std-floors: DPPO's sampler is for diffusion policies, not {policy.config.process.type}")
    noise = StepNoise(std_floor=std_floor, eta=1.0)

    def act(obs, generator):
        return policy.unnormalize_action(policy.sample_chain(policy.encode_obs(obs), noise, generator).x0)
    return act


if __name__ == "__main__":
    main()

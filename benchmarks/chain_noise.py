"""Where a fine-tuning chain's exploration noise goes: per-step std vs the spread of the executed action.

For one imitation checkpoint, on `--envs` x `--chunks` states of its task (the deterministic policy's own
rollouts from seeds 300000...), each noise control samples the chain `--draws` times from the same initial
noise draws and reports the mean std of every step (the transitions PPO scores) and the spread of the
executed actions across draws (normalized units), against the deterministic sampler's spread (initial noise
only). A PPO ratio moves by about (x - mean) / std per unit of change of a step's mean, so a small step std
with a wide action spread is a ratio that is both sensitive and exploring off the policy's distribution.

    python benchmarks/chain_noise.py --checkpoint runs/main_flow_dart/train/checkpoints/step_00036000 \\
        --noise euler:0.03 ddim:1.0:0.02 --inference-steps 4
    python benchmarks/chain_noise.py --checkpoint runs/main/train/checkpoints/step_00036000 --noise ddim:1.0:0.02 \\
        --finetune-steps 5

`--compare RUN/checkpoints/step_N ...`: also the RMS change of the deterministic executed actions from the
start's (same states, same initial noise), how far fine-tuning moved the policy.

`--noise` entries: `euler:STD` (Euler plus a constant std: flow PPO's `std_floor` without `train_eta`, the
std ReinFlow's noise network starts at), `ddim:ETA:FLOOR` (the DDIM step with eta and a std floor: DPPO's
`train_eta` / `std_floor`, flow PPO's `train_eta` / `std_floor`).
"""

from __future__ import annotations

import argparse
import functools

import torch

from diffpolicy.core.samplers import StepNoise
from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.rl.chain_ppo import executed_tokens
from diffpolicy.rl.vec_env import make_chunk_vec_env


def parse_noise(text: str) -> StepNoise:
    kind, *values = text.split(":")
    if kind == "euler" and len(values) == 1:
        return StepNoise(std_floor=float(values[0]))
    if kind == "ddim" and len(values) == 2:
        return StepNoise(eta=float(values[0]), std_floor=float(values[1]))
    raise SystemExit(f"--noise {text!r}: expected euler:STD or ddim:ETA:FLOOR")


def states(policy: ChunkPolicy, task: str, n_envs: int, chunks: int) -> dict[str, torch.Tensor]:
    """Observations `{key: (n_envs * chunks, To, ...)}` along the deterministic policy's own rollouts."""
    envs = make_chunk_vec_env(functools.partial(make_env, load_task(task)), policy.config, n_envs)
    obs, _ = envs.reset(seed=list(range(300000, 300000 + n_envs)))
    generator = torch.Generator().manual_seed(0)  # the initial noise too: the same states on every run
    seen = []
    for _ in range(chunks):
        batch = {k: torch.as_tensor(v) for k, v in obs.items()}
        seen.append(batch)
        with torch.no_grad():
            obs, *_ = envs.step(policy.sample(batch, generator=generator).numpy())
    envs.close()
    return {k: torch.cat([b[k] for b in seen]) for k in seen[0]}


def executed_spread(policy: ChunkPolicy, cond: torch.Tensor, noise: StepNoise, draws: int):
    """(mean std per step `(K,)` over executed positions, action spread across `draws`)."""
    executed = executed_tokens(policy)
    actions, stds = [], []
    for draw in range(draws):
        with torch.no_grad():
            result = policy.sample_chain(cond, noise, torch.Generator().manual_seed(draw))
        actions.append(result.x0[:, executed])
        stds.append(result.chain.std[:, :, executed].mean((0, 2, 3)))
    return torch.stack(stds).mean(0), float(torch.stack(actions).std(0).mean())


def deterministic(policy: ChunkPolicy) -> StepNoise:
    return StepNoise(eta=0.0) if policy.config.process.type == "diffusion" else StepNoise()


def executed_shift(start: ChunkPolicy, tuned: ChunkPolicy, cond: torch.Tensor) -> float:
    """RMS over states, positions and dims of tuned's minus start's deterministic executed actions."""
    executed = executed_tokens(start)
    with torch.no_grad():
        a, b = (p.sample_chain(cond, deterministic(p), torch.Generator().manual_seed(0)).x0[:, executed]
                for p in (start, tuned))
    return float((b - a).pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--noise", nargs="*", default=[])
    parser.add_argument("--compare", nargs="*", default=[], help="fine-tuned checkpoints of this start")
    parser.add_argument("--inference-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=0, help="steps a DPPO run scores (marked *)")
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = ChunkPolicy.from_pretrained(resolve_policy_dir(args.checkpoint))
    policy.set_sampling(inference_steps=args.inference_steps,
                        eta=0.0 if policy.config.process.type == "diffusion" else None)
    cond = policy.encode_obs(states(policy, policy.metadata["task"], args.envs, args.chunks))
    steps = policy.config.inference_steps
    scored = set(range(steps - args.finetune_steps, steps)) if args.finetune_steps else set(range(steps))
    _, spread = executed_spread(policy, cond, deterministic(policy), args.draws)
    print(f"{args.checkpoint}: {cond.shape[0]} states, {args.draws} draws, {steps} steps; "
          f"deterministic action spread {spread:.4f}")
    for path in args.compare:
        tuned = ChunkPolicy.from_pretrained(resolve_policy_dir(path))
        tuned.set_sampling(eta=0.0 if tuned.config.process.type == "diffusion" else None)
        print(f"{path}: RMS change of the deterministic executed actions {executed_shift(policy, tuned, cond):.4f}")
    print("| noise | step std (scored steps *) | executed action spread |")
    print("|---|---|---|")
    for text in args.noise:
        stds, spread = executed_spread(policy, cond, parse_noise(text), args.draws)
        cells = ", ".join(f"{float(s):.3f}{'*' if k in scored else ''}" for k, s in enumerate(stds))
        print(f"| {text} | {cells} | {spread:.4f} |")


if __name__ == "__main__":
    main()

"""`diffpolicy eval`: closed-loop evaluation of a trained policy on held-out seeds.

    diffpolicy eval --checkpoint runs/pusht_diffusion                    # best checkpoint of a run
    diffpolicy eval --checkpoint runs/pusht_diffusion/checkpoints/step_00005000 --episodes 200 \
        --seed 100000 --videos 3 --out runs/pusht_diffusion/eval

`--checkpoint` is a run directory, a checkpoint directory or a `save_pretrained` directory. The
task is the one the checkpoint was trained on; `--task` checks it. Writes `summary.json`
(success rate with its 95 % Wilson interval, mean return / coverage / length), `episodes.json`
and `videos/*.mp4` of the first `--videos` episodes; the same seeds give the same results.
`--log mcap` also writes `rollouts/episode_<i>_seed_<seed>.mcap` for the first `--log-episodes`
episodes: every tick's observations, executed action, predicted chunks and reward, for Foxglove
(with `--videos`, the rendered frames of those episodes too; see `evaluation.rollout_log`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffpolicy.envs.tasks import TaskCard, load_task
from diffpolicy.errors import ConfigError, InvalidValueError, UsageError
from diffpolicy.evaluation.rollout import evaluate
from diffpolicy.evaluation.rollout_log import McapRolloutLogger
from diffpolicy.nn.device import resolve_device
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir


class TaskMismatchError(InvalidValueError):
    """The checkpoint was trained on another task than the one asked for."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or save_pretrained directory")
    parser.add_argument("--task", default=None, help="expected task (default: the checkpoint's task)")
    parser.add_argument("--episodes", type=int, default=None, help="episodes (default: the card's eval.episodes)")
    parser.add_argument("--seed", type=int, default=None,
                        help="first seed; episodes use seed, seed+1, ... (default: the card's eval.seed_start)")
    parser.add_argument("--videos", type=int, default=0, help="write mp4 videos of the first K episodes")
    parser.add_argument("--out", default=None, help="output directory (default: <checkpoint>/eval_seed<S>_n<N>)")
    parser.add_argument("--n-envs", type=int, default=10, help="environments stepped together")
    parser.add_argument("--inference-steps", type=int, default=None, help="denoising steps (default: the policy's)")
    parser.add_argument("--eta", type=float, default=None,
                        help="diffusion only: DDIM stochasticity in [0, 1], 1 = DDPM steps (default: the policy's)")
    parser.add_argument("--log", choices=["mcap"], default=None,
                        help="per-tick rollout logs: mcap (Foxglove) files in <out>/rollouts")
    parser.add_argument("--log-episodes", type=int, default=10, help="with --log: log the first K episodes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def load_policy_for_task(checkpoint: str | Path, task: str | None) -> tuple[ChunkPolicy, TaskCard, Path]:
    """Load the policy `checkpoint` names and the card of its task, checking `task` when given."""
    policy_dir = resolve_policy_dir(checkpoint)
    policy = ChunkPolicy.from_pretrained(policy_dir)
    trained_on = policy.metadata.get("task")
    if trained_on is None and task is None:
        raise TaskMismatchError(f"{policy_dir / 'config.json'} names no task in its metadata; pass --task")
    if task is not None and trained_on is not None and load_task(task).name != trained_on:
        raise TaskMismatchError(f"checkpoint {policy_dir} was trained on task {trained_on!r}, not {task!r}; "
                                f"pass a checkpoint of {task!r} or --task {trained_on}")
    card = load_task(task if task is not None else trained_on)
    cfg = policy.config
    if cfg.action_dim != card.action_dim or dict(cfg.obs_shapes) != card.obs_shapes:
        raise TaskMismatchError(
            f"checkpoint {policy_dir} expects observations {dict(cfg.obs_shapes)} and {cfg.action_dim}-D actions; "
            f"task {card.name!r} ({card.source}) has {card.obs_shapes} and {card.action_dim}-D actions")
    return policy, card, policy_dir


def run(args: argparse.Namespace) -> int:
    for name in ("episodes", "n_envs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.videos < 0:
        raise UsageError(f"--videos must be >= 0, got {args.videos}")
    if args.log_episodes < 1:
        raise UsageError(f"--log-episodes must be >= 1, got {args.log_episodes}")
    policy, card, policy_dir = load_policy_for_task(args.checkpoint, args.task)
    try:
        policy.set_sampling(inference_steps=args.inference_steps, eta=args.eta)
    except ConfigError as err:
        raise UsageError(f"--inference-steps / --eta: {err}") from None
    episodes = args.episodes if args.episodes is not None else int(card.eval["episodes"])
    seed = args.seed if args.seed is not None else int(card.eval["seed_start"])
    out = Path(args.out) if args.out else policy_dir.parent / f"eval_seed{seed}_n{episodes}"
    try:
        device = resolve_device(args.device)
    except InvalidValueError as err:
        raise UsageError(f"--device: {err}") from None
    logger = McapRolloutLogger(out / "rollouts", episodes=args.log_episodes) if args.log == "mcap" else None
    try:
        result = evaluate(policy.to(device), card, episodes=episodes, seed_start=seed, n_envs=args.n_envs,
                          videos=min(args.videos, episodes), out_dir=out, device=device,
                          progress=not args.no_progress, logger=logger)
    finally:
        if logger is not None:
            logger.close()
    summary = result.summary
    print(json.dumps({"checkpoint": str(policy_dir), "task": card.name, **summary}, indent=1))
    print(f"success rate {summary['success_rate']['rate']:.3f} "
          f"[{summary['success_rate']['ci95_low']:.3f}, {summary['success_rate']['ci95_high']:.3f}] "
          f"over {summary['episodes']} episodes (seeds {summary['seeds']}); results in {out}")
    return 0


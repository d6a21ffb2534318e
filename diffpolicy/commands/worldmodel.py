"""`diffpolicy worldmodel`: collect play data, and train a latent world model for dream fine-tuning.

    diffpolicy collect --task pusht --episodes 200 --action-noise 0.1 --out datasets/pusht_play.zarr
    diffpolicy worldmodel collect --checkpoint runs/pusht_bc --task pusht --episodes 100 \
        --out datasets/pusht_bc_rollouts.zarr                        # the policy's own rollouts
    diffpolicy worldmodel train --task pusht --data datasets/pusht_play.zarr datasets/pusht_bc_rollouts.zarr \
        --out runs/wm_pusht model.members=5 train.steps=20000
    diffpolicy worldmodel train --task pusht --data ... --out runs/wm_pusht --resume       # continue
    diffpolicy finetune --algo dream --world-model runs/wm_pusht --checkpoint runs/pusht_bc --task pusht

`train` reads every episode of the `--data` stores (observation keys of the task card, executed
actions, rewards, success), holds out `train.val_fraction` of the episodes, and writes into
`--out`: `checkpoints/step_*/model/` (the best one is what `--world-model` loads), `curves.csv`,
`report.json` (held-out prediction error and ensemble disagreement vs horizon, reward error,
success classifier precision / recall) and `error_vs_horizon.png`. `key=value` overrides set
`WorldModelConfig` fields (`model.*`, `train.*`). `collect` records one episode per seed (resuming
a store skips its seeds) played by the policy's own sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import numpy as np

from diffpolicy.commands import set_torch_threads
from diffpolicy.config import apply_overrides, parse_override
from diffpolicy.envs.tasks import TaskCard, load_task, make_env
from diffpolicy.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("train", "collect"), help="train a world model | collect policy rollouts")
    parser.add_argument("--task", required=True, help="task name or card path")
    parser.add_argument("--out", required=True, help="train: run directory; collect: zarr store (appended, resumable)")
    parser.add_argument("--data", nargs="+", default=None, metavar="ZARR", help="train: replay buffers to learn from")
    parser.add_argument("--resume", action="store_true", help="train: continue the run in --out")
    parser.add_argument("--checkpoint", default=None, help="collect: the policy (run, checkpoint or policy directory)")
    parser.add_argument("--episodes", type=int, default=None, help="collect: episodes the store should hold")
    parser.add_argument("--seed-start", type=int, default=0, help="collect: first seed")
    parser.add_argument("--n-envs", type=int, default=8, help="collect: environments played together")
    parser.add_argument("--after-success", type=int, default=0, metavar="N",
                        help="collect: go on N steps past each episode's first success (what follows it: on Can, the "
                             "can dropping into the bin), recording every step's success (default 0: end there)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: two runs side by side on two cores do not oversubscribe them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train: WorldModelConfig overrides")


def action_bounds(card: TaskCard) -> tuple[np.ndarray, np.ndarray]:
    """The card's action space bounds as `(Da,)` arrays."""
    return tuple(np.broadcast_to(np.asarray(card.action[k], dtype=np.float32), (card.action_dim,)).copy()
                 for k in ("low", "high"))


def run(args: argparse.Namespace) -> int:
    set_torch_threads(args.threads)
    card = load_task(args.task)
    try:
        return train(card, args) if args.action == "train" else collect(card, args)
    except KeyboardInterrupt:
        print(f"diffpolicy worldmodel {args.action}: interrupted; rerun the same command"
              f"{' with --resume' if args.action == 'train' else ''} to continue", file=sys.stderr)
        return 130


def train(card: TaskCard, args: argparse.Namespace) -> int:
    from diffpolicy.worldmodel.data import Transitions
    from diffpolicy.worldmodel.dream import tried_rule
    from diffpolicy.worldmodel.training import WorldModelConfig, train_world_model

    if not args.data:
        raise UsageError("worldmodel train: --data needs at least one replay buffer")
    config = apply_overrides(WorldModelConfig(), list(args.overrides))
    keys = list(card.observation)
    data = Transitions.load(args.data, keys)
    env = make_env(card)
    try:
        if not any(parse_override(item)[0] == "model.quaternions" for item in args.overrides):
            model = dataclasses.replace(config.model, quaternions=task_quaternions(env, data.keys, data.dims))
            config = dataclasses.replace(config, model=model)
        low, high = action_bounds(card)
        metadata = {"task": card.name, "data_paths": [str(Path(p).resolve()) for p in args.data]}
        result = train_world_model(data, config, args.out, low, high, resume=args.resume,
                                   progress=not args.no_progress, metadata=metadata,
                                   task_rule=tried_rule(env, "reward_from_observation"))
    finally:
        env.close()
    report = result.report
    rule = f"; task rule recall {report['rule_recall']:.2f}" if "rule_recall" in report else ""
    print(f"{args.out}: world model on {data.n_episodes} episodes ({data.n_steps} steps); held-out RMSE "
          f"(normalized) h=1 {report['obs_rmse'][0]:.4f}, h={report['horizon'][-1]} {report['obs_rmse'][-1]:.4f}{rule}; "
          f"checkpoint {result.checkpoint}")
    return 0


def task_quaternions(env, keys: tuple[str, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
    """Where the task environment's sign-ambiguous quaternions (its `canonical_quaternions`, if it
    names any) start in the flat observation of `keys` with sizes `dims`: `model.quaternions`."""
    named = getattr(env.unwrapped, "canonical_quaternions", None)
    per_key = named() if named is not None else {}
    offsets = dict(zip(keys, np.cumsum([0, *dims[:-1]]).tolist()))
    return tuple(sorted(offsets[key] + start for key, starts in per_key.items() if key in offsets for start in starts))


def collect(card: TaskCard, args: argparse.Namespace) -> int:
    from diffpolicy.data.replay_buffer import ReplayBuffer
    from diffpolicy.policies import ChunkPolicy
    from diffpolicy.policies.locate import resolve_policy_dir
    from diffpolicy.rl.chunk_env import check_task
    from diffpolicy.worldmodel.play import record_episodes, save_episodes

    if args.checkpoint is None or args.episodes is None or args.episodes < 1:
        raise UsageError("worldmodel collect: --checkpoint and --episodes (>= 1) are required")
    if args.after_success < 0:
        raise UsageError(f"worldmodel collect: --after-success expects steps >= 0, got {args.after_success}")
    policy_dir = resolve_policy_dir(args.checkpoint)
    policy = ChunkPolicy.from_pretrained(policy_dir)
    check_task(policy.metadata, card.name, str(policy_dir))
    out = Path(args.out)
    done: set[int] = set()
    if out.exists():
        with ReplayBuffer.open(out) as buffer:
            if buffer.attrs.get("task") != card.name:
                raise UsageError(f"{out} holds episodes of task {buffer.attrs.get('task')!r}, not {card.name!r}")
            held = int(dict(buffer.attrs.get("collection", {}) or {}).get("after_success", 0))
            if held != args.after_success:
                raise UsageError(f"{out} holds episodes recorded with --after-success {held}, not {args.after_success}; "
                                 "append with the same setting or choose another --out")
            done = set(buffer.episode_meta("seed").tolist()) if buffer.n_episodes else set()
    missing = args.episodes - len(done)
    seeds = [s for s in range(args.seed_start, args.seed_start + args.episodes + len(done)) if s not in done][:max(missing, 0)]
    attrs = {"task": card.name, "collection": {"policy": str(policy_dir.resolve()), "kind": "policy_rollouts",
                                               **({"after_success": args.after_success} if args.after_success else {})}}
    for first in range(0, len(seeds), args.n_envs):
        batch = seeds[first:first + args.n_envs]
        episodes = record_episodes(policy.sample, policy.config, functools.partial(make_env, card), batch, args.n_envs,
                                   args.after_success)
        save_episodes(episodes, out, attrs)
        if not args.no_progress:
            print(f"[worldmodel collect] {len(done) + first + len(batch)}/{args.episodes} episodes, "
                  f"{sum(e['success'] for e in episodes)}/{len(batch)} successes in this batch", flush=True)
    print(f"{out}: {args.episodes} episodes of {policy_dir}'s rollouts")
    return 0

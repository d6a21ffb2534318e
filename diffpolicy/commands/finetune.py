"""`diffpolicy finetune`: RL fine-tuning of an imitation checkpoint (DPPO, flow PPO, DSRL).

    diffpolicy finetune --algo dppo --checkpoint runs/pusht_diffusion --task pusht --env-steps 200000
    diffpolicy finetune --algo flowppo --checkpoint runs/pusht_flow --task pusht clip=0.02 lr=3e-5
    diffpolicy finetune --algo dsrl --checkpoint runs/pusht_diffusion --task pusht algorithm=sac
    diffpolicy finetune --algo dppo --checkpoint runs/pusht_diffusion --task pusht bc_coef=0.1   # + BC on its demos
    diffpolicy finetune --algo dppo --checkpoint runs/pusht_diffusion --task pusht --resume   # continue

Writes into `--out` (default runs/finetune_<task>_<algo>): `curves.csv` and `curves.png` (success
and return vs environment steps), `tensorboard/`, and the fine-tuned policy: for dppo / flowppo
`checkpoints/step_*/policy` (loads with `ChunkPolicy.from_pretrained`, sampling through the
fine-tuned copy), for dsrl `policy/` (loads with `diffpolicy.rl.dsrl.DSRLPolicy.load`). Both run
under `diffpolicy eval --checkpoint ...` for dppo / flowppo. Overrides `key=value` set fields of
the algorithm's config (`DPPOConfig`, `FlowPPOConfig`, `DSRLConfig`), read by `diffpolicy.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

from diffpolicy.config import apply_overrides
from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.errors import UsageError
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.rl import dppo, dsrl, flow_ppo
from diffpolicy.rl.chunk_env import check_task
from diffpolicy.rl.rewards import absorbing_success_env

ALGORITHMS = {"dppo": (dppo, dppo.DPPOConfig), "flowppo": (flow_ppo, flow_ppo.FlowPPOConfig),
              "dsrl": (dsrl, dsrl.DSRLConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", required=True, choices=sorted(ALGORITHMS), help="fine-tuning algorithm")
    parser.add_argument("--checkpoint", required=True, help="imitation run, checkpoint or save_pretrained directory")
    parser.add_argument("--task", required=True, help="task name or card path (must be the checkpoint's task)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/finetune_<task>_<algo>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--env-steps", type=int, default=None, help="budget in environment steps")
    parser.add_argument("--n-envs", type=int, default=None, help="environments stepped together")
    parser.add_argument("--async", dest="asynchronous", action="store_true",
                        help="subprocess environments (dppo, flowppo)")
    parser.add_argument("--seed", type=int, default=None, help="run seed")
    parser.add_argument("--absorbing-success", action="store_true",
                        help="treat success as absorbing: it pays reward 1 for every step left (PushT's "
                             "dense reward otherwise favours hovering below the threshold)")
    parser.add_argument("--no-progress", action="store_true", help="no per-iteration progress lines")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="algorithm config overrides")


def build_config(config_cls: type, args: argparse.Namespace) -> Any:
    """The algorithm's config from its defaults, the flags and `key=value` overrides (read by the
    package's one config reader: unknown keys and wrong types are named)."""
    flags: dict[str, Any] = {key: getattr(args, key) for key in ("env_steps", "n_envs", "seed")
                             if getattr(args, key) is not None}
    if args.asynchronous:
        if "asynchronous" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise UsageError(f"--async: {config_cls.__name__} has no subprocess environments")
        flags["asynchronous"] = True
    return apply_overrides(apply_overrides(config_cls(), flags), list(args.overrides))


def run(args: argparse.Namespace) -> int:
    module, config_cls = ALGORITHMS[args.algo]
    card = load_task(args.task)
    config = build_config(config_cls, args)
    policy_dir = resolve_policy_dir(args.checkpoint)
    policy = ChunkPolicy.from_pretrained(policy_dir)
    check_task(policy.metadata, card.name, str(policy_dir))
    run_dir = Path(args.out or f"runs/finetune_{card.name}_{args.algo}")
    env_fn = functools.partial(make_env, card)
    if args.absorbing_success:
        env_fn = functools.partial(absorbing_success_env, env_fn, card.max_episode_steps)
    try:
        result = module.finetune(policy, env_fn, config, run_dir, resume=args.resume,
                                 progress=not args.no_progress)
    except KeyboardInterrupt:
        print("diffpolicy finetune: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    print(f"{run_dir}: {args.algo} fine-tuned policy at {result.checkpoint}; curves in {run_dir / 'curves.csv'}")
    return 0

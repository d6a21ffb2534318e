"""`diffpolicy finetune`: RL fine-tuning of an imitation checkpoint (DPPO, flow PPO, DSRL, or DPPO /
flow PPO inside a learned world model).

    diffpolicy finetune --algo dppo --checkpoint runs/pusht_diffusion --task pusht --env-steps 200000
    diffpolicy finetune --algo flowppo --checkpoint runs/pusht_flow --task pusht clip=0.02 lr=3e-5
    diffpolicy finetune --algo dsrl --checkpoint runs/pusht_diffusion --task pusht algorithm=sac
    diffpolicy finetune --algo dppo --checkpoint runs/pusht_diffusion --task pusht bc_coef=0.1   # + BC on its demos
    diffpolicy finetune --algo dppo --checkpoint runs/pusht_diffusion --task pusht --resume   # continue
    torchrun --standalone --nproc_per_node 2 -m diffpolicy.cli finetune --algo dppo --checkpoint ... --task pusht
    diffpolicy finetune --algo dream --world-model runs/wm_pusht --checkpoint runs/pusht_diffusion --task pusht \
        --env-steps 500000 dream.real_steps=20000      # imagined steps; a counted real budget (mixed mode)

`--algo dream` (`diffpolicy.worldmodel.dream`) runs DPPO for a diffusion checkpoint and flow PPO for
a flow one on rollouts imagined by the world model of `diffpolicy worldmodel train`; `--env-steps`
is then the imagined budget, `dream.*` overrides set the `DreamConfig`, the others the algorithm's;
its imagined episodes start from the world model's data (`--world-model-data` to choose others).

Under `torchrun` (dppo and flowppo) every process steps its own `--n-envs` environments and the
gradients are averaged (`diffpolicy.rl.distributed`); rank 0 evaluates, logs and checkpoints, and
`--resume` needs the same number of processes.

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

from diffpolicy.commands import set_torch_threads
from diffpolicy.config import apply_overrides
from diffpolicy.envs.tasks import TaskCard, load_task, make_env
from diffpolicy.errors import UsageError
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.rl import dppo, dsrl, flow_ppo
from diffpolicy.rl.chunk_env import check_task
from diffpolicy.rl.rewards import absorbing_success_env, sparse_success_env
from diffpolicy.train.distributed import process_group

ALGORITHMS = {"dppo": (dppo, dppo.DPPOConfig), "flowppo": (flow_ppo, flow_ppo.FlowPPOConfig),
              "dsrl": (dsrl, dsrl.DSRLConfig)}
DREAM = "dream"  # DPPO (diffusion) or flow PPO (flow) in a world model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", required=True, choices=sorted([*ALGORITHMS, DREAM]), help="fine-tuning algorithm")
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
    parser.add_argument("--sparse-success", action="store_true",
                        help="reward 1 on the step that succeeds and 0 otherwise (DPPO's robomimic reward; "
                             "for a policy that already succeeds often, where a dense reward barely tells "
                             "success from hovering near it)")
    parser.add_argument("--world-model", default=None,
                        help="dream: a `diffpolicy worldmodel train` run (its best checkpoint) or model directory")
    parser.add_argument("--world-model-data", nargs="+", default=None, metavar="ZARR",
                        help="dream: replay buffers imagined episodes start from (default: the world model's data)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the learner and the batched policy calls (default 1: a "
                             "second thread spins more than it helps at these sizes on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no per-iteration progress lines")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="algorithm config overrides")


def build_config(config_cls: type, args: argparse.Namespace, overrides: list[str]) -> Any:
    """The algorithm's config from its defaults, the flags and `key=value` overrides (read by the
    package's one config reader: unknown keys and wrong types are named)."""
    flags: dict[str, Any] = {key: getattr(args, key) for key in ("env_steps", "n_envs", "seed")
                             if getattr(args, key) is not None}
    if args.asynchronous:
        if "asynchronous" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise UsageError(f"--async: {config_cls.__name__} has no subprocess environments")
        if args.algo == DREAM:
            raise UsageError("--async: a dream's environments are imagined in this process")
        flags["asynchronous"] = True
    return apply_overrides(apply_overrides(config_cls(), flags), overrides)


def run(args: argparse.Namespace) -> int:
    set_torch_threads(args.threads)
    card = load_task(args.task)
    if args.absorbing_success and args.sparse_success:
        raise UsageError("--absorbing-success and --sparse-success: choose one reward")
    if args.algo != DREAM and (args.world_model or args.world_model_data):
        raise UsageError(f"--world-model / --world-model-data: only for --algo {DREAM}, not {args.algo}")
    if args.algo != DREAM:  # settings are checked before anything is loaded
        module, config_cls = ALGORITHMS[args.algo]
        config = build_config(config_cls, args, list(args.overrides))
    policy_dir = resolve_policy_dir(args.checkpoint)
    policy = ChunkPolicy.from_pretrained(policy_dir)
    check_task(policy.metadata, card.name, str(policy_dir))
    if args.algo == DREAM:  # DPPO or flow PPO, by the checkpoint's process
        module, config_cls = ALGORITHMS["dppo" if policy.config.process.type == "diffusion" else "flowppo"]
        config = build_config(config_cls, args, [o for o in args.overrides if not o.startswith("dream.")])
    run_dir = Path(args.out or f"runs/finetune_{card.name}_{args.algo}")
    env_fn = functools.partial(make_env, card)
    try:
        with process_group("cpu") as ctx:
            if ctx.enabled and args.algo in (DREAM, "dsrl"):
                raise UsageError(f"--algo {args.algo} runs in one process; torchrun is for dppo and flowppo")
            if args.algo == DREAM:  # it shapes the reward itself: its imagination and model need the raw one too
                result = dream_finetune(policy, env_fn, config, card, args, run_dir)
            else:
                if args.absorbing_success:
                    env_fn = functools.partial(absorbing_success_env, env_fn, card.max_episode_steps)
                if args.sparse_success:
                    env_fn = functools.partial(sparse_success_env, env_fn)
                distributed = {"ctx": ctx} if ctx.enabled else {}
                result = module.finetune(policy, env_fn, config, run_dir, resume=args.resume,
                                         progress=not args.no_progress, **distributed)
    except KeyboardInterrupt:
        print("diffpolicy finetune: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    if not ctx.is_main:
        return 0
    best = "" if result.best in (None, result.checkpoint) else f" (best evaluated: {result.best})"
    print(f"{run_dir}: {args.algo} fine-tuned policy at {result.checkpoint}{best}; curves in {run_dir / 'curves.csv'}")
    return 0


def dream_finetune(policy: ChunkPolicy, env_fn, config: Any, card: TaskCard, args: argparse.Namespace,
                   run_dir: Path) -> Any:
    """`--algo dream`: load the world model and its data, then `worldmodel.dream.finetune`."""
    from diffpolicy.worldmodel import dream
    from diffpolicy.worldmodel.data import Transitions
    from diffpolicy.worldmodel.model import LatentWorldModel
    from diffpolicy.worldmodel.training import resolve_world_model_dir

    if args.world_model is None:
        raise UsageError(f"--algo {DREAM} needs --world-model (a `diffpolicy worldmodel train` run)")
    model = LatentWorldModel.load(resolve_world_model_dir(args.world_model))
    if model.metadata.get("task") not in (None, card.name):
        raise UsageError(f"--world-model: a model of task {model.metadata['task']!r}, not {card.name!r}")
    paths = args.world_model_data or model.metadata.get("data_paths")
    if not paths:
        raise UsageError("--world-model-data: the world model records no data paths; name the replay buffers")
    data = Transitions.load(paths, model.obs_keys)
    dream_config = apply_overrides(dream.DreamConfig(),
                                   [o[len("dream."):] for o in args.overrides if o.startswith("dream.")])
    return dream.finetune(policy, env_fn, config, dream_config, model, data, run_dir, card.max_episode_steps,
                          success_reward=1.0 if args.absorbing_success else None,
                          sparse_success=args.sparse_success, resume=args.resume, progress=not args.no_progress)

"""`diffpolicy train`: imitation training of a diffusion or flow chunk policy on a task's dataset.

    diffpolicy train --task pusht                                  # diffusion, runs/pusht_diffusion
    diffpolicy train --task lift --policy flow --out runs/lift_flow train.steps=20000 optim.lr=3e-4
    diffpolicy train --task pusht --out runs/pusht_diffusion --resume
    torchrun --nproc_per_node 2 -m diffpolicy.cli train --task pusht     # DDP (gloo on CPU)

Overrides are `dotted.key=value` (see `diffpolicy.train.config`). `--resume` continues the latest
checkpoint of `--out` with the run's saved config (overrides given with it still apply).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffpolicy.envs.tasks import load_task
from diffpolicy.evaluation.rollout import score_policy
from diffpolicy.train.config import METHODS, config_for_run
from diffpolicy.train.trainer import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name (envs/<task>.yaml) or path to a task card")
    parser.add_argument("--policy", choices=METHODS, default="diffusion", help="generative process (default: diffusion)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<task>_<policy>)")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. optim.lr=3e-4 train.steps=5000")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.out or f"runs/{Path(args.task).stem}_{args.policy}")
    is_main = int(os.environ.get("RANK", "0")) == 0
    card = load_task(args.task)
    config = config_for_run(card, args.policy, args.overrides, run_dir, args.resume)
    try:
        result = train(config, run_dir, resume=args.resume, progress=not args.no_progress, card=card,
                       scorer=score_policy)
    except KeyboardInterrupt:
        print(f"diffpolicy train: interrupted; continue with: diffpolicy train --task {args.task} "
              f"--policy {args.policy} --out {run_dir} --resume", file=sys.stderr)
        return 130
    if is_main:
        print(f"{run_dir}: trained {result.step} steps; latest checkpoint {result.latest}, best {result.best}")
        print(f"evaluate with: diffpolicy eval --checkpoint {run_dir}")
    return 0

"""`diffpolicy collect`: record expert demonstrations of a task into a zarr ReplayBuffer.

    diffpolicy collect --task pusht                      # the card's dataset recipe
    diffpolicy collect --task pusht --episodes 50 --out datasets/pusht_small.zarr --seed-start 0
    diffpolicy collect --task pusht --action-noise 0.05 --out datasets/pusht_dart.zarr   # DART noise
    diffpolicy collect --task pusht --workers 1          # episodes in this process only

Unset options come from the task card's `dataset` section. Rerunning the same command on an
existing store resumes it (seeds not yet attempted); `--overwrite` starts it afresh. Episodes are
played by `--workers` processes, by default one per CPU core this process may use: the store is the
same for any number, so the command, a job of its own, takes every core (`collect()` called from
code plays them in the caller's process unless asked).
"""

from __future__ import annotations

import argparse
import sys

from diffpolicy.collection.collect import collect, recipe_settings
from diffpolicy.collection.episodes import available_cpus
from diffpolicy.envs.tasks import load_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name (envs/<task>.yaml) or path to a task card")
    parser.add_argument("--episodes", type=int, default=None, help="episodes the store should hold (card: dataset.episodes)")
    parser.add_argument("--out", default=None, help="zarr store path (card: dataset.path)")
    parser.add_argument("--seed-start", type=int, default=None, help="first seed (card: dataset.seed_start, else 0)")
    parser.add_argument("--only-success", action=argparse.BooleanOptionalAction, default=None,
                        help="keep only successful episodes (card: dataset.only_success)")
    parser.add_argument("--action-noise", type=float, nargs="+", default=None, metavar="SIGMA",
                        help="DART: execute the expert's action plus N(0, SIGMA * half-range) noise and record the "
                             "clean action; one SIGMA or one per action dimension (card: dataset.action_noise, else 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes playing episodes; the store is the same for any number "
                             f"(default: the CPU cores this process may use, {available_cpus()} here)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store instead of resuming it")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    card = load_task(args.task)
    recipe = card.dataset
    settings = recipe_settings(card)
    given = {"seed_start": args.seed_start, "only_success": args.only_success, "action_noise": args.action_noise}
    settings.update({name: value for name, value in given.items() if value is not None})
    try:
        summary = collect(
            card,
            episodes=args.episodes if args.episodes is not None else int(recipe["episodes"]),
            out=args.out if args.out is not None else recipe["path"],
            overwrite=args.overwrite,
            **settings,
            progress=not args.no_progress,
            workers=args.workers if args.workers is not None else available_cpus(),
        )
    except KeyboardInterrupt:
        print("diffpolicy collect: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"{summary.path}: {summary.episodes} episodes ({summary.new_episodes} new), "
          f"{summary.successes}/{summary.attempted} seeds succeeded ({summary.success_rate:.1%}), "
          f"{summary.seconds:.1f} s")
    return 0

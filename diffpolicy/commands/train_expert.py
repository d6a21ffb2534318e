"""`diffpolicy train-expert --task hopper`: train (or reuse) a task's medium learned expert.

Prints one progress line per evaluation and, at the end, the training record as JSON (with
`"reused": true` when an existing expert was kept). Exits 1 when training ended below the target,
2 on a bad card or an existing expert that does not fit the request.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task card name (envs/<task>.yaml) or path to a card")
    parser.add_argument("--steps", type=int, default=None, help="env steps at most (default: the card's max_steps)")
    parser.add_argument("--target-return", type=float, default=None,
                        help="evaluation return at which training stops (default: the card's target_return)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the card's seed)")
    parser.add_argument("--retrain", action="store_true", help="train even if a fitting expert exists")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffpolicy.envs.tasks import load_task
    from diffpolicy.rl.expert_training import train_expert

    torch.set_num_threads(args.threads)
    card = load_task(args.task)
    result = train_expert(card, steps=args.steps, target_return=args.target_return, seed=args.seed,
                          retrain=args.retrain, log=lambda line: print(line, file=sys.stderr, flush=True))
    summary = result.summary()
    summary.pop("history")
    print(json.dumps(summary, indent=2))
    return 0 if result.meta["reached_target"] else 1

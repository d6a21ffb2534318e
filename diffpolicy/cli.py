"""The `diffpolicy` command line: one subcommand per module in `diffpolicy.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
lazily so that `--help` stays fast and a command's heavy dependencies load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command name, module under diffpolicy.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "train a small chunk policy on a synthetic bimodal task and report its modes"),
    ("train-expert", "train_expert", "train (or reuse) a task's medium learned expert with stable-baselines3"),
    ("collect", "collect", "record expert demonstrations of a task into a zarr dataset (resumable)"),
    ("train", "train", "imitation-train a diffusion or flow chunk policy on a task's dataset (resumable, DDP)"),
    ("eval", "eval", "evaluate a trained policy on held-out seeds: success rate with its 95-percent Wilson interval, videos"),
    ("main", "main", "the main job: collect PushT demonstrations, train, evaluate, write a report (runs/main)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpolicy",
        description="Diffusion and flow-matching action-chunk policies for robots.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    if known.command is None:
        parser.print_help()
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"diffpolicy.commands.{known._module}")
    command_parser = argparse.ArgumentParser(
        prog=f"diffpolicy {known.command}",
        description=next(h for n, _, h in COMMANDS if n == known.command),
    )
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `diffpolicy` command line: one subcommand per module in `diffpolicy.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
lazily so that `--help` stays fast and a command's heavy dependencies load only when it runs.
Bad input anywhere in the package raises a `DiffpolicyError`; it is caught once, here: the message
goes to stderr and the exit code is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffpolicy.errors import DiffpolicyError

# (command name, module under diffpolicy.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "train a small chunk policy on a synthetic bimodal task and report its modes"),
    ("train-expert", "train_expert", "train (or reuse) a task's medium learned expert with stable-baselines3"),
    ("collect", "collect", "record expert demonstrations of a task into a zarr dataset (resumable)"),
    ("train", "train", "imitation-train a diffusion or flow chunk policy on a task's dataset (resumable, DDP)"),
    ("dataset", "dataset", "import a LeRobot v3.0 dataset into a zarr replay buffer, or export one to LeRobot's layout"),
    ("eval", "eval", "evaluate a trained policy on held-out seeds: success rate with its 95-percent Wilson interval, videos"),
    ("compare", "compare", "compare two policies' evaluations seed by seed: Wilson intervals, gains and losses, McNemar's exact p"),
    ("generate", "generate", "train and sample the image (digits, PushT frames) and text models of the shared core"),
    ("finetune", "finetune", "RL fine-tuning of a checkpoint: DPPO, flow PPO, DSRL, or DPPO / flow PPO in a world model (dream)"),
    ("worldmodel", "worldmodel", "train a latent world model (ensemble) from replay buffers, or record a policy's rollouts"),
    ("serve", "serve", "serve a trained policy over ZeroMQ (msgpack, never pickle; CURVE keys beyond loopback)"),
    ("bridge", "bridge", "run a policy on a robot through ROS 1 (rospy) or ROS 2 (Cyclone DDS) with the real-time controller"),
    ("sim-robot", "sim_robot", "a simulated robot (a package task) behind the ROS bridge's topics"),
    ("main", "main", "the main job: collect PushT demonstrations, train, evaluate, write a report (runs/main)"),
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it only picks the command; each command parses its own arguments."""
    parser = argparse.ArgumentParser(
        prog="diffpolicy",
        description="Diffusion and flow-matching action-chunk policies for robots.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, _, help_text in COMMANDS:
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv)  # handles --help and reports unknown options
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    parser.parse_args([name])  # an unknown command exits 2 with the list of commands
    module_name, help_text = next((m, h) for n, m, h in COMMANDS if n == name)
    module = importlib.import_module(f"diffpolicy.commands.{module_name}")
    command_parser = argparse.ArgumentParser(prog=f"diffpolicy {name}", description=help_text)
    module.add_arguments(command_parser)
    # Intermixed: `train --task pusht a=1 --resume b=2` mixes options and key=value overrides.
    args = command_parser.parse_intermixed_args(rest)
    try:
        return int(module.run(args) or 0)
    except DiffpolicyError as err:
        print(f"diffpolicy {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Command-line subcommands. Each module defines `add_arguments(parser)` and `run(args) -> int`."""

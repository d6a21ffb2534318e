"""Command-line subcommands. Each module defines `add_arguments(parser)` and `run(args) -> int`."""

from diffpolicy.errors import UsageError


def set_torch_threads(threads: int) -> None:
    """A command's `--threads`: torch's CPU threads for this process, or a UsageError naming a bad value."""
    if isinstance(threads, bool) or threads < 1:
        raise UsageError(f"--threads: expected an integer >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)

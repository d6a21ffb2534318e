"""Data-parallel training through `torchrun`: process-group setup/teardown and a resumable sampler.

`torchrun --nproc_per_node N -m diffpolicy.cli train ...` sets `RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; `setup_distributed` reads them and joins the
process group (nccl on GPU, gloo on CPU). Without them it returns a single-process context, so
the trainer has one code path. Only rank 0 logs and writes checkpoints (`DistContext.is_main`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from diffpolicy.nn.device import resolve_device

COLLECTIVE_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group if `WORLD_SIZE` > 1, else return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        # Rank 0 evaluates (rollouts of minutes to an hour on a robosuite task) while the other ranks
        # wait at their next collective: far longer than the default 30-minute timeout allows.
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def teardown_distributed(clean: bool = False) -> None:
    """Leave the process group (no-op when none was joined).

    `clean`: the job ended without an error; the ranks first meet at a barrier, so no rank closes
    its connections while another still uses them (a rank that left alone while rank 0 was still
    writing its checkpoint aborted once at exit in CI: "terminate called without an active
    exception"). After an error there is no barrier: the other ranks must not wait for a failed one.
    """
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """`setup_distributed(device)` for the block; on leaving it, `teardown_distributed`, clean
    unless the block raised."""
    ctx = setup_distributed(device)
    try:
        yield ctx
    except BaseException:
        teardown_distributed(clean=False)
        raise
    teardown_distributed(clean=True)


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in a single process)."""
    if not ctx.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` (shuffle with `seed + epoch`, drop_last) that can start mid-epoch.

    Rank r of W takes positions r, r + W, r + 2W, ... of the epoch's permutation, so a global
    batch of W * b samples across ranks is exactly the slice a single process with batch W * b
    takes. `set_position(epoch, start)` skips the first `start` samples of this rank's share,
    which is how a resumed run continues from the same data-loader position.
    """

    def __init__(self, dataset: Dataset, ctx: DistContext, seed: int) -> None:
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start

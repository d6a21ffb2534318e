"""Thin `torch.utils.data.Dataset` adapter over a `SequenceSampler` (torch tensors out).

Only this module of `diffpolicy.data` imports torch. `__getitems__` lets a `DataLoader` with
automatic batching fetch a whole batch through `SequenceSampler.sample_batch` (one gather per key)
while the default collate function still stacks per-window dicts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from diffpolicy.data.sequence_sampler import SequenceSampler


class WindowDataset(Dataset):
    """Map-style dataset of windows: `{"obs": {key: (To, ...)}, "action": (Tp, Da),
    "action_is_pad": (Tp,), "obs_is_pad": (To,)}` as tensors (dtypes as stored; masks bool)."""

    def __init__(self, sampler: SequenceSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        batch = _to_tensors(self.sampler.sample_batch(np.asarray(indices, dtype=np.int64)))
        return [_select(batch, row) for row in range(len(indices))]


def _to_tensors(tree):
    if isinstance(tree, dict):
        return {key: _to_tensors(value) for key, value in tree.items()}
    return torch.from_numpy(np.ascontiguousarray(tree))


def _select(tree, row: int):
    if isinstance(tree, dict):
        return {key: _select(value, row) for key, value in tree.items()}
    return tree[row]

"""The one `torch.utils.data.Dataset` adapter over a `SequenceSampler` (torch tensors out).

Only this module of `diffpolicy.data` imports torch. Two ways to batch, both through one
`SequenceSampler.sample_batch` gather per key:
- `DataLoader(dataset, batch_size=B)`: automatic batching calls `__getitems__`, the default
  collate function stacks the per-window dicts;
- `DataLoader(dataset, sampler=BatchSampler(...), batch_size=None)`: `dataset[indices]` returns
  the whole batch directly (the trainer's path: no split into windows and collate back, which
  costs more than the gather itself for low-dim data).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffpolicy.data.sequence_sampler import SequenceSampler


class WindowDataset(Dataset):
    """Map-style dataset of windows: `dataset[i]` -> `{"obs": {key: (To, ...)}, "action": (Tp, Da),
    "action_is_pad": (Tp,), "obs_is_pad": (To,)}`; `dataset[[i, j, ...]]` -> the same with a
    leading batch dimension B. Tensors keep the stored dtypes (masks bool)."""

    def __init__(self, sampler: SequenceSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int | Sequence[int]) -> dict:
        if isinstance(index, (int, np.integer)):
            return self.__getitems__([int(index)])[0]
        return self.batch(index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        batch = self.batch(indices)
        return [_select(batch, row) for row in range(len(indices))]

    def batch(self, indices: Sequence[int]) -> dict:
        """The windows at `indices` as one batch of tensors `(B, ...)`."""
        return _to_tensors(self.sampler.sample_batch(np.asarray(indices, dtype=np.int64)))


def _to_tensors(tree):
    if isinstance(tree, dict):
        return {key: _to_tensors(value) for key, value in tree.items()}
    return torch.from_numpy(np.ascontiguousarray(tree))


def _select(tree, row: int):
    if isinstance(tree, dict):
        return {key: _select(value, row) for key, value in tree.items()}
    return tree[row]

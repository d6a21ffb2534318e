"""Collected episodes and discarded seeds, taken in seed order and written to the store in batches.

`EpisodeWriter.add(seed, data, meta)` and `.discard(seed)` queue; the queue is written when it
holds `batch` episodes, or `MAX_BYTES` of data, or `MAX_SECONDS` have passed since the last write,
and on `flush()`. A write records the discarded seeds in `attrs.collection.discarded_seeds` first,
then appends the episodes with one `ReplayBuffer.add_episodes` call. So at any moment the store
holds the stored episodes of a prefix of the seeds, and a seed recorded as discarded is never
followed by a missing lower one that resuming would store out of order: a resumed collection
writes the store an uninterrupted one would. A run killed outright loses at most the queue
(seeds not yet recorded, which resuming plays again).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from diffpolicy.collection.errors import CollectError
from diffpolicy.data.errors import EpisodeError
from diffpolicy.data.replay_buffer import ReplayBuffer

MAX_BYTES = 64 * 2**20
MAX_SECONDS = 10.0


class EpisodeWriter:
    """Batches the episodes (and discarded seeds) of a collection into few store writes.

    buffer: the store, open for appending; collection: its `attrs.collection` dict (updated in
    place); batch: episodes per write (1 writes each one as it comes).
    """

    def __init__(self, buffer: ReplayBuffer, collection: dict[str, Any], batch: int, task: str):
        self.buffer = buffer
        self.collection = collection
        self.batch = batch
        self.task = task
        self._queue: list[tuple[int, dict[str, np.ndarray] | None, dict[str, Any] | None]] = []
        self._bytes = 0
        self._episodes = 0
        self._since = time.monotonic()

    @property
    def episodes(self) -> int:
        """Episodes in the store once the queue is written."""
        return self.buffer.n_episodes + self._episodes

    def add(self, seed: int, data: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Queue the episode of `seed` (data `(T, ...)` arrays, meta scalars) to be stored."""
        self._queue.append((seed, data, meta))
        self._episodes += 1
        self._bytes += sum(np.asarray(value).nbytes for value in data.values())
        self._write_if_due()

    def discard(self, seed: int) -> None:
        """Queue `seed` to be recorded as attempted and discarded."""
        self._queue.append((seed, None, None))
        self._write_if_due()

    def flush(self) -> None:
        """Write the queue: the discarded seeds, then the episodes. An episode the store would
        reject raises CollectError naming its seed, once what precedes it in seed order is written."""
        queue, self._queue, self._episodes, self._bytes = self._queue, [], 0, 0
        self._since = time.monotonic()
        seeds = [seed for seed, data, _ in queue if data is not None]
        episodes = [(data, meta) for _, data, meta in queue if data is not None]
        try:
            self.buffer.check_episodes(episodes)
        except EpisodeError as err:
            if err.index is None:
                raise
            bad_seed = seeds[err.index]
            self._queue = [entry for entry in queue if entry[0] < bad_seed]
            self._episodes = sum(data is not None for _, data, _ in self._queue)
            self.flush()
            raise CollectError(f"collect {self.task}: the episode of seed {bad_seed} cannot be stored: {err}") from err
        discarded = [seed for seed, data, _ in queue if data is None]
        if discarded:
            self.collection["discarded_seeds"] = [*self.collection["discarded_seeds"], *discarded]
            self.buffer.attrs["collection"] = self.collection
        if episodes:
            self.buffer.add_episodes(episodes)

    def _write_if_due(self) -> None:
        if (self._episodes >= self.batch or self._bytes >= MAX_BYTES
                or time.monotonic() - self._since >= MAX_SECONDS):
            self.flush()

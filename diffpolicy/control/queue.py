"""The action queue between the inference worker and the control tick, indexed by tick.

Every queued action belongs to one tick of the control clock and remembers where it came from
(the chunk's id and index), so the controller can prove that no action index is lost or executed
twice. The tick pops exactly the entry of its tick; a new chunk replaces (or, for temporal
ensembling, blends into) the entries of the ticks that have not been popped yet. All methods are
thread-safe (one lock, held for microseconds: the tick never waits on inference).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QueuedAction:
    """An action for one tick: `action (Da,)`, the chunk it came from and its index there, and for
    temporal ensembling the number of chunks averaged into it and their total weight."""

    tick: int
    action: np.ndarray
    chunk_id: int
    index: int
    chunks: int = 1
    weight: float = 1.0


class ActionQueue:
    """Actions keyed by tick; `pop(tick)` returns that tick's action or None (an underrun).

    Args:
        first_tick: the first tick that will be popped.
    """

    def __init__(self, first_tick: int = 0):
        self._lock = threading.Lock()
        self._entries: dict[int, QueuedAction] = {}
        self._next = first_tick

    @property
    def next_tick(self) -> int:
        """The next tick to be popped (every earlier tick is gone)."""
        with self._lock:
            return self._next

    def remaining(self) -> int:
        """Queued actions for ticks not yet popped, counted without gaps from `next_tick`."""
        with self._lock:
            count = 0
            while self._next + count in self._entries:
                count += 1
            return count

    def pop(self, tick: int) -> QueuedAction | None:
        """Remove and return the action of `tick` (None if there is none); earlier ticks are dropped."""
        with self._lock:
            for stale in range(self._next, tick):
                self._entries.pop(stale, None)
            self._next = max(self._next, tick + 1)
            return self._entries.pop(tick, None)

    def peek(self, tick: int) -> QueuedAction | None:
        with self._lock:
            return self._entries.get(tick)

    def commit(self, actions: np.ndarray, first_tick: int, chunk_id: int, first_index: int,
               ensemble_decay: float | None = None) -> int:
        """Queue `actions (N, Da)` for ticks first_tick, first_tick + 1, ...; ticks already popped
        are skipped. Returns how many were queued.

        ensemble_decay: None replaces what is queued (the newest chunk wins). A number m >= 0
        averages instead, ACT's temporal ensembling: the i-th chunk predicting a tick (i = 0 the
        oldest) weighs exp(-m i), and the queued action is the weighted mean of all of them.
        """
        with self._lock:
            queued = 0
            for offset, action in enumerate(actions):
                tick = first_tick + offset
                if tick < self._next:
                    continue
                old = self._entries.get(tick)
                chunks, weight = 1, 1.0
                if ensemble_decay is not None and old is not None:
                    new_weight = math.exp(-ensemble_decay * old.chunks)
                    chunks, weight = old.chunks + 1, old.weight + new_weight
                    action = (old.weight * old.action + new_weight * np.asarray(action)) / weight
                self._entries[tick] = QueuedAction(tick, np.array(action, copy=True), chunk_id, first_index + offset,
                                                   chunks, weight)
                queued += 1
            return queued

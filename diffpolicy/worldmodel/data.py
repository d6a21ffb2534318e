"""What a world model learns from: whole episodes of low-dim observations, the actions the
environment executed, rewards, and where an episode ended in success.

Sources are replay buffers (`diffpolicy collect`, with or without action noise; `diffpolicy
worldmodel collect`, a policy's own rollouts) and rollouts held in memory (the real steps of a
mixed dream run). A buffer's step i holds the observation the action was chosen from; the
observation after an episode's last action is the episode meta `final_obs.<key>` where the buffer
has it (stores collected by this version), so the last transition, the one that succeeds, is a
training target too. Where it is missing (older stores, imports), windows mark it (`obs_mask`).
The success label of a step is true on the last step of an episode whose `success` meta is true:
the tasks here end the episode at success (PushT, robosuite, the test tasks). A store whose episodes
go on past success (`diffpolicy worldmodel collect --after-success`) holds the label of every step
(`step_success`).

Executed actions: a store collected with action noise records the expert's clean action under
`action` and the executed one under `executed_action`; the dynamics need the executed one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.episode_meta import FINAL_OBS
from diffpolicy.worldmodel.errors import WorldModelError

EXECUTED_ACTION = "executed_action"
STEP_SUCCESS = "step_success"
"""Data key of a store whose episodes go on past success: `(T,)` bool, success at step i's result."""


@dataclass
class Transitions:
    """Episodes laid end to end. obs `(S, D)` (the `keys` concatenated, `dims` each), action
    `(S, Da)` as executed, reward `(S,)`, success `(S,)` bool, episode_ends `(E,)` (exclusive),
    final_obs `(E, D)`: each episode's observation after its last action, where final_stored
    `(E,)` says it is known (zeros elsewhere)."""

    keys: tuple[str, ...]
    dims: tuple[int, ...]
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    success: np.ndarray
    episode_ends: np.ndarray
    final_obs: np.ndarray
    final_stored: np.ndarray

    ARRAYS = ("obs", "action", "reward", "success", "episode_ends", "final_obs", "final_stored")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_episodes(cls, episodes: Sequence[dict[str, Any]], keys: Sequence[str],
                      dims: Sequence[int] | None = None) -> Transitions:
        """From episodes `{key: (T, d), "action": (T, Da), "reward": (T,), "success": bool}`, each
        with an optional "final_obs" `{key: (d,)}` and "step_success" `(T,)` (the labels of an episode
        that went on past success; `dims` is needed only when `episodes` is empty)."""
        keys = tuple(keys)
        if not episodes:
            if dims is None:
                raise WorldModelError("Transitions.from_episodes: no episodes and no dims to shape an empty set")
            return cls.empty(keys, dims, 0)
        lengths = [len(e["action"]) for e in episodes]
        obs = np.concatenate([np.concatenate([np.asarray(e[k], np.float32).reshape(len(e["action"]), -1)
                                              for k in keys], 1) for e in episodes])
        success = np.zeros(sum(lengths), dtype=bool)
        ends = np.cumsum(lengths).astype(np.int64)
        success[ends - 1] = [bool(e["success"]) for e in episodes]
        for episode, end, length in zip(episodes, ends, lengths):
            if STEP_SUCCESS in episode:
                success[end - length:end] = np.asarray(episode[STEP_SUCCESS], bool).reshape(length)
        found = tuple(int(np.asarray(episodes[0][k]).reshape(lengths[0], -1).shape[1]) for k in keys)
        final_stored = np.array(["final_obs" in e for e in episodes], dtype=bool)
        final_obs = np.zeros((len(episodes), sum(found)), np.float32)
        for i, episode in enumerate(episodes):
            if final_stored[i]:
                final_obs[i] = np.concatenate([np.asarray(episode["final_obs"][k], np.float32).reshape(-1) for k in keys])
        return cls(keys, found, obs, np.concatenate([np.asarray(e["action"], np.float32) for e in episodes]),
                   np.concatenate([np.asarray(e["reward"], np.float32).reshape(-1) for e in episodes]), success, ends,
                   final_obs, final_stored)

    @classmethod
    def empty(cls, keys: Sequence[str], dims: Sequence[int], action_dim: int) -> Transitions:
        return cls(tuple(keys), tuple(int(d) for d in dims), np.zeros((0, int(sum(dims))), np.float32),
                   np.zeros((0, action_dim), np.float32), np.zeros(0, np.float32), np.zeros(0, bool),
                   np.zeros(0, np.int64), np.zeros((0, int(sum(dims))), np.float32), np.zeros(0, bool))

    @classmethod
    def from_buffer(cls, buffer: ReplayBuffer, keys: Sequence[str]) -> Transitions:
        """Read `keys`, the executed actions, rewards, per-episode success and final observations
        (`final_obs.<key>` meta, where the buffer has it for every key) from a replay buffer."""
        where = str(buffer.path)
        stored = buffer.keys()
        missing = [k for k in (*keys, "reward") if k not in stored]
        if missing:
            raise WorldModelError(f"{where}: data key(s) {missing} missing; a world model needs the observation keys "
                                  f"{list(keys)}, the actions and 'reward'; the store has {stored}")
        collection = dict(buffer.attrs.get("collection", {}) or {})
        noisy = np.any(np.asarray(collection.get("action_noise", 0.0), dtype=np.float64) > 0)
        if EXECUTED_ACTION not in stored and noisy:
            raise WorldModelError(f"{where}: collected with action noise {collection['action_noise']!r} but holds only "
                                  f"the expert's clean actions, not the executed ones '{EXECUTED_ACTION}'; recollect "
                                  "it with this version of `diffpolicy collect`")
        action_key = EXECUTED_ACTION if EXECUTED_ACTION in stored else "action"
        arrays = {}
        for key in keys:
            array = np.asarray(buffer[key])
            if array.ndim != 2 or array.dtype == np.uint8:
                raise WorldModelError(f"{where}: data key {key!r} has shape {array.shape[1:]} ({array.dtype}) per step; "
                                      "the world model takes low-dim (d,) observations only")
            arrays[key] = array.astype(np.float32)
        ends = np.asarray(buffer.episode_ends, dtype=np.int64)
        success = np.zeros(len(arrays[keys[0]]) if keys else 0, dtype=bool)
        if STEP_SUCCESS in stored:
            success = np.asarray(buffer[STEP_SUCCESS], dtype=bool).reshape(-1)
        elif "success" in buffer.meta_keys() and len(ends):
            success[ends - 1] = np.asarray(buffer.episode_meta("success"), dtype=bool)
        obs = np.concatenate([arrays[k] for k in keys], 1)
        dims = tuple(arrays[k].shape[1] for k in keys)
        final_names = [FINAL_OBS + k for k in keys]
        if len(ends) and set(final_names) <= set(buffer.meta_keys()):
            final_obs = np.concatenate([np.asarray(buffer.episode_meta(n), np.float32).reshape(len(ends), -1)
                                        for n in final_names], 1)
            final_stored = np.ones(len(ends), bool)
        else:
            final_obs, final_stored = np.zeros((len(ends), sum(dims)), np.float32), np.zeros(len(ends), bool)
        return cls(tuple(keys), dims, obs,
                   np.asarray(buffer[action_key], dtype=np.float32), np.asarray(buffer["reward"], np.float32).reshape(-1),
                   success, ends, final_obs, final_stored)

    @classmethod
    def load(cls, paths: Sequence[str | os.PathLike], keys: Sequence[str]) -> Transitions:
        """Every episode of the replay buffers at `paths`, in order."""
        parts = []
        for path in paths:
            with ReplayBuffer.open(path, mode="r") as buffer:
                parts.append(cls.from_buffer(buffer, keys))
        return cls.concat(parts)

    @classmethod
    def concat(cls, parts: Sequence[Transitions]) -> Transitions:
        first = parts[0]
        for i, part in enumerate(parts[1:], 1):
            if part.keys != first.keys or part.dims != first.dims or (
                    part.n_steps and first.n_steps and part.action.shape[1] != first.action.shape[1]):
                raise WorldModelError(f"Transitions.concat: part {i} has keys {part.keys} dims {part.dims} action "
                                      f"{part.action.shape[1:]}, part 0 {first.keys} {first.dims} {first.action.shape[1:]}")
        parts = [p for p in parts if p.n_steps] or [first]
        offsets = np.cumsum([0] + [p.n_steps for p in parts[:-1]])
        return cls(first.keys, first.dims, np.concatenate([p.obs for p in parts]),
                   np.concatenate([p.action for p in parts]), np.concatenate([p.reward for p in parts]),
                   np.concatenate([p.success for p in parts]),
                   np.concatenate([p.episode_ends + o for p, o in zip(parts, offsets)]).astype(np.int64),
                   np.concatenate([p.final_obs for p in parts]), np.concatenate([p.final_stored for p in parts]))

    # ------------------------------------------------------------------ shape
    @property
    def n_steps(self) -> int:
        return int(self.obs.shape[0])

    @property
    def n_episodes(self) -> int:
        return int(len(self.episode_ends))

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    def episode_of(self, index: np.ndarray) -> np.ndarray:
        """Episode number of every step index."""
        return np.searchsorted(self.episode_ends, index, side="right")

    @property
    def time_index(self) -> np.ndarray:
        """`(S,)` steps since the start of each step's episode."""
        index = np.arange(self.n_steps)
        return index - self.episode_starts[self.episode_of(index)]

    @property
    def before_success(self) -> np.ndarray:
        """`(S,)` bool: the step's observation comes before every success of its episode (the states
        a task can start an episode from; false past a success in episodes that go on after it)."""
        earlier = np.cumsum(self.success) - self.success  # successes at earlier steps, from the data's start
        return earlier == earlier[self.episode_starts[self.episode_of(np.arange(self.n_steps))]] if self.n_steps \
            else np.zeros(0, bool)

    def select(self, episodes: np.ndarray) -> Transitions:
        """The given episodes (indices), in that order."""
        starts, ends = self.episode_starts[episodes], self.episode_ends[episodes]
        rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(episodes) else np.zeros(0, int)
        return Transitions(self.keys, self.dims, self.obs[rows], self.action[rows], self.reward[rows],
                           self.success[rows], np.cumsum(ends - starts).astype(np.int64), self.final_obs[episodes],
                           self.final_stored[episodes])

    def split(self, val_fraction: float, seed: int) -> tuple[Transitions, Transitions]:
        """(train, validation) by whole episodes; at least one episode each when there are two."""
        order = np.random.default_rng(seed).permutation(self.n_episodes)
        n_val = min(max(int(round(val_fraction * self.n_episodes)), 1 if val_fraction > 0 else 0), self.n_episodes - 1)
        return self.select(np.sort(order[n_val:])), self.select(np.sort(order[:n_val]))

    # ------------------------------------------------------------------ windows
    def windows(self, index: np.ndarray, history: int, horizon: int) -> dict[str, np.ndarray]:
        """Training windows at step indices `index (B,)`:

        obs_history `(B, H, D)`: observations i-H+1..i (the episode's first repeated before it);
        action `(B, K, Da)`: a_i..a_{i+K-1}; next_obs `(B, K, D)`: o_{i+1}..o_{i+K} (after the last
        action: the episode's final observation); reward, success `(B, K)`; step_mask `(B, K)`: the
        action exists (i+k is in the episode); obs_mask `(B, K)`: o_{i+k+1} is known (stored, or the
        final observation where the episode has it). Masked entries repeat valid ones.
        """
        index = np.asarray(index, dtype=np.int64)
        episode = self.episode_of(index)
        start, last = self.episode_starts[episode][:, None], self.episode_ends[episode][:, None] - 1
        past = np.clip(index[:, None] + np.arange(1 - history, 1), start, last)
        steps = index[:, None] + np.arange(horizon)
        step_mask = steps <= last
        final = (steps == last) & self.final_stored[episode][:, None]
        obs_mask = (steps + 1 <= last) | final
        steps = np.minimum(steps, last)
        next_obs = np.where(final[..., None], self.final_obs[episode][:, None], self.obs[np.minimum(steps + 1, last)])
        return {"obs_history": self.obs[past], "action": self.action[steps], "next_obs": next_obs,
                "reward": self.reward[steps], "success": self.success[steps] & step_mask,
                "step_mask": step_mask, "obs_mask": obs_mask}

    # ------------------------------------------------------------------ checkpoints
    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays as tensors (safetensors), `from_tensors` inverts it."""
        return {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))) for name in self.ARRAYS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], keys: Sequence[str], dims: Sequence[int]) -> Transitions:
        arrays = {name: tensors[name].numpy() for name in cls.ARRAYS if name in tensors}
        if "final_obs" not in arrays:  # a checkpoint written before final observations were kept
            arrays.update(final_obs=np.zeros((len(arrays["episode_ends"]), int(sum(dims))), np.float32),
                          final_stored=np.zeros(len(arrays["episode_ends"]), bool))
        return cls(tuple(keys), tuple(int(d) for d in dims), **arrays)

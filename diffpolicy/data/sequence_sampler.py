"""Episode-aware training windows over a `ReplayBuffer`, as in Diffusion Policy.

A window is identified by its episode and its start offset `i` inside that episode (relative to
the episode's first step; `i` may be negative down to `-pad_before`). With observation horizon To,
prediction horizon Tp and latency k >= 0 it covers

    observations  steps i, i+1, ..., i+To-1         (the first To steps of the window;
                                                     step c = i+To-1 is the current one)
    actions       steps i+k, i+k+1, ..., i+k+Tp-1   (the Tp-step window, shifted k steps later)

so for k = 0 the action at window position To-1 is the one taken at the current observation
(Diffusion Policy), and for k > 0 action position To-1 is the action taken k steps after the
current observation: the policy learns to predict the actions that will be executed once its
inference latency of k control steps has passed. Steps outside `[0, L)` of an episode of length L
are edge-padded (repeat the episode's first / last step) and flagged in `obs_is_pad (To,)` and
`action_is_pad (Tp,)`.

Start offsets run over `i in [-pad_before, L - max(To, k + Tp) + pad_after]`, so an episode yields
`max(0, L - max(To, k + Tp) + pad_before + pad_after + 1)` windows. Defaults: `pad_before = To-1`
(the first window's current observation is the episode's first step) and `pad_after = Ta-1`
(`Ta = action_horizon`, or `Tp - To + 1` when not given), as Diffusion Policy does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffpolicy.data.replay_buffer import ReplayBuffer, StepArray
from diffpolicy.errors import InvalidIndexError, InvalidTypeError, InvalidValueError, MissingKeyError


class SequenceSampler:
    """Windows `{"obs": {key: (To, ...)}, "action": (Tp, Da), "action_is_pad": (Tp,),
    "obs_is_pad": (To,)}` of a `ReplayBuffer`; `sample_batch` gives the same with a leading B.

    keys: observation keys (data keys of the buffer). Arrays the buffer holds in memory (open it
    with `cache_low_dim=True`) are gathered with one numpy fancy-index per key; lazy arrays
    (images) with one zarr read of the needed frames per key.
    episode_mask: (E,) bool, the episodes to draw windows from (see `split_episodes`).
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        keys: Sequence[str],
        obs_horizon: int,
        pred_horizon: int,
        action_key: str = "action",
        latency: int = 0,
        pad_before: int | None = None,
        pad_after: int | None = None,
        action_horizon: int | None = None,
        episode_mask: np.ndarray | None = None,
    ):
        if isinstance(keys, str):
            raise InvalidTypeError(f"keys must be a sequence of observation keys, got the string {keys!r}")
        _check_int("obs_horizon", obs_horizon, minimum=1)
        _check_int("pred_horizon", pred_horizon, minimum=1)
        _check_int("latency", latency, minimum=0)
        if action_horizon is None:
            action_horizon = max(1, pred_horizon - obs_horizon + 1)
        pad_before = obs_horizon - 1 if pad_before is None else pad_before
        pad_after = action_horizon - 1 if pad_after is None else pad_after
        _check_int("pad_before", pad_before, minimum=0, maximum=obs_horizon - 1)
        _check_int("pad_after", pad_after, minimum=0, maximum=pred_horizon - 1)
        present = buffer.keys()
        for key in [*keys, action_key]:
            if key not in present:
                raise MissingKeyError(f"{buffer.path}: no data key {key!r}; present: {present}")
        self.obs_keys = list(keys)
        self.action_key = action_key
        self.obs_horizon = obs_horizon
        self.pred_horizon = pred_horizon
        self.latency = latency
        self.pad_before = pad_before
        self.pad_after = pad_after
        self._arrays = {key: buffer[key] for key in {*self.obs_keys, action_key}}

        ends = np.asarray(buffer.episode_ends, dtype=np.int64)
        self._episode_start = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self._episode_length = ends - self._episode_start
        self.episode_mask = _check_mask(episode_mask, len(ends), buffer)
        self._episode, self._offset = window_index(
            self._episode_length, self.episode_mask, self.span, pad_before, pad_after
        )

    @property
    def span(self) -> int:
        """Steps from the first observation to the last action of a window: max(To, k + Tp)."""
        return max(self.obs_horizon, self.latency + self.pred_horizon)

    @property
    def window_episode(self) -> np.ndarray:
        """(N,) episode of each window."""
        return self._episode

    @property
    def window_offset(self) -> np.ndarray:
        """(N,) start offset i of each window relative to its episode's first step."""
        return self._offset

    def __len__(self) -> int:
        return len(self._episode)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise InvalidIndexError(f"window {index} out of range for {len(self)} windows")
        batch = self.sample_batch(np.array([index]))
        return {
            "obs": {key: value[0] for key, value in batch["obs"].items()},
            **{key: batch[key][0] for key in ("action", "action_is_pad", "obs_is_pad")},
        }

    def sample_batch(self, indices: np.ndarray | Sequence[int]) -> dict:
        """Windows at `indices (B,)` -> obs `{key: (B, To, ...)}`, action `(B, Tp, Da)`,
        action_is_pad `(B, Tp)` bool, obs_is_pad `(B, To)` bool."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise InvalidTypeError(f"indices must be a 1-D integer array, got {indices.dtype} "
                            f"shape {indices.shape}")
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise InvalidIndexError(f"window indices must lie in [-{len(self)}, {len(self)}), got "
                             f"min {indices.min()}, max {indices.max()}")
        episode, offset = self._episode[indices], self._offset[indices]
        obs_rows, obs_is_pad = self._rows(episode, offset, self.obs_horizon)
        action_rows, action_is_pad = self._rows(episode, offset + self.latency, self.pred_horizon)
        return {
            "obs": {key: _gather(self._arrays[key], obs_rows) for key in self.obs_keys},
            "action": _gather(self._arrays[self.action_key], action_rows),
            "action_is_pad": action_is_pad,
            "obs_is_pad": obs_is_pad,
        }

    def _rows(self, episode: np.ndarray, first: np.ndarray, horizon: int):
        """Buffer rows `(B, horizon)` of steps `first + [0, horizon)`, edge-clamped, and pads."""
        steps = first[:, None] + np.arange(horizon)
        length = self._episode_length[episode][:, None]
        is_pad = (steps < 0) | (steps >= length)
        rows = self._episode_start[episode][:, None] + np.clip(steps, 0, length - 1)
        return rows, is_pad


def window_index(
    episode_length: np.ndarray, episode_mask: np.ndarray, span: int, pad_before: int,
    pad_after: int,
) -> tuple[np.ndarray, np.ndarray]:
    """All windows, vectorized: `(episode (N,), offset (N,))` with offsets in
    `[-pad_before, L - span + pad_after]` for each selected episode of length L."""
    selected = np.flatnonzero(episode_mask)
    counts = np.maximum(episode_length[selected] - span + pad_before + pad_after + 1, 0)
    episode = np.repeat(selected, counts)
    first_window = np.repeat(np.cumsum(counts) - counts, counts)
    offset = np.arange(len(episode), dtype=np.int64) - first_window - pad_before
    return episode, offset


def split_episodes(
    n_episodes: int, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random train / validation split by episode -> `(train_mask (E,), val_mask (E,))` bool.

    The validation set holds round(E * val_fraction) episodes, at least 1 and at most E - 1
    when val_fraction > 0 (Diffusion Policy's rule); none when val_fraction == 0.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if not isinstance(rng, np.random.Generator):
        raise InvalidTypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    val_mask = np.zeros(n_episodes, dtype=bool)
    if val_fraction > 0:
        if n_episodes < 2:
            raise InvalidValueError(f"a validation split needs at least 2 episodes, got {n_episodes}")
        n_val = min(max(1, round(n_episodes * val_fraction)), n_episodes - 1)
        val_mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    return ~val_mask, val_mask


def _gather(array: np.ndarray | StepArray, rows: np.ndarray) -> np.ndarray:
    return array.gather(rows) if isinstance(array, StepArray) else array[rows]


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f", at most {maximum}"
        raise InvalidValueError(f"{name} must be at least {minimum}{upper}; got {value}")


def _check_mask(mask: np.ndarray | None, n_episodes: int, buffer: ReplayBuffer) -> np.ndarray:
    if mask is None:
        return np.ones(n_episodes, dtype=bool)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (n_episodes,):
        raise InvalidValueError(f"episode_mask must be a bool array of shape ({n_episodes},) for "
                         f"{buffer.path}, got {mask.dtype} shape {mask.shape}")
    return mask

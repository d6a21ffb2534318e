"""Collect expert demonstrations of any task card into a `ReplayBuffer`, resumably.

For each seed the card's env is reset with `reset(seed=seed)` and its expert with `reset(seed)`,
then the expert acts until the episode terminates or the card's time limit truncates it. One
episode is appended whole (data keys, all `(T, ...)` with T = number of actions):

    <obs key>   the observation the action was chosen from (every key of the Dict observation)
    action      the expert's action, in the action space's dtype
    executed_action  with action noise only: the action the env executed (noise included, clipped)
    reward      (T,) float32, the reward returned for that action
    states      (T, S) float64, `env.unwrapped.get_state()` at that observation, where the env
                offers `get_state` (PushT: agent xy, block xy, angle; MuJoCo: its flat state)

with episode meta `seed` and `success` (`info["is_success"]` at any step), `final_obs.<key>` (the
observation after the last action, which no step holds, for each low-dim key; not added to a store
whose episodes were collected without it), plus `model_file` (MJCF XML) where the env offers
`model_xml()`. The store's attrs record the task (`task`, the whole
card as `task_card`), the collection settings (`collection`), and robomimic `env_args` for
robosuite tasks.

Action noise (DART, Laskey et al. 2017): with `action_noise` = sigma > 0 the env executes
`clip(a + sigma * (high - low) / 2 * n)` with n ~ N(0, I) drawn from a generator seeded by the
episode's seed, while the store records the expert's own action `a` (and the executed one under
`executed_action`, what a world model of the env learns from). The expert, acting closed-loop,
then corrects the perturbation, so the demonstrations show recoveries from states near its path
that a clean expert never visits, the states an imitating policy drifts into. `sigma` is one
fraction of the action half-range for every dimension or one per dimension (0 leaves a dimension,
e.g. a gripper, unperturbed). Replaying the stored actions then no longer reproduces the episode;
the stored `states` still do.

Resuming: seeds run upward from `seed_start`, skipping every seed already attempted, which is the
`seed` meta of the stored episodes plus `collection.discarded_seeds` (failures dropped by
`only_success`). Rerunning the same call after an interruption therefore continues where it
stopped without repeating a seed; an episode cut short by the interruption is simply run again.

Speed: `workers` processes play the episodes (`episodes.episode_results`), and the results are
taken in seed order and written in batches of `write_batch` episodes (`writer.EpisodeWriter`:
discarded seeds first, then one `add_episodes` call). The store, its seeds, its discarded seeds and
their order are the same for any `workers` and `write_batch`, and a resumed collection writes the
store an uninterrupted one would. On Ctrl-C or an error the episodes already played are written
before the call returns; a run killed outright loses at most the last unwritten batch.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from diffpolicy.collection.episodes import NOISE_STREAM, RESERVED_KEYS, EpisodeJob, episode_results, run_episode
from diffpolicy.collection.errors import CollectError
from diffpolicy.collection.writer import EpisodeWriter
from diffpolicy.data.replay_buffer import ReplayBuffer, stores_final_obs
from diffpolicy.envs.tasks import (
    TaskCard,
    TaskCardError,
    load_task,
    make_env,
    make_expert,
)
from diffpolicy.episode_meta import FINAL_OBS

__all__ = ["CollectError", "CollectSummary", "NOISE_STREAM", "collect", "recipe_settings", "run_episode"]
# Settings that must match to resume a store; a store made otherwise needs overwrite=True.
RESUME_SETTINGS = ("task", "seed_start", "only_success", "env_overrides", "action_noise")
# Settings added after stores were first made, with the value those stores were collected with.
SETTING_DEFAULTS = {"action_noise": 0.0}
WRITE_BATCH = 64  # episodes per store write by default


@dataclass(frozen=True)
class CollectSummary:
    """What a `collect` call left in the store: totals over the store, and this call's share."""

    path: Path
    episodes: int          # episodes stored in total
    attempted: int         # seeds attempted in total (stored + discarded)
    successes: int         # successful episodes stored in total
    new_episodes: int      # episodes stored by this call
    new_attempts: int      # seeds attempted by this call
    seconds: float         # wall time of this call

    @property
    def success_rate(self) -> float:
        """Successes over attempted seeds (NaN before any attempt)."""
        return self.successes / self.attempted if self.attempted else float("nan")


def collect(card: TaskCard | str, episodes: int, out: str | os.PathLike, seed_start: int = 0,
            only_success: bool = False, overwrite: bool = False, env_overrides: dict[str, Any] | None = None,
            max_attempts: int | None = None, action_noise: float | Sequence[float] = 0.0,
            progress: bool = True, workers: int = 1, write_batch: int = WRITE_BATCH) -> CollectSummary:
    """Run the card's expert until the store at `out` holds `episodes` episodes.

    Args:
        card: a TaskCard or a task name / card path for `load_task`.
        episodes: number of episodes the store should hold when done (>= 1).
        out: path of the zarr store; created if missing, resumed if it exists (unless `overwrite`).
        seed_start: first seed; seeds run upward from it.
        only_success: keep only episodes that succeed (failed seeds are recorded as discarded).
        overwrite: replace an existing store instead of resuming it.
        env_overrides: env kwargs over the card's (e.g. `{"obs_type": "image"}`), JSON values.
        max_attempts: most seeds this call may attempt (default 3 * episodes + 20); reaching it
            with the store still short raises CollectError (the store stays valid to resume).
        action_noise: DART noise std as a fraction of the action half-range, one float or one per
            action dimension, >= 0 (see the module docstring); 0 executes the expert's actions.
        progress: show a tqdm bar with the running success rate.
        workers: processes playing episodes (>= 1; 1 plays them here). The store is the same for
            any number; more use more cores, each spawned worker costs about a second to start.
        write_batch: episodes per store write (>= 1; 1 writes each one as it comes).
    """
    card = card if isinstance(card, TaskCard) else load_task(card)
    if not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise CollectError(f"collect: episodes must be a positive integer, got {episodes!r}")
    if not isinstance(seed_start, (int, np.integer)) or seed_start < 0:
        raise CollectError(f"collect: seed_start must be a non-negative integer, got {seed_start!r}")
    for name, value in (("workers", workers), ("write_batch", write_batch)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise CollectError(f"collect: {name} must be a positive integer, got {value!r}")
    env_overrides = dict(env_overrides or {})
    max_attempts = 3 * int(episodes) + 20 if max_attempts is None else int(max_attempts)
    noise_fractions = action_noise_fractions(action_noise, card)
    noise_scale = noise_std(noise_fractions, card)
    recorded_noise = noise_fractions.tolist()
    settings = {"task": card.name, "seed_start": int(seed_start), "only_success": bool(only_success),
                "env_overrides": env_overrides,
                "action_noise": recorded_noise[0] if len(recorded_noise) == 1 else recorded_noise}
    out = Path(out)
    started = time.perf_counter()

    env = make_env(card, **env_overrides)
    try:
        expert = make_expert(card, env)
        _check_observation(env.reset(seed=int(seed_start))[0], card)  # before anything is written
        buffer = _open_store(out, card, settings, overwrite, env)
        collection = dict(buffer.attrs["collection"])
        collection["discarded_seeds"] = [int(s) for s in collection["discarded_seeds"]]
        stored_seeds = _meta_ints(buffer, "seed")
        successes = int(_meta_ints(buffer, "success").sum())
        attempted = set(stored_seeds.tolist()) | set(collection["discarded_seeds"])
        stored_before, attempts = buffer.n_episodes, 0
        final_obs = stores_final_obs(buffer)  # a store collected before final observations were kept stays as it is
        short = max(0, int(episodes) - buffer.n_episodes)
        # Seeds this call may play: every stored one needs a seed, and no more than max_attempts.
        budget = 0 if not short else max_attempts if only_success else min(max_attempts, short)
        seeds = itertools.islice(_unattempted(int(seed_start), attempted), budget)
        job = EpisodeJob(card, env_overrides, noise_scale)
        results = episode_results(job, seeds, max(1, min(int(workers), budget, short)), env, expert)
        writer = EpisodeWriter(buffer, collection, int(write_batch), card.name)
        bar = tqdm(total=int(episodes), initial=min(buffer.n_episodes, int(episodes)), disable=not progress,
                   desc=f"collect {card.name}", unit="ep")
        try:
            for seed, (data, success, meta) in results:
                attempts += 1
                attempted.add(seed)
                if success or not only_success:
                    if not final_obs:
                        meta = {name: value for name, value in meta.items() if not name.startswith(FINAL_OBS)}
                    writer.add(seed, data, {"seed": seed, "success": success, **meta})
                    successes += int(success)
                    bar.update(1)
                else:
                    writer.discard(seed)
                bar.set_postfix(success=f"{successes / len(attempted):.2f}", seed=seed)
                if writer.episodes >= episodes:
                    break
        finally:
            try:
                writer.flush()  # also on Ctrl-C and errors: the episodes played so far are whole
            finally:
                results.close()
                bar.close()
        if buffer.n_episodes < episodes:
            raise CollectError(
                f"collect {card.name}: {attempts} seeds attempted in this run (max_attempts) but "
                f"{out} holds {buffer.n_episodes} of {episodes} episodes; the expert succeeds "
                f"too rarely for only_success={only_success}. Rerun to continue."
            )
        return CollectSummary(path=out, episodes=buffer.n_episodes, attempted=len(attempted),
                              successes=successes, new_episodes=buffer.n_episodes - stored_before,
                              new_attempts=attempts, seconds=time.perf_counter() - started)
    finally:
        env.close()


def _unattempted(seed_start: int, attempted: set[int]) -> Iterator[int]:
    """Seeds upward from `seed_start` that are not in `attempted` (as it is now)."""
    skip = frozenset(attempted)
    return (seed for seed in itertools.count(seed_start) if seed not in skip)


def action_noise_fractions(action_noise: float | Sequence[float], card: TaskCard) -> np.ndarray:
    """`action_noise` as a validated `(1,)` or `(Da,)` array of fractions of the action half-range."""
    fractions = np.atleast_1d(np.asarray(action_noise, dtype=np.float64))
    if fractions.ndim != 1 or fractions.shape[0] not in (1, card.action_dim) or not np.isfinite(fractions).all() \
            or (fractions < 0).any():
        raise CollectError(f"collect {card.name}: action_noise must be one finite number >= 0 or "
                           f"{card.action_dim} of them (one per action dimension), got {action_noise!r}")
    return fractions


def noise_std(fractions: np.ndarray, card: TaskCard) -> np.ndarray | None:
    """`(Da,)` noise std in action units for `fractions` of the half-range; None when all are 0."""
    if not fractions.any():
        return None
    low, high = (np.broadcast_to(np.asarray(card.action[k], dtype=np.float64), (card.action_dim,))
                 for k in ("low", "high"))
    return np.broadcast_to(fractions, (card.action_dim,)) * (high - low) / 2


def recipe_settings(card: TaskCard) -> dict[str, Any]:
    """The card's `dataset` recipe as `collect` keyword arguments (seed_start, only_success, action_noise)."""
    recipe = card.dataset
    return {"seed_start": int(recipe.get("seed_start", 0)), "only_success": bool(recipe.get("only_success", False)),
            "action_noise": recipe.get("action_noise", 0.0)}


def _check_observation(obs: dict[str, np.ndarray], card: TaskCard) -> None:
    """The env's observation must have the card's keys and shapes (and no reserved key)."""
    clash = sorted(set(obs) & set(RESERVED_KEYS))
    if clash:
        raise CollectError(f"{card.source}: observation keys {clash} clash with the data keys {list(RESERVED_KEYS)}")
    if set(obs) != set(card.observation):
        raise TaskCardError(
            f"{card.source}: observation keys {sorted(card.observation)} in the card, "
            f"but the env returns {sorted(obs)}"
        )
    for key, shape in card.obs_shapes.items():
        if tuple(np.shape(obs[key])) != shape:
            raise TaskCardError(
                f"{card.source}: observation.{key} has shape {list(shape)} in the card, "
                f"but the env returns {list(np.shape(obs[key]))}"
            )


def _open_store(out: Path, card: TaskCard, settings: dict[str, Any], overwrite: bool, env) -> ReplayBuffer:
    """Create the store (with its attrs) or open it for resuming after checking its settings."""
    if out.exists() and not overwrite:
        buffer = ReplayBuffer.open(out, mode="a")
        recorded = {**SETTING_DEFAULTS, **dict(buffer.attrs.get("collection") or {})}
        for name in RESUME_SETTINGS:
            if name not in recorded:
                raise CollectError(f"{out}: not a store made by `collect` (attrs.collection.{name} is missing); "
                                   "pass overwrite=True (--overwrite) to replace it")
            if recorded[name] != settings[name]:
                raise CollectError(
                    f"{out}: made with collection.{name} = {recorded[name]!r}, this run asks for "
                    f"{settings[name]!r}; rerun with the store's settings to resume, or overwrite it"
                )
        return buffer
    attrs = {
        "task": card.name,
        "task_card": card.to_dict(),
        "collection": {**settings, "expert": card.expert, "discarded_seeds": []},
    }
    env_args = robomimic_env_args(env)
    if env_args is not None:
        attrs["env_args"] = env_args
    out.parent.mkdir(parents=True, exist_ok=True)
    return ReplayBuffer.create(out, overwrite=overwrite, attrs=attrs)


def robomimic_env_args(env) -> dict[str, Any] | None:
    """robomimic `env_args` of a robosuite env (so exports can rebuild it), else None."""
    # A RobosuiteEnv exists only once its module is imported; other tasks never import it.
    robosuite_tasks = sys.modules.get("diffpolicy.envs.robosuite_tasks")
    if robosuite_tasks is None or not isinstance(env.unwrapped, robosuite_tasks.RobosuiteEnv):
        return None
    from diffpolicy.envs.robosuite_env_args import env_args_for

    return env_args_for(env)


def _meta_ints(buffer: ReplayBuffer, name: str) -> np.ndarray:
    """Per-episode meta `name` as int64 `(E,)` (empty before the first episode)."""
    if buffer.n_episodes == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(buffer.episode_meta(name)).astype(np.int64)


def expert_success_on(path: str | os.PathLike, episodes: int) -> tuple[int, int]:
    """(successes, seeds attempted) of the expert over the seeds that produced the store's first
    `episodes` episodes: those episodes' seeds plus the discarded seeds up to the last of them.

    This is what a run trained on the first `episodes` episodes learned from; a store holding more
    (a later, larger collection) does not change it.
    """
    buffer = ReplayBuffer.open(path)
    if not isinstance(episodes, (int, np.integer)) or not 1 <= episodes <= buffer.n_episodes:
        raise CollectError(f"{path}: episodes must be an integer in [1, {buffer.n_episodes}], got {episodes!r}")
    seeds = _meta_ints(buffer, "seed")[:episodes]
    successes = int(_meta_ints(buffer, "success")[:episodes].sum())
    discarded = np.asarray((buffer.attrs.get("collection") or {}).get("discarded_seeds", []), dtype=np.int64)
    return successes, len(seeds) + int((discarded < seeds.max()).sum())

"""Expert episodes for a run of seeds, in this process or in worker processes, yielded in seed order.

`run_episode(env, expert, seed, noise_scale)` plays one episode. `episode_results(job, seeds,
workers)` plays the episodes of an iterable of seeds and yields `(seed, (data, success, meta))`
in the order of `seeds`, whatever the number of workers, so what a caller does with them does not
depend on it. One episode depends on its seed alone (the env, the expert and the DART noise are
all seeded by it), so a worker's fresh env gives the episode the caller's env would.

With `workers` > 1 a `ProcessPoolExecutor` of that many processes runs the episodes, each with
its own env and expert built from the `EpisodeJob`; at most `2 * workers` seeds are in flight,
the one the caller waits for included, and seeds are drawn from `seeds` only as slots free up (so
a finite `seeds` bounds the work, and the caller's break stops it). Workers are started with
`spawn`: a fresh interpreter that imports this module and the card's env and expert, never the
caller's torch or its zarr IO thread (a fork of a threaded parent can inherit a held lock). A
worker whose expert imports torch (a learned expert) takes its share of the cores as threads,
`available_cpus() // workers`. Workers ignore SIGINT: Ctrl-C reaches the caller alone, which
closes the pool. An exception in an episode is raised as `CollectError` naming the seed (with the
worker's traceback); a worker that dies (killed, out of memory) breaks the pool and raises
`CollectError` naming the seeds in flight (one of them was its). Closing the generator, or an
error, cancels the seeds not started and waits for the running ones.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffpolicy.collection.errors import CollectError
from diffpolicy.envs.tasks import TaskCard, make_env, make_expert
from diffpolicy.episode_meta import final_obs_meta

RESERVED_KEYS = ("action", "executed_action", "reward", "states")
NOISE_STREAM = 7  # generator of the executed action noise: default_rng([seed, NOISE_STREAM])
START_METHOD = "spawn"
IN_FLIGHT_PER_WORKER = 2

Episode = tuple[dict[str, np.ndarray], bool, dict[str, Any]]


@dataclass(frozen=True)
class EpisodeJob:
    """What a worker needs to play episodes: the card, env kwargs over it, and the DART noise
    std `(Da,)` in action units (None: the expert's actions are executed as they are)."""

    card: TaskCard
    env_overrides: dict[str, Any] = field(default_factory=dict)
    noise_scale: np.ndarray | None = None


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS reports it, else the count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_episode(env, expert, seed: int, noise_scale: np.ndarray | None = None) -> Episode:
    """One expert episode from `seed`: (data arrays `(T, ...)`, success, extra episode meta: the
    observation after the last action as `final_obs.<key>` for low-dim keys, robosuite's `model_file`).

    With `noise_scale (Da,)` (action units) the env executes the expert's action plus Gaussian
    noise of that std, clipped to the action space; the data records the expert's action as
    `action` and the one executed as `executed_action` (what a world model's dynamics saw).
    """
    noise = None if noise_scale is None else np.random.default_rng([int(seed), NOISE_STREAM])
    obs, info = env.reset(seed=int(seed))
    expert.reset(int(seed))
    sim = env.unwrapped
    has_state = callable(getattr(sim, "get_state", None))
    meta = {"model_file": sim.model_xml()} if callable(getattr(sim, "model_xml", None)) else {}
    columns: dict[str, list] = {key: [] for key in (*obs.keys(), *RESERVED_KEYS)}
    if not has_state:
        del columns["states"]
    if noise is None:
        del columns["executed_action"]
    action_dtype = env.action_space.dtype
    success = bool(info.get("is_success", False))
    while True:
        for key, value in obs.items():
            columns[key].append(value)
        if has_state:
            columns["states"].append(np.asarray(sim.get_state(), dtype=np.float64))
        action = np.asarray(expert.act(obs), dtype=action_dtype)
        executed = action
        if noise is not None:
            perturbed = action + noise_scale * noise.standard_normal(action.shape)
            executed = np.clip(perturbed, env.action_space.low, env.action_space.high).astype(action_dtype)
            columns["executed_action"].append(executed)
        obs, reward, terminated, truncated, info = env.step(executed)
        columns["action"].append(action)
        columns["reward"].append(np.float32(reward))
        success = success or bool(info.get("is_success", False))
        if terminated or truncated:
            break
    return {key: np.stack(values) for key, values in columns.items()}, success, {**meta, **final_obs_meta(obs)}


def episode_results(job: EpisodeJob, seeds: Iterable[int], workers: int = 1, env=None, expert=None
                    ) -> Iterator[tuple[int, Episode]]:
    """`(seed, run_episode(...))` for each of `seeds`, in their order, played by `workers`
    processes (1: here, with `env` and `expert` when given, else ones built from `job`)."""
    if workers > 1:
        return _in_workers(job, iter(seeds), workers)
    if env is None:
        env = make_env(job.card, **job.env_overrides)
        expert = make_expert(job.card, env)
    return _here(job, seeds, env, expert)


def _here(job: EpisodeJob, seeds: Iterable[int], env, expert) -> Iterator[tuple[int, Episode]]:
    for seed in seeds:
        try:
            episode = run_episode(env, expert, seed, job.noise_scale)
        except Exception as err:
            raise CollectError(f"collect {job.card.name}: the episode of seed {seed} failed: "
                               f"{type(err).__name__}: {err}") from err
        yield seed, episode


@dataclass(frozen=True)
class _Failure:
    """An exception of a worker's episode, as text (the exception itself may not pickle)."""

    error: str
    traceback: str


def _in_workers(job: EpisodeJob, seeds: Iterator[int], workers: int) -> Iterator[tuple[int, Episode]]:
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(START_METHOD),
                               initializer=_start_worker, initargs=(job, max(1, available_cpus() // workers)))
    try:
        in_flight = deque((seed, _submit(pool, seed)) for seed in _take(seeds, IN_FLIGHT_PER_WORKER * workers))
        while in_flight:
            seed, future = in_flight.popleft()
            try:
                outcome = future.result()
            except BrokenProcessPool as err:  # the pool cannot tell whose worker died: name the candidates
                playing = [seed, *(following for following, _ in in_flight)]
                raise CollectError(f"collect {job.card.name}: a worker process died while seeds {playing} were "
                                   f"in flight ({err}); the episodes before seed {seed} are played, rerun to "
                                   "resume") from err
            if isinstance(outcome, _Failure):
                raise CollectError(f"collect {job.card.name}: the episode of seed {seed} failed in a worker "
                                   f"process: {outcome.error}\nworker traceback:\n{outcome.traceback}")
            for following in _take(seeds, 1):
                in_flight.append((following, _submit(pool, following)))
            yield seed, outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ProcessPoolExecutor, seed: int) -> Future:
    """`pool.submit(_play, seed)`; a pool already broken by a dead worker gives a future holding that
    error, so it surfaces where results are read, with the seeds in flight named."""
    try:
        return pool.submit(_play, seed)
    except BrokenProcessPool as err:
        failed: Future = Future()
        failed.set_exception(err)
        return failed


def _take(seeds: Iterator[int], count: int) -> list[int]:
    return [seed for _, seed in zip(range(count), seeds)]


_worker: dict[str, Any] = {}  # in a worker process: its job, and its env and expert once built


def _start_worker(job: EpisodeJob, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(job=job, threads=threads)


def _play(seed: int) -> Episode | _Failure:
    job = _worker["job"]
    try:
        if "env" not in _worker:
            _worker["env"] = make_env(job.card, **job.env_overrides)
            _worker["expert"] = make_expert(job.card, _worker["env"])
            if "torch" in sys.modules:  # a learned expert: share the cores among the workers
                sys.modules["torch"].set_num_threads(_worker["threads"])
        return run_episode(_worker["env"], _worker["expert"], seed, job.noise_scale)
    except Exception as err:
        return _Failure(f"{type(err).__name__}: {err}", traceback.format_exc())

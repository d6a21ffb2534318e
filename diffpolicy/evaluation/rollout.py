"""Closed-loop evaluation of a chunk policy in vectorized environments.

Every environment keeps its last To observations (the first one repeated after a reset). When
its queue of actions is empty the policy infers a chunk of Tp actions from that history and the
env executes Ta of them, starting at index To - 1 (the action aligned with the current
observation, as the training windows align them). Which slice executes and when the next chunk is
inferred is `control.execution`'s: with a `ControlSpec` the rollout runs a controller mode
(`control.modes`) under a simulated inference delay of d ticks (RTC's protocol; the default is
`sync` at d = 0, the loop above). The environments are a
`gymnasium.vector.SyncVectorEnv`; episodes are handed out from a fixed seed list: when an env
finishes, it is reset with the next seed, so `n_envs` only changes speed.

Reproducibility: the initial noise of every chunk comes from a `torch.Generator` of its episode
(seeded with the episode's seed), so with a deterministic sampler (DDIM eta = 0, Euler flow) each
episode depends only on its seed (up to the float rounding of batched inference when `n_envs`
changes); stochastic steps use one more generator seeded with the first seed. The same seed list
and `n_envs` give bit-identical results.
"""

from __future__ import annotations

import functools
import json
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from diffpolicy.control.chunking import ChunkLayout
from diffpolicy.control.errors import ControlError
from diffpolicy.control.execution import ControlSpec, EpisodeExecution, ExecutionStats, stack_previous
from diffpolicy.errors import InvalidValueError
from diffpolicy.evaluation.rollout_log import RolloutLogger, Tick
from diffpolicy.evaluation.stats import success_rate
from diffpolicy.fsutil import atomic_write_text


@dataclass
class EpisodeResult:
    """One evaluation episode.

    `coverage` is the maximum over the episode of `info[coverage_key]` (PushT's coverage; the
    Diffusion Policy protocol scores an episode by its best coverage), None if the env has none.
    `control`: the controller metrics (NFE, jerk, seam jump, underruns) when the rollout was given
    a `ControlSpec`.
    """

    index: int
    seed: int
    success: bool
    episode_return: float
    length: int
    coverage: float | None
    control: ExecutionStats | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.control is None:
            del data["control"]
        return data


def _stack_history(history: deque, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """`{key: (To, ...)}` from a deque of per-step observation dicts."""
    return {k: np.stack([o[k] for o in history]) for k in keys}


def _split_obs(batched: dict[str, np.ndarray], i: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: np.array(batched[k][i]) for k in keys}


def rollout(
    policy: Any,
    make_env: Callable[[], Any],
    seeds: Sequence[int],
    *,
    n_envs: int = 8,
    record: int = 0,
    device: torch.device | str = "cpu",
    inference_steps: int | None = None,
    coverage_key: str = "coverage",
    progress: Callable[[EpisodeResult], None] | None = None,
    logger: RolloutLogger | None = None,
    control_hz: float | None = None,
    control: ControlSpec | None = None,
) -> tuple[list[EpisodeResult], dict[int, list[np.ndarray]]]:
    """Run one episode per seed with `policy` (a `ChunkPolicy`).

    Args:
        make_env: builds one environment (with `render_mode="rgb_array"` when `record` > 0).
        seeds: one episode per seed, results in this order.
        n_envs: number of environments stepped together.
        record: render frames of the first `record` episodes (by position in `seeds`).
        inference_steps: denoising steps per chunk (None: the policy's default).
        progress: called with each finished episode.
        logger: receives every episode's ticks (`rollout_log.RolloutLogger`); the caller closes it.
        control_hz: the env's control rate, for the ticks' times (None: one second per tick).
        control: the controller mode, simulated delay and execution horizon (default: `sync`, d = 0).

    Returns:
        `(episodes, frames)`: per-episode results in seed order, and `{episode index: [frames
        uint8 (H, W, 3)]}` for the recorded episodes.
    """
    from gymnasium.vector import SyncVectorEnv

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InvalidValueError("rollout: the seed list is empty")
    config = policy.config
    keys = list(config.obs_shapes)
    to = config.obs_horizon
    report_control = control is not None
    control = ControlSpec() if control is None else control
    layout = ChunkLayout.of(policy)
    layout.check(control.delay, control.horizon)
    if control.profile is not None and control.profile.action_dim != config.action_dim:
        raise ControlError(f"robot profile {control.profile.name!r} has action_dim {control.profile.action_dim}, "
                           f"the policy {config.action_dim}")
    n_envs = max(1, min(n_envs, len(seeds)))
    device = torch.device(device)
    sample_gen = torch.Generator(device=device).manual_seed(seeds[0])
    noise_shape = (config.pred_horizon, config.action_dim)

    vec = SyncVectorEnv([make_env for _ in range(n_envs)])
    results: list[EpisodeResult | None] = [None] * len(seeds)
    frames: dict[int, list[np.ndarray]] = {}
    slot_episode: list[int | None] = [None] * n_envs
    history = [deque(maxlen=to) for _ in range(n_envs)]
    execution: list[EpisodeExecution | None] = [None] * n_envs
    noise_gen: list[torch.Generator | None] = [None] * n_envs
    stats: list[dict[str, Any]] = [{} for _ in range(n_envs)]
    fresh_chunk: list[np.ndarray | None] = [None] * n_envs
    tick_s = 1.0 / control_hz if control_hz else 1.0
    last_action = np.zeros((n_envs, *vec.single_action_space.shape), dtype=vec.single_action_space.dtype)
    next_episode = 0

    def start_episodes(slots: list[int], obs: dict[str, np.ndarray]) -> None:
        for i in slots:
            episode = slot_episode[i]
            first = _split_obs(obs, i, keys)
            history[i].clear()
            history[i].extend([first] * to)
            execution[i] = EpisodeExecution(layout, control)
            noise_gen[i] = torch.Generator(device=device).manual_seed(seeds[episode])
            stats[i] = {"return": 0.0, "length": 0, "success": False, "coverage": None}
            if logger is not None:
                logger.begin_episode(episode, seeds[episode])
            if episode < record:
                frames[episode] = [np.asarray(vec.envs[i].render(), dtype=np.uint8)]

    def assign(slots: list[int]) -> list[int]:
        nonlocal next_episode
        assigned = []
        for i in slots:
            if next_episode < len(seeds):
                slot_episode[i] = next_episode
                next_episode += 1
                assigned.append(i)
            else:
                slot_episode[i] = None
        return assigned

    try:
        assign(list(range(n_envs)))
        obs, _ = vec.reset(seed=[seeds[slot_episode[i]] for i in range(n_envs)])
        start_episodes(list(range(n_envs)), obs)
        policy.eval()
        while any(e is not None for e in slot_episode):
            need = [i for i in range(n_envs) if slot_episode[i] is not None and execution[i].needs_inference]
            for group in _by_previous(need, execution):
                chunks = infer_chunks(policy, layout, control, [execution[i] for i in group],
                                      [_stack_history(history[i], keys) for i in group],
                                      [noise_gen[i] for i in group], noise_shape, sample_gen, inference_steps, device)
                for row, i in enumerate(group):
                    fresh_chunk[i] = chunks[row]
            for i in range(n_envs):
                if slot_episode[i] is not None:
                    last_action[i] = execution[i].pop(last_action[i])
            obs, reward, terminated, truncated, info = vec.step(last_action)
            finished = []
            for i in range(n_envs):
                episode = slot_episode[i]
                if episode is None:
                    continue
                s = stats[i]
                s["return"] += float(reward[i])
                s["length"] += 1
                s["success"] |= bool(info["is_success"][i])
                metrics = {}
                if coverage_key in info:
                    metrics[coverage_key] = value = float(info[coverage_key][i])
                    s["coverage"] = value if s["coverage"] is None else max(s["coverage"], value)
                if episode in frames:
                    frames[episode].append(np.asarray(vec.envs[i].render(), dtype=np.uint8))
                if logger is not None:
                    logger.log_tick(episode, Tick(
                        step=s["length"] - 1, time_s=(s["length"] - 1) * tick_s, observation=history[i][-1],
                        action=last_action[i].copy(), reward=float(reward[i]), episode_return=s["return"],
                        success=s["success"], chunk=fresh_chunk[i],
                        executed_from=layout.start if fresh_chunk[i] is not None else None, metrics=metrics,
                        frame=frames[episode][-1] if episode in frames else None))
                fresh_chunk[i] = None
                history[i].append(_split_obs(obs, i, keys))
                if terminated[i] or truncated[i]:
                    run = execution[i].finish()
                    results[episode] = EpisodeResult(index=episode, seed=seeds[episode], success=s["success"],
                                                     episode_return=s["return"], length=s["length"],
                                                     coverage=s["coverage"], control=run if report_control else None)
                    if progress is not None:
                        progress(results[episode])
                    if logger is not None:
                        logger.end_episode(episode, results[episode].to_dict())
                    finished.append(i)
            restart = assign(finished)
            if restart:
                mask = np.zeros(n_envs, dtype=bool)
                mask[restart] = True
                obs, _ = vec.reset(seed=[seeds[slot_episode[i]] if mask[i] else None for i in range(n_envs)],
                                   options={"reset_mask": mask})
                start_episodes(restart, obs)
    finally:
        vec.close()
    return [r for r in results if r is not None], frames


def _by_previous(need: list[int], execution: list[EpisodeExecution]) -> list[list[int]]:
    """Envs needing a chunk, grouped so that one batch shares a kind of start: cold (no previous
    chunk, or a mode that does not use it: one batch, as Diffusion Policy's loop) or warm with one shift."""
    groups: dict[int | None, list[int]] = {}
    for i in need:
        previous = execution[i].previous_for_inference() if execution[i].spec.mode.uses_previous else None
        groups.setdefault(None if previous is None else previous.shift, []).append(i)
    return list(groups.values())


def infer_chunks(policy: Any, layout: ChunkLayout, control: ControlSpec, executions: list[EpisodeExecution],
                 histories: list[dict[str, np.ndarray]], noise_gens: list[torch.Generator],
                 noise_shape: tuple[int, int], sample_gen: torch.Generator, inference_steps: int | None,
                 device: torch.device) -> np.ndarray:
    """Infer one chunk per env of a group with the control mode and commit it to its execution.

    Each env's initial noise `(Tp, Da)` comes from its episode's generator; step noise from `sample_gen`.
    Returns the chunks as predicted `(B, Tp, Da)` in data units (for rollout logs).
    """
    keys = list(histories[0])
    obs = {k: torch.as_tensor(np.stack([h[k] for h in histories])).to(device) for k in keys}
    noise = torch.stack([torch.randn(noise_shape, generator=g, device=device) for g in noise_gens])
    previous = stack_previous(executions) if control.mode.uses_previous else None
    with torch.no_grad():
        generated = control.mode.generate(policy, layout, obs, noise, control.delay, previous, sample_gen,
                                          inference_steps)
    for row, execution in enumerate(executions):
        execution.commit(generated.row(row))
    return generated.actions.detach().to("cpu", torch.float64).numpy()


def summarize(episodes: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Success rate with its 95 % Wilson interval, mean return / coverage / length."""
    rate = success_rate([e.success for e in episodes])
    summary: dict[str, Any] = {
        "success_rate": rate.to_dict(),
        "episodes": len(episodes),
        "mean_return": float(np.mean([e.episode_return for e in episodes])),
        "mean_length": float(np.mean([e.length for e in episodes])),
    }
    coverages = [e.coverage for e in episodes if e.coverage is not None]
    if len(coverages) == len(episodes):
        summary["mean_coverage"] = float(np.mean(coverages))
    runs = [e.control for e in episodes if e.control is not None]
    if runs and len(runs) == len(episodes):
        summary["control"] = {
            "nfe_per_action": sum(r.nfe for r in runs) / max(sum(r.actions for r in runs), 1),
            "mean_jerk": float(np.mean([r.jerk for r in runs])),
            "mean_seam_jump": float(np.mean([r.seam_jump for r in runs])),
            "max_seam_jump": float(max(r.seam_jump for r in runs)),
            "underruns": int(sum(r.underruns for r in runs)),
            "limited_commands": int(sum(r.limited for r in runs)),
        }
    summary["seeds"] = f"{episodes[0].seed}..{episodes[-1].seed}" if episodes else ""
    return summary


@dataclass
class Evaluation:
    """`evaluate` output: the summary, per-episode results and the written videos."""

    summary: dict[str, Any]
    episodes: list[EpisodeResult]
    videos: list[Path]


def evaluate(policy: Any, card: Any, *, episodes: int, seed_start: int, n_envs: int = 8, videos: int = 0,
             out_dir: str | os.PathLike | None = None, device: torch.device | str = "cpu",
             inference_steps: int | None = None, progress: bool = False,
             logger: RolloutLogger | None = None, control: ControlSpec | None = None,
             settings: dict[str, Any] | None = None) -> Evaluation:
    """Evaluate `policy` on `card`'s environment over seeds `seed_start, ..., seed_start + episodes - 1`.

    With `out_dir`: writes `summary.json`, `episodes.json` (one object per episode) and
    `videos/episode_<i>_seed_<seed>.mp4` for the first `videos` episodes. `logger` receives every
    tick (see `rollout_log`); the caller closes it. `settings` (what produced the episodes: the
    sampler, the control loop) go into the summary as they are.
    """
    from diffpolicy.envs.tasks import make_env
    from diffpolicy.evaluation.video import write_video

    if episodes < 1:
        raise InvalidValueError(f"evaluate: episodes must be >= 1, got {episodes}")
    overrides = {"render_mode": "rgb_array"} if videos > 0 else {}
    seeds = list(range(int(seed_start), int(seed_start) + int(episodes)))
    bar = tqdm(total=len(seeds), desc=f"eval {card.name}", unit="ep", disable=not progress, leave=False)
    successes = 0

    def on_episode(result: EpisodeResult) -> None:
        nonlocal successes
        successes += result.success
        bar.update(1)
        bar.set_postfix(success=f"{successes}/{bar.n}")

    try:
        results, frames = rollout(policy, functools.partial(make_env, card, **overrides), seeds, n_envs=n_envs,
                                  record=videos, device=device, inference_steps=inference_steps,
                                  progress=on_episode, logger=logger, control_hz=float(card.control_hz),
                                  control=control)
    finally:
        bar.close()
    summary = summarize(results)
    if settings is not None:
        summary["settings"] = settings
    written: list[Path] = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for index in sorted(frames):
            written.append(write_video(out_dir / "videos" / f"episode_{index:03d}_seed_{seeds[index]}.mp4",
                                       frames[index], fps=float(card.control_hz)))
        summary["videos"] = [str(p.relative_to(out_dir)) for p in written]
        _write_json(out_dir / "episodes.json", [r.to_dict() for r in results])
        _write_json(out_dir / "summary.json", summary)
    return Evaluation(summary=summary, episodes=results, videos=written)


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1))


def score_policy(policy: Any, card: Any, eval_config: Any, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint scorer of imitation training (`train.trainer.Scorer`): `evaluate` on the
    settings of a `train.config.EvalConfig` (episodes, seed_start, n_envs, inference_steps), its summary."""
    return evaluate(policy, card, episodes=eval_config.episodes, seed_start=eval_config.seed_start,
                    n_envs=eval_config.n_envs, device=device, inference_steps=eval_config.inference_steps).summary

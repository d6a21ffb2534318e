"""Train a "medium" learned expert with stable-baselines3, as D4RL's medium datasets were made.

Training stops as soon as the expert's evaluation return reaches the card's `target_return` (about a
third to a half of expert level), or after `max_steps` env steps. The model goes to the card's expert
path (`experts/<task>/model.zip`) and its training record to `model.json` beside it. A trained
expert that met the same target with the same algorithm is reused unless `retrain=True`.

The card's `expert_training` section (all keys but `target_return` optional):

    expert_training:
      algorithm: sac            # sac | ppo
      target_return: 1500       # mean evaluation return that counts as "medium"
      max_steps: 300000         # env steps at most
      eval_every: 5000          # env steps between evaluations
      eval_episodes: 5          # episodes per evaluation (seeds eval_seed_start + i)
      eval_seed_start: 200000   # apart from demonstration (0..) and policy evaluation (100000..) seeds
      seed: 0                   # SB3's seed
      hyperparameters: {}       # keyword arguments of the SB3 algorithm (learning_starts, policy_kwargs, ...)

Evaluation acts as the card's expert acts (`expert.kwargs.deterministic`, stochastic by default),
through `LearnedExpert`, so the reached return is the return of the demonstrator itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffpolicy.envs.experts.learned import (
    ALGORITHMS,
    LearnedExpert,
    algorithm_class,
    meta_path_for,
    train_command,
)
from diffpolicy.envs.tasks import TaskCard, make_env
from diffpolicy.errors import InvalidValueError
from diffpolicy.fsutil import atomic_write_text


class ExpertTrainingError(InvalidValueError):
    """The card's training section is malformed, or an existing expert does not fit the request."""


@dataclasses.dataclass(frozen=True)
class ExpertTrainingSpec:
    """The card's `expert_training` section (see the module docstring)."""

    target_return: float
    algorithm: str = "sac"
    max_steps: int = 300_000
    eval_every: int = 5_000
    eval_episodes: int = 5
    eval_seed_start: int = 200_000
    seed: int = 0
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_card(cls, card: TaskCard) -> "ExpertTrainingSpec":
        where = f"{card.source}: expert_training"
        raw = card.extra.get("expert_training")
        if not isinstance(raw, dict):
            raise ExpertTrainingError(f"{where}: expected a mapping with at least 'target_return', got {raw!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExpertTrainingError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        if "target_return" not in raw:
            raise ExpertTrainingError(f"{where}: missing key 'target_return'")
        spec = cls(**raw)
        spec.validate(where)
        return spec

    def validate(self, where: str) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ExpertTrainingError(f"{where}: key 'algorithm' is {self.algorithm!r}, expected one of {list(ALGORITHMS)}")
        for name in ("max_steps", "eval_every", "eval_episodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ExpertTrainingError(f"{where}: key {name!r} must be a positive integer, got {value!r}")
        if not isinstance(self.target_return, (int, float)) or not math.isfinite(self.target_return):
            raise ExpertTrainingError(f"{where}: key 'target_return' must be a finite number, got {self.target_return!r}")
        if not isinstance(self.hyperparameters, dict):
            raise ExpertTrainingError(f"{where}: key 'hyperparameters' must be a mapping, got {self.hyperparameters!r}")


@dataclasses.dataclass(frozen=True)
class ExpertTrainingResult:
    """What `train_expert` produced or found: the model, its training record, and whether it was reused."""

    model_path: Path
    meta_path: Path
    meta: dict[str, Any]
    reused: bool

    def summary(self) -> dict[str, Any]:
        return {"model": str(self.model_path), "record": str(self.meta_path), "reused": self.reused, **self.meta}


def expert_model_path(card: TaskCard) -> Path:
    """The card's `expert.kwargs.path` (relative to the working directory) as an absolute path."""
    path = card.expert.get("kwargs", {}).get("path")
    if not path:
        raise ExpertTrainingError(f"{card.source}: expert.kwargs.path is required for a learned expert")
    return Path(path).resolve()


def evaluate_expert(env, expert, seeds: list[int]) -> list[float]:
    """Undiscounted return of one episode per seed (env and expert both reset with the seed)."""
    returns = []
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        expert.reset(int(seed))
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(expert.act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def _reusable(card: TaskCard, spec: ExpertTrainingSpec, model_path: Path) -> dict[str, Any] | None:
    """The record of an existing expert that fits the request, None if there is none; raises if one conflicts."""
    meta_path = meta_path_for(model_path)
    if not model_path.is_file():
        return None
    hint = f"rerun with: {train_command(card.name)} --retrain"
    if not meta_path.is_file():
        raise ExpertTrainingError(f"{model_path} exists without its training record {meta_path.name}; {hint}")
    meta = json.loads(meta_path.read_text())
    wanted = {"task": card.name, "algorithm": spec.algorithm, "target_return": float(spec.target_return)}
    differs = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: saved {saved!r}, asked {asked!r}" for k, (saved, asked) in differs.items())
        raise ExpertTrainingError(f"the expert at {model_path} was trained differently ({detail}); {hint}")
    if not meta.get("reached_target"):
        raise ExpertTrainingError(
            f"the expert at {model_path} stopped at {meta.get('env_steps')} steps with return "
            f"{meta.get('return_reached')} below its target {spec.target_return}; {hint} --steps N (more steps)"
        )
    return meta


def train_expert(
    card: TaskCard,
    *,
    steps: int | None = None,
    target_return: float | None = None,
    seed: int | None = None,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> ExpertTrainingResult:
    """Train (or reuse) the card's medium expert; `steps`/`target_return`/`seed` override the card."""
    spec = ExpertTrainingSpec.from_card(card)
    overrides = {"max_steps": steps, "target_return": target_return, "seed": seed}
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    spec.validate("train_expert arguments")
    model_path = expert_model_path(card)
    meta_path = meta_path_for(model_path)

    if not retrain:
        meta = _reusable(card, spec, model_path)
        if meta is not None:
            log(f"reusing {model_path}: return {meta['return_reached']:.1f} after {meta['env_steps']} steps")
            return ExpertTrainingResult(model_path, meta_path, meta, reused=True)

    from stable_baselines3.common.callbacks import BaseCallback

    deterministic = bool(card.expert.get("kwargs", {}).get("deterministic", False))
    eval_env = make_env(card)
    eval_seeds = [spec.eval_seed_start + i for i in range(spec.eval_episodes)]
    history: list[dict[str, float]] = []
    start = time.perf_counter()

    def evaluate(model, env_steps: int) -> float:
        """Mean return of the current policy on the evaluation seeds; logged and kept in `history`."""
        returns = evaluate_expert(eval_env, LearnedExpert.from_model(eval_env, model, deterministic), eval_seeds)
        model.policy.set_training_mode(True)
        elapsed = time.perf_counter() - start
        history.append({"env_steps": env_steps, "mean_return": float(np.mean(returns)),
                        "min_return": float(np.min(returns)), "wall_time_s": round(elapsed, 1)})
        log(f"[{card.name}] {env_steps:>8d} steps  {elapsed:7.0f} s  {env_steps / elapsed:6.1f} steps/s  "
            f"eval return {np.mean(returns):8.1f} (min {np.min(returns):.1f}, target {spec.target_return:g})")
        return float(np.mean(returns))

    class EvaluateAndStop(BaseCallback):
        """Every `eval_every` steps: evaluate the current policy, stop once the target is reached."""

        def _on_step(self) -> bool:
            if self.num_timesteps % spec.eval_every:
                return True
            return evaluate(self.model, self.num_timesteps) < spec.target_return

    train_env = make_env(card)
    policy = "MultiInputPolicy"
    model = algorithm_class(spec.algorithm)(policy, train_env, seed=spec.seed, device="cpu", verbose=0,
                                            **copy.deepcopy(spec.hyperparameters))  # SB3 edits policy_kwargs
    log(f"[{card.name}] training {spec.algorithm.upper()} to eval return {spec.target_return:g} "
        f"(at most {spec.max_steps} steps, evaluated every {spec.eval_every}) -> {model_path}")
    model.learn(total_timesteps=spec.max_steps, callback=EvaluateAndStop())
    if not history or history[-1]["env_steps"] != model.num_timesteps:
        evaluate(model, model.num_timesteps)
    wall_time = time.perf_counter() - start
    last = history[-1]
    meta = {
        "task": card.name,
        "env_id": card.env.get("kwargs", {}).get("env_id"),
        "algorithm": spec.algorithm,
        "policy": policy,
        "target_return": float(spec.target_return),
        "return_reached": last["mean_return"],
        "reached_target": bool(last["mean_return"] >= spec.target_return),
        "eval_deterministic": deterministic,
        "eval_seeds": eval_seeds,
        "env_steps": int(model.num_timesteps),
        "seed": spec.seed,
        "wall_time_s": round(wall_time, 1),
        "hyperparameters": spec.hyperparameters,
        "history": history,
    }
    _write_atomically(model, model_path, meta, meta_path)
    verdict = "reached" if meta["reached_target"] else "did NOT reach"
    log(f"[{card.name}] {verdict} target {spec.target_return:g}: return {meta['return_reached']:.1f} after "
        f"{meta['env_steps']} steps in {wall_time:.0f} s; saved {model_path}")
    train_env.close()
    eval_env.close()
    return ExpertTrainingResult(model_path, meta_path, meta, reused=False)


def _write_atomically(model, model_path: Path, meta: dict[str, Any], meta_path: Path) -> None:
    """Save the model and then its record under temporary names and rename both into place.

    The record is renamed last, so a model without a record marks an interrupted save.
    """
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_model = model_path.with_name(f".{model_path.stem}.tmp.zip")
    meta_path.unlink(missing_ok=True)
    model.save(tmp_model)
    os.replace(tmp_model, model_path)
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")

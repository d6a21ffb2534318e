"""An expert that acts with a policy trained by stable-baselines3 (SAC or PPO).

The model is `<dir>/model.zip` (SB3's format) with its training record `<dir>/model.json` beside it
(`diffpolicy.rl.expert_training` writes both; the record names the algorithm). Stochastic actions
are drawn with the expert's own numpy Generator, seeded by `reset(seed)`, so a demonstration is
reproducible from its seed:

    SAC (tanh-squashed Gaussian):  a = unscale(tanh(mean + std * eps))
    PPO (Gaussian):                a = clip(mean + std * eps, low, high)

with eps ~ N(0, I) (eps = 0 when `deterministic`), which are the distributions SB3 itself samples.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffpolicy.errors import InvalidValueError, MissingFileError

ALGORITHMS = ("sac", "ppo")


class ExpertNotTrainedError(MissingFileError):
    """The learned expert's model file does not exist yet."""


def meta_path_for(model_path: str | os.PathLike) -> Path:
    """The training record beside a model: `<dir>/model.zip` -> `<dir>/model.json`."""
    return Path(model_path).with_suffix(".json")


def algorithm_class(name: str, where: str = "algorithm") -> type:
    """The SB3 class for an algorithm name in `ALGORITHMS`."""
    import stable_baselines3

    if name not in ALGORITHMS:
        raise InvalidValueError(f"{where}: unknown algorithm {name!r}, expected one of {list(ALGORITHMS)}")
    return getattr(stable_baselines3, name.upper())


def train_command(task: str | None) -> str:
    """The command that trains the expert of `task`."""
    return f"diffpolicy train-expert --task {task or '<task>'}"


class LearnedExpert:
    """Acts with a saved SB3 policy; the `make_expert` interface is `reset(seed)` and `act(obs)`.

    Args:
        env: the environment it acts in (its observation and action spaces must match the model's).
        path: the SB3 `model.zip`; relative paths are taken from the working directory.
        deterministic: act with the policy's mean action instead of sampling.
        task: the task name, used to say how to train a missing model.
    """

    def __init__(self, env, path: str | os.PathLike, deterministic: bool = False, task: str | None = None):
        model_path = Path(path).resolve()
        if not model_path.is_file():
            raise ExpertNotTrainedError(
                f"no trained expert at {model_path}; train it (from {Path.cwd()}) with: {train_command(task)}"
            )
        meta_path = meta_path_for(model_path)
        if not meta_path.is_file():
            raise ExpertNotTrainedError(
                f"expert model {model_path} has no training record {meta_path.name} beside it (an interrupted "
                f"training?); retrain it with: {train_command(task)} --retrain"
            )
        algorithm = json.loads(meta_path.read_text()).get("algorithm")
        model = algorithm_class(algorithm, f"{meta_path}: key 'algorithm'").load(model_path, device="cpu")
        self._setup(env, model, deterministic, source=str(model_path))

    @classmethod
    def from_model(cls, env, model, deterministic: bool = False) -> "LearnedExpert":
        """Wrap an SB3 model in memory (e.g. one being trained) as an expert."""
        expert = cls.__new__(cls)
        expert._setup(env, model, deterministic, source=f"in-memory {type(model).__name__}")
        return expert

    def _setup(self, env, model, deterministic: bool, source: str) -> None:
        for name in ("observation_space", "action_space"):
            ours, theirs = getattr(env, name), getattr(model, name)
            if ours != theirs:
                raise InvalidValueError(f"LearnedExpert: the model ({source}) has {name} {theirs}, the env has {ours}")
        self.model = model
        self.deterministic = bool(deterministic)
        self.action_space = env.action_space
        self._rng = np.random.default_rng()
        model.policy.set_training_mode(False)

    def reset(self, seed: int | None = None) -> None:
        """Start an episode: reseed the action-noise generator."""
        self._rng = np.random.default_rng(seed)

    def _mean_std(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The policy's Gaussian (before any squashing) at one observation: mean, std, each `(Da,)`."""
        policy = self.model.policy
        obs_tensor, _ = policy.obs_to_tensor(obs)
        with torch.no_grad():
            if hasattr(policy, "actor"):  # SAC
                mean, log_std, _ = policy.actor.get_action_dist_params(obs_tensor)
                std = log_std.exp()
            else:  # PPO
                dist = policy.get_distribution(obs_tensor).distribution
                mean, std = dist.mean, dist.stddev
        return mean[0].double().numpy(), std[0].double().numpy()

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """One action `(Da,)` float32 inside the action space for one observation `{"state": (obs_dim,)}`."""
        mean, std = self._mean_std(obs)
        pre = mean if self.deterministic else mean + std * self._rng.standard_normal(mean.shape)
        if self.model.policy.squash_output:
            action = self.model.policy.unscale_action(np.tanh(pre))
        else:
            action = np.clip(pre, self.action_space.low, self.action_space.high)
        return np.asarray(action, dtype=self.action_space.dtype)

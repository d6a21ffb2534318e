"""Dream fine-tuning (DiWA-style): DPPO or flow PPO on rollouts imagined by a learned world model.

The algorithms run unchanged (`rl.dppo.finetune`, `rl.flow_ppo.finetune`): the run's `Session`
is a `DreamSession`, whose training environments are `imagine.DreamVecEnv`s in the world model
(`n_envs` imagined environments, chunked actions, episodes cut where the ensemble disagrees).
What changes is what a step is and what is counted:

- the algorithm's budget `env_steps` counts *imagined* environment steps (`dream_steps` in the
  curves, their x axis); `env_steps` in the curves and in the saved policy's metadata counts
  *real* environment steps used for learning (0 in a pure dream);
- held-out evaluation runs in the real environment every `eval_every` iterations and never feeds
  a gradient (its episodes are not counted as learning steps, as in the model-free runs);
- mixed mode (`real_steps` > 0): every `refresh_every` iterations, while fewer than `real_steps`
  real steps were used, the current policy (its deployed sampler) plays `refresh_episodes` real
  episodes; their steps are counted, kept with the run, added to the imagination's start states
  and used for `refresh_updates` gradient steps of the world model (every second one on the real
  steps alone, the rest on all data). Those episodes train the world model only, never the policy.

Checkpoints hold the world model as refreshed and the real steps, so a run resumes exactly.

    result = finetune(policy, make_env, DPPOConfig(env_steps=200_000), DreamConfig(), model, data,
                      "runs/dream", max_episode_steps=300, success_reward=1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffpolicy.config import check_bool, check_float, check_int, from_dict, to_dict
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl import dppo, flow_ppo
from diffpolicy.rl.chunk_env import check_env_matches_policy
from diffpolicy.rl.distributed import SINGLE
from diffpolicy.rl.rewards import absorbing_success_env, sparse_success_env
from diffpolicy.rl.rollout import Rollout
from diffpolicy.rl.session import FinetuneResult, OnPolicyConfig, Session
from diffpolicy.train.checkpoints import state_dict_tensors
from diffpolicy.train.distributed import DistContext
from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.errors import WorldModelError
from diffpolicy.worldmodel.imagine import DreamVecEnv, TaskFailure, TaskReward
from diffpolicy.worldmodel.model import LatentWorldModel
from diffpolicy.worldmodel.play import record_episodes
from diffpolicy.worldmodel.training import TrainConfig, gradient_step, make_optimizer, success_starts

REFRESH_SEED_BASE = 1_000_000_000  # real refresh episodes use seeds from here: never the evaluation seeds


@dataclass(frozen=True)
class DreamConfig:
    """cut_scale: an imagined action k steps into an episode is not taken where the ensemble
    disagreement exceeds cut_scale x the model's held-out reference at horizon k; initial_only: imagined episodes start only from
    the data's episode starts (else from any stored state); real_steps: real-environment budget of
    mixed mode (0: pure dream); refresh_every: dream iterations between refreshes;
    refresh_episodes, refresh_envs: real episodes per refresh and how many run together;
    refresh_updates: world-model gradient steps per refresh; task_reward: reward and success of
    imagined steps by the task's own rule on the predicted observations (the environment class's
    `reward_from_observation`, e.g. PushT's coverage from the block keypoints) instead of the
    model's learned reward and success heads; rollout_steps: imagined steps after which an episode
    is truncated and bootstrapped from the critic (MBPO's rollout length: the model is trusted only
    that far from a real state; 0: only the task's time limit and the cut end it);
    uncertainty_penalty: reward taken off each imagined step per unit of the ensemble's disagreement
    on it (MOPO's pessimism, in the task's reward units; 0: none)."""

    cut_scale: float = 2.0
    initial_only: bool = False
    real_steps: int = 0
    refresh_every: int = 10
    refresh_episodes: int = 8
    refresh_envs: int = 8
    refresh_updates: int = 200
    task_reward: bool = False
    rollout_steps: int = 0
    uncertainty_penalty: float = 0.0

    def __post_init__(self) -> None:
        check_float("dream.cut_scale", self.cut_scale, 0, strictly=True)
        check_bool("dream.initial_only", self.initial_only)
        check_int("dream.real_steps", self.real_steps, 0)
        for name in ("refresh_every", "refresh_episodes", "refresh_envs"):
            check_int(f"dream.{name}", getattr(self, name), 1)
        check_int("dream.refresh_updates", self.refresh_updates, 0)
        check_bool("dream.task_reward", self.task_reward)
        check_int("dream.rollout_steps", self.rollout_steps, 0)
        check_float("dream.uncertainty_penalty", self.uncertainty_penalty, 0)


def tried_rule(env: gym.Env, name: str) -> Callable | None:
    """The environment's observation rule `name` (None where it defines none), tried once on the
    environment's own first observation, so a rule that cannot run fails here, not mid-run."""
    rule = getattr(env.unwrapped, name, None)
    if rule is None:
        return None
    obs, _ = env.reset(seed=0)
    try:
        rule({key: np.asarray(value)[None] for key, value in obs.items()})
    except Exception as err:
        raise WorldModelError(f"the task's rule {type(env.unwrapped).__name__}.{name} fails on its first "
                              f"observation: {type(err).__name__}: {err}") from err
    return rule


def task_failure_rule(env: gym.Env) -> TaskFailure | None:
    """The environment's `failure_from_observation` (where it ends an episode without success), or
    None where it defines none (the task ends only at success or its time limit)."""
    return tried_rule(env, "failure_from_observation")


def task_reward_rule(env: gym.Env) -> TaskReward:
    """The environment's `reward_from_observation` (`dream.task_reward`), or a clear error."""
    rule = tried_rule(env, "reward_from_observation")
    if rule is None:
        raise WorldModelError(f"dream.task_reward: {type(env.unwrapped).__name__} defines no "
                              f"reward_from_observation(obs) -> (reward, success); leave dream.task_reward false "
                              f"to use the world model's learned reward and success")
    return rule


class DreamSession(Session):
    """A `Session` whose training environments are imagined (see the module docstring).

    Extra keyword arguments: model (the world model, refreshed in place in mixed mode), data (the
    transitions it was trained on: start states and refresh data), dream (`DreamConfig`),
    max_episode_steps (the task's time limit), success_reward (None, or the absorbing-success
    reward: `make_env` then builds the shaped environment the evaluation uses), sparse_success (pay
    success alone, in the imagination and in evaluation: `rl.rewards.SparseSuccess`), raw_env (the
    unshaped environment the refreshes record, whose rewards are the ones the model learns).
    """

    curve_x = "dream_steps"

    def __init__(self, run_dir: str | Path, algo: str, config: OnPolicyConfig, policy: ChunkPolicy,
                 make_env: Callable[[], gym.Env], resume: bool, ctx: DistContext = SINGLE, *,
                 model: LatentWorldModel, data: Transitions, dream: DreamConfig, max_episode_steps: int,
                 success_reward: float | None = None, sparse_success: bool = False,
                 raw_env: Callable[[], gym.Env]) -> None:
        if ctx.enabled:
            raise WorldModelError(f"a dream runs in one process (its world model and refreshes are not shared "
                                  f"between ranks); run it without torchrun, not with {ctx.world_size} processes")
        if "train" not in model.metadata:
            raise WorldModelError("the world model's metadata has no 'train' settings (refreshes train with them); "
                                  "train it with `diffpolicy worldmodel train`")
        self.model, self.data, self.dream = model, data, dream
        self.real = Transitions.empty(data.keys, data.dims, data.action.shape[1])
        self.max_episode_steps, self.success_reward, self.raw_env = int(max_episode_steps), success_reward, raw_env
        self.sparse_success = sparse_success
        self.train_config = from_dict(TrainConfig, model.metadata["train"], "train")
        self.dream_steps = 0
        probe = make_env()
        try:
            check_env_matches_policy(probe, policy.config, "dream evaluation")
            self.task_reward = task_reward_rule(probe) if dream.task_reward else None
            self.task_failure = task_failure_rule(probe)
        finally:
            probe.close()
        super().__init__(run_dir, f"dream_{algo}", config, policy, make_env, resume)

    def make_envs(self, make_env: Callable[[], gym.Env], policy: ChunkPolicy) -> DreamVecEnv:
        return DreamVecEnv(self.model, self.data, policy.config, self.config.n_envs, self.max_episode_steps,
                           self.model.cut_thresholds(self.dream.cut_scale), self.success_reward,
                           self.dream.initial_only, self.task_reward, self.sparse_success, self.task_failure,
                           self.dream.rollout_steps, self.dream.uncertainty_penalty)

    # ------------------------------------------------------------------ counting
    def count(self, rollout: Rollout) -> None:
        self.dream_steps += int(rollout.env_steps.sum())

    def budget_spent(self) -> bool:
        return self.dream_steps >= self.config.env_steps

    def log(self, row: dict[str, Any], progress: bool) -> None:
        super().log({**row, "dream_steps": self.dream_steps, **self.envs.pop_stats()}, progress)

    # ------------------------------------------------------------------ mixed mode
    def end_iteration(self, policy: ChunkPolicy, row: dict[str, Any], *args, **kwargs) -> None:
        refresh = self.dream.real_steps > 0 and self.env_steps < self.dream.real_steps and not self.budget_spent() \
            and (self.iteration + 1) % self.dream.refresh_every == 0
        if refresh:
            row["world_model_loss"] = self.refresh(policy, (self.iteration + 1) // self.dream.refresh_every)
        super().end_iteration(policy, row, *args, **kwargs)

    def refresh(self, policy: ChunkPolicy, index: int) -> float:
        """Refresh `index`: real episodes with the deployed sampler, counted; world-model updates on
        them. Returns the mean world-model loss of the updates."""
        policy.eval()
        first = REFRESH_SEED_BASE + self.config.seed * 1_000_003 + index * self.dream.refresh_episodes
        episodes = record_episodes(policy.sample, policy.config, self.raw_env,
                                   range(first, first + self.dream.refresh_episodes), self.dream.refresh_envs)
        fresh = Transitions.from_episodes(episodes, self.data.keys)
        self.env_steps += fresh.n_steps
        self.real = Transitions.concat([self.real, fresh])
        everything = Transitions.concat([self.data, self.real])
        optimizer = make_optimizer(self.model, self.train_config)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        # with train.success_fraction, each set oversamples its own success windows (the model's
        # logit offset stays the one of its first training: an approximation once the data grow)
        sets = [(data, success_starts(data, self.train_config.horizon)[2]) for data in (everything, self.real)]
        losses = [sum(gradient_step(self.model, optimizer, sets[u % 2][0], self.train_config, generator,
                                    sets[u % 2][1]).values()) for u in range(self.dream.refresh_updates)]
        self.model.eval()
        self.envs.starts_from(everything)
        return float(np.mean(losses)) if losses else float("nan")

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        return ({"world_model": state_dict_tensors(self.model), "real": self.real.tensors()},
                {"dream": to_dict(self.dream), "dream_steps": self.dream_steps})

    def load_extra_state(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any], path: Path) -> None:
        if "dream" not in meta:
            raise WorldModelError(f"{path}: not a dream run's checkpoint (no dream settings saved)")
        saved, now = meta["dream"], to_dict(self.dream)
        changed = sorted(k for k in now if k != "real_steps" and saved.get(k) != now[k])
        if changed:
            raise WorldModelError(f"{path}: the dream was started with other settings ({changed}); resume with the "
                                  "same ones (only dream.real_steps, the real budget, may change)")
        self.model.load_state_dict(groups["world_model"], strict=True)
        self.model.eval()
        self.real = Transitions.from_tensors(groups["real"], self.data.keys, self.data.dims)
        self.dream_steps = int(meta["dream_steps"])
        if self.real.n_steps:
            self.envs.starts_from(Transitions.concat([self.data, self.real]))


def finetune(policy: ChunkPolicy, make_env: Callable[[], gym.Env], config: dppo.DPPOConfig | flow_ppo.FlowPPOConfig,
             dream: DreamConfig, model: LatentWorldModel, data: Transitions, run_dir: str | Path,
             max_episode_steps: int, success_reward: float | None = None, sparse_success: bool = False,
             resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune `policy` in `model`'s imagination: DPPO for a `DPPOConfig`, flow PPO for a
    `FlowPPOConfig` (config.env_steps: the imagined budget). `make_env` builds the real,
    unshaped environment (mixed-mode refreshes; wrapped in `rl.rewards.AbsorbingSuccess` with
    `success_reward`, or in `SparseSuccess` with `sparse_success`, for evaluation: the reward the
    imagination pays too)."""
    algorithms = {dppo.DPPOConfig: dppo, flow_ppo.FlowPPOConfig: flow_ppo}
    if type(config) not in algorithms:
        raise WorldModelError(f"dream fine-tuning runs DPPO or flow PPO; got a {type(config).__name__}")
    if sparse_success and success_reward is not None:
        raise WorldModelError("dream: sparse_success pays success alone; it takes no success_reward")
    shaped = make_env
    if success_reward is not None:
        shaped = functools.partial(absorbing_success_env, make_env, max_episode_steps, success_reward)
    if sparse_success:
        shaped = functools.partial(sparse_success_env, make_env)
    make_session = functools.partial(DreamSession, model=model, data=data, dream=dream, raw_env=make_env,
                                     max_episode_steps=max_episode_steps, success_reward=success_reward,
                                     sparse_success=sparse_success)
    return algorithms[type(config)].finetune(policy, shaped, config, run_dir, resume=resume, progress=progress,
                                             make_session=make_session)

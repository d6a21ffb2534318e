"""N imagined chunk environments in a learned world model, behind the interface the RL machinery
steps (`rl.vec_env.make_chunk_vec_env`'s): so DPPO and flow PPO collect rollouts in a dream with
`rl.rollout.collect_rollout`, unchanged.

One step executes a chunk as `rl.chunk_env.ChunkEnv` does: the Ta actions from index To - 1,
clipped to the action space, one latent transition each; the reward is the sum of the members'
mean rewards (or, with `task_reward`, of the task's own rule applied to each member's predicted
observation: the lowest of the members' rewards). An imagined episode ends
- *terminated* with success where the members' mean success probability exceeds 0.5, or where
  `task_reward` says so for every member (with
  `success_reward`, the real env's `AbsorbingSuccess` bonus is added: the same shaping; with
  `sparse_success`, that step pays 1 and no step pays anything else, as `SparseSuccess`);
- *terminated* without success where the task's failure rule (`task_failure`, e.g. a hopper that
  fell: `envs.locomotion.LocomotionEnv.failure_from_observation`) says so for any member's
  predicted observation; that step's reward is paid, as the real environment pays it;
- *truncated* at the task's time limit, counted from the start state's time in its episode, or
  after `rollout_steps` imagined steps (MBPO's short rollouts; 0: no such limit);
- every imagined step pays `uncertainty_penalty` x its ensemble disagreement less (MOPO's
  pessimism: a policy gains nothing by steering where the members part; 0: no penalty);
- *truncated* where the model is unsure: the k-th action of an imagined episode whose ensemble
  disagreement exceeds `cut_thresholds[k - 1]` (the last one beyond them) is not taken; the chunk
  stops before it and the episode is cut there (its value is bootstrapped from the last trusted
  state, `info["cut"]`).
Finished environments restart in the same step (`final_obs` / `final_info`, as gymnasium's
same-step autoreset). Episodes start from states of the data (`initial_only`: from episode
starts only) with their real observation history; every draw comes from a per-environment numpy
generator seeded by `reset(seed=...)`, and the model is deterministic, so imagined rollouts are
reproducible under a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from diffpolicy.policies.config import PolicyConfig
from diffpolicy.rl.rewards import success_bonus
from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.errors import WorldModelError
from diffpolicy.worldmodel.model import LatentWorldModel

TaskReward = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]
TaskFailure = Callable[[dict[str, np.ndarray]], np.ndarray]


def check_model_matches_policy(model: LatentWorldModel, config: PolicyConfig) -> None:
    """The policy must see only low-dim keys the model predicts, with the model's sizes and action size."""
    if config.image_keys:
        raise WorldModelError(f"a world model predicts low-dim observations; the policy has image keys "
                              f"{list(config.image_keys)}")
    dims = dict(zip(model.obs_keys, model.obs_dims))
    for key in config.low_dim_keys:
        if dims.get(key) != config.obs_shapes[key][0]:
            raise WorldModelError(f"observation {key!r}: the policy needs ({config.obs_shapes[key][0]},), the world "
                                  f"model predicts {(dims[key],) if key in dims else 'no such key'} (its keys: {dims})")
    if model.action_dim != config.action_dim:
        raise WorldModelError(f"the world model takes actions of size {model.action_dim}, the policy acts with "
                              f"{config.action_dim}")


class DreamVecEnv(gym.vector.VectorEnv):
    """See the module docstring. Observations `{key: (N, To, d)}`, actions `(N, Tp, Da)` in data units.

    Args:
        model: the world model (used without gradients, in eval mode).
        starts: transitions whose states imagined episodes start from (those before any success of their episode).
        config: the policy's config (horizons, observation keys).
        n_envs: imagined environments stepped together.
        max_episode_steps: the task's time limit.
        cut_thresholds: `(R,)` ensemble disagreement (normalized units) above which the k-th action
            of an imagined episode is not taken (`LatentWorldModel.cut_thresholds`).
        success_reward: None, or the absorbing-success reward per step left (`rl.rewards`).
        initial_only: start only from the first state of each episode.
        sparse_success: pay 1 on the step that succeeds, 0 on every other (`rl.rewards.SparseSuccess`;
            not with `success_reward`).
        task_reward: None (the model's learned reward and success heads), or the task's rule
            `{key: (N, d) observations} -> (reward (N,), success (N,) bool)` applied to each member's
            predicted next observations (e.g. `envs.pusht.PushTEnv.reward_from_observation`).
        task_failure: None (episodes end only at success, the time limit or a cut), or the task's rule
            `{key: (N, d) observations} -> (N,) bool` of where the real environment ends an episode
            without success, applied to each member's predicted next observations: any member's is enough.
        rollout_steps: imagined steps after which an episode is truncated (0: never; the chunk stops there).
        uncertainty_penalty: reward subtracted per unit of ensemble disagreement of each imagined step
            (`LatentWorldModel.disagreement`, normalized units; 0: none).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, model: LatentWorldModel, starts: Transitions, config: PolicyConfig, n_envs: int,
                 max_episode_steps: int, cut_thresholds: np.ndarray, success_reward: float | None = None,
                 initial_only: bool = False, task_reward: TaskReward | None = None,
                 sparse_success: bool = False, task_failure: TaskFailure | None = None,
                 rollout_steps: int = 0, uncertainty_penalty: float = 0.0) -> None:
        check_model_matches_policy(model, config)
        if not (np.isfinite(uncertainty_penalty) and uncertainty_penalty >= 0):
            raise WorldModelError(f"DreamVecEnv: uncertainty_penalty must be a finite number >= 0, got {uncertainty_penalty!r}")
        if sparse_success and success_reward is not None:
            raise WorldModelError("DreamVecEnv: sparse_success pays success alone; it takes no success_reward")
        cut_thresholds = np.asarray(cut_thresholds, dtype=np.float64).reshape(-1)
        if not len(cut_thresholds) or not (cut_thresholds > 0).all():
            raise WorldModelError(f"DreamVecEnv: cut_thresholds must be numbers > 0, got {cut_thresholds!r}")
        self.model, self.num_envs = model.eval(), int(n_envs)
        self.obs_horizon, self.action_horizon = config.obs_horizon, config.action_horizon
        self.history = max(config.obs_horizon, model.config.history)
        self.max_episode_steps, self.cut_thresholds = int(max_episode_steps), cut_thresholds
        self.success_reward, self.initial_only, self.task_reward = success_reward, initial_only, task_reward
        self.sparse_success, self.task_failure, self.rollout_steps = sparse_success, task_failure, int(rollout_steps)
        self.uncertainty_penalty = float(uncertainty_penalty)
        self.starts_from(starts)
        self.model_slices = model.obs_slices
        self.slices = {key: part for key, part in self.model_slices.items() if key in config.obs_shapes}
        self.single_observation_space = gym.spaces.Dict({
            key: gym.spaces.Box(-np.inf, np.inf, (config.obs_horizon, config.obs_shapes[key][0]), np.float32)
            for key in config.obs_shapes})
        low, high = model.action_low.numpy(), model.action_high.numpy()
        self.single_action_space = gym.spaces.Box(np.tile(low, (config.pred_horizon, 1)),
                                                  np.tile(high, (config.pred_horizon, 1)), dtype=np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        n, members = self.num_envs, model.config.members
        self.latent = torch.zeros(members, n, model.state_dim)
        self.obs_history = torch.zeros(n, self.history, sum(model.obs_dims))
        self.t = np.zeros(n, dtype=np.int64)  # time in the episode (the start state's own time included)
        self.imagined = np.zeros(n, dtype=np.int64)  # steps imagined since the start state
        self.rngs = [np.random.default_rng(i) for i in range(n)]
        self.chunks, self.cuts, self.steps_taken, self.disagreement_sum = 0, 0, 0, 0.0

    # ------------------------------------------------------------------ starts
    def starts_from(self, starts: Transitions) -> None:
        """Draw later episode starts from the states of `starts` (e.g. after new real data came in)."""
        if starts.keys != self.model.obs_keys or starts.dims != self.model.obs_dims:
            raise WorldModelError(f"start states have keys {starts.keys} {starts.dims}, the world model "
                                  f"{self.model.obs_keys} {self.model.obs_dims}")
        if starts.n_steps == 0:
            raise WorldModelError("DreamVecEnv: no start states (the world model's data is empty)")
        self.starts, self.time_index = starts, starts.time_index
        self.candidates = starts.episode_starts if self.initial_only else np.flatnonzero(starts.before_success)

    def _start(self, envs: np.ndarray) -> None:
        """Draw a start state for each of `envs` from its generator: history, latent, time."""
        index = np.array([self.candidates[self.rngs[i].integers(len(self.candidates))] for i in envs], dtype=np.int64)
        window = self.starts.windows(index, self.history, 1)["obs_history"]
        history, rows = torch.as_tensor(window), torch.as_tensor(envs)
        self.obs_history[rows] = history
        with torch.no_grad():
            self.latent[:, rows] = self.model.encode(history[:, -self.model.config.history:])
        self.t[envs] = self.time_index[index]
        self.imagined[envs] = 0

    def _observation(self, envs: np.ndarray | None = None) -> dict[str, np.ndarray]:
        history = self.obs_history if envs is None else self.obs_history[torch.as_tensor(envs)]
        recent = history[:, -self.obs_horizon:].numpy()
        return {key: np.ascontiguousarray(recent[..., part]) for key, part in self.slices.items()}

    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict | None = None):
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise WorldModelError(f"DreamVecEnv.reset: {len(seeds)} seeds for {self.num_envs} environments")
            self.rngs = [np.random.default_rng(s) for s in seeds]
        self._start(np.arange(self.num_envs))
        return self._observation(), {}

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, actions: np.ndarray):
        chunk = np.asarray(actions, dtype=np.float32)
        if chunk.shape != self.action_space.shape:
            raise WorldModelError(f"DreamVecEnv.step: expected chunks of shape {self.action_space.shape}, got {chunk.shape}")
        start = self.obs_horizon - 1
        executed = torch.as_tensor(np.clip(chunk[:, start:start + self.action_horizon], self.single_action_space.low[0],
                                           self.single_action_space.high[0]))
        n = self.num_envs
        reward, steps = torch.zeros(n, dtype=torch.float64), np.zeros(n, dtype=np.int64)
        success, failed, cut, limit = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        active = np.ones(n, bool)
        for j in range(self.action_horizon):
            pred = self.model.step(self.latent, executed[:, j])
            threshold = self.cut_thresholds[np.minimum(self.imagined, len(self.cut_thresholds) - 1)]
            disagreement = self.model.disagreement(pred.obs).numpy()
            unsure = active & (disagreement > threshold)
            cut |= unsure
            active &= ~unsure
            take = torch.as_tensor(active)
            self.steps_taken += int(active.sum())
            self.disagreement_sum += float(disagreement[active].sum())
            self.latent = torch.where(take[None, :, None], pred.latent, self.latent)
            next_obs = self.model.unnormalize_obs(pred.obs.mean(0))
            self.obs_history = torch.where(take[:, None, None], torch.cat([self.obs_history[:, 1:], next_obs[:, None]], 1),
                                           self.obs_history)
            self.t += active
            self.imagined += active
            steps += active
            predicted = self._member_observations(pred) if self.task_reward or self.task_failure else None
            step_reward, step_success = self._reward(pred, predicted)
            done_here = active & step_success
            failed_here = active & ~done_here & self._failure(pred, predicted)
            reward += torch.as_tensor(done_here, dtype=torch.float64) if self.sparse_success \
                else torch.where(take, step_reward, 0.0)
            if self.uncertainty_penalty:
                reward -= self.uncertainty_penalty * torch.as_tensor(np.where(active, disagreement, 0.0))
            success |= done_here
            failed |= failed_here
            if self.success_reward is not None:
                reward += torch.as_tensor(np.where(done_here, success_bonus(self.t, self.max_episode_steps,
                                                                            self.success_reward), 0.0))
            rollout_done = self.rollout_steps > 0 and self.imagined >= self.rollout_steps
            ends_here = (self.t >= self.max_episode_steps) | rollout_done
            limit |= active & ~done_here & ~failed_here & ends_here
            active &= ~(done_here | failed_here | limit)
        terminated, truncated = success | failed, cut | limit
        self.chunks += n
        self.cuts += int(cut.sum())
        info = {"env_steps": steps, "is_success": success, "cut": cut}
        done = terminated | truncated
        if done.any():
            envs = np.flatnonzero(done)
            final = self._observation(envs)
            info["final_obs"] = np.full(n, None, dtype=object)
            for row, i in enumerate(envs):
                info["final_obs"][i] = {key: value[row] for key, value in final.items()}
            info["final_info"] = {"env_steps": steps.copy(), "is_success": success.copy(), "cut": cut.copy()}
            self._start(envs)
        return self._observation(), reward.numpy(), terminated, truncated, info

    def _reward(self, pred, predicted: dict[str, np.ndarray] | None) -> tuple[torch.Tensor, np.ndarray]:
        """Reward `(N,)` float64 and success `(N,)` bool of one imagined step: the model's heads
        (members' means), or the task's rule applied to every member's predicted observation, taken
        pessimistically: the members' lowest reward, and success only where every member predicts it
        (a success the members disagree on is the kind a policy learns to exploit). `predicted`: every
        member's observation `{key: (E * N, d)}` (`_member_observations`) where a rule needs it."""
        if self.task_reward is None:
            return pred.reward.mean(0).double(), (torch.sigmoid(pred.success_logit).mean(0) > 0.5).numpy()
        members, n = pred.obs.shape[:2]
        reward, success = self.task_reward(predicted)
        reward = np.asarray(reward, dtype=np.float64).reshape(members, n).min(0)
        return torch.as_tensor(reward), np.asarray(success, dtype=bool).reshape(members, n).all(0)

    def _failure(self, pred, predicted: dict[str, np.ndarray] | None) -> np.ndarray:
        """`(N,)` bool: the task's failure rule holds for any member's predicted observation."""
        members, n = pred.obs.shape[:2]
        if self.task_failure is None:
            return np.zeros(n, dtype=bool)
        return np.asarray(self.task_failure(predicted), dtype=bool).reshape(members, n).any(0)

    def _member_observations(self, pred) -> dict[str, np.ndarray]:
        """Every member's predicted observation in data units, `{key: (E * N, d)}` (member-major)."""
        members, n = pred.obs.shape[:2]
        flat = self.model.unnormalize_obs(pred.obs.reshape(members * n, -1)).numpy()
        return {key: flat[:, part] for key, part in self.model_slices.items()}

    def pop_stats(self) -> dict[str, float]:
        """Since the last call: the share of imagined chunks cut by the uncertainty, and the mean
        ensemble disagreement of the imagined steps taken (how far the policy strays from the data)."""
        stats = {"cut_fraction": self.cuts / self.chunks if self.chunks else 0.0,
                 "disagreement": self.disagreement_sum / self.steps_taken if self.steps_taken else 0.0}
        self.chunks, self.cuts, self.steps_taken, self.disagreement_sum = 0, 0, 0, 0.0
        return stats

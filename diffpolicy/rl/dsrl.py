"""DSRL: reinforcement learning in the noise space of a frozen chunk policy (Wagenmaker et al., 2025).

`NoiseActionEnv` wraps the frozen policy and a task environment as a gymnasium environment whose
action w is the policy's initial noise, all Tp x Da entries, bounded by `action_magnitude`. Each
step runs the policy's deterministic sampler once from w (DDIM eta = 0, or Euler flow steps) and
executes the same Ta actions of the chunk that deployment executes, returning their summed
reward. stable-baselines3's SAC (or PPO) learns the noise actor; timesteps are counted in
environment steps (each wrapper step adds the Ta, or fewer at an episode end, it executed), and
SB3 keeps terminated and truncated apart in SAC's targets (a truncated transition is
bootstrapped: `handle_timeout_termination`). A killed run resumes bit-exactly (`SB3State` and the
segments of `finetune`). The result is a `DSRLPolicy` (noise actor + frozen base) that saves and
loads on its own:

    policy = DSRLPolicy.load("runs/dsrl/policy")
    chunk = policy.sample(obs)                       # (B, Tp, Da), data units
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffpolicy.fsutil import atomic_write_text
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl.chunk_env import ChunkEnv
from diffpolicy.rl.curves import Curves
from diffpolicy.rl.errors import FinetuneError, UnsupportedProcessError
from diffpolicy.rl.evaluate import evaluate
from diffpolicy.rl.sb3_state import SB3State
from diffpolicy.rl.session import FinetuneResult, reset_seed

ALGORITHMS = ("sac", "ppo")


@dataclass(frozen=True)
class DSRLConfig:
    """DSRL's settings.

    env_steps: budget in environment steps. algorithm: "sac" or "ppo" (stable-baselines3).
    action_magnitude: the noise action's bound m (Box(-m, m)). n_envs: SB3 environments.
    inference_steps: steps of the deterministic sampler (None: the policy's). hidden_dim, layers:
    the SB3 actor / critic MLPs. lr, batch_size, buffer_size, learning_starts (SB3 steps),
    gradient_steps (SAC updates per SB3 step). eval_every: environment steps between held-out
    evaluations (0: at the end only); eval_episodes, eval_seed_start: held-out seeds.
    """

    env_steps: int = 100_000
    algorithm: str = "sac"
    action_magnitude: float = 1.5
    n_envs: int = 1
    seed: int = 0
    inference_steps: int | None = None
    hidden_dim: int = 256
    layers: int = 2
    lr: float = 3e-4
    batch_size: int = 256
    buffer_size: int = 1_000_000
    learning_starts: int = 200
    gradient_steps: int = 1
    gamma: float = 0.99
    eval_every: int = 10_000
    eval_episodes: int = 20
    eval_seed_start: int = 100_000

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise FinetuneError(f"config key 'algorithm': expected one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if not self.action_magnitude > 0:
            raise FinetuneError(f"config key 'action_magnitude': expected a number > 0, got {self.action_magnitude!r}")
        for name in ("env_steps", "n_envs", "hidden_dim", "layers", "batch_size", "buffer_size", "gradient_steps",
                     "eval_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FinetuneError(f"config key {name!r}: expected an integer >= 1, got {value!r}")


def check_policy(policy: ChunkPolicy) -> None:
    """DSRL needs a deterministic sampler: diffusion (run with DDIM eta = 0) or noiseless flow."""
    process = policy.config.process
    if process.type == "flow" and process.step_std:
        raise UnsupportedProcessError(f"dsrl needs a deterministic sampler; this flow policy adds step noise "
                                      f"(process.step_std = {process.step_std})")
    if policy.config.image_keys:
        raise FinetuneError(f"dsrl's noise actor takes low-dim observations; this policy has image keys "
                            f"{list(policy.config.image_keys)}")


def deterministic(policy: ChunkPolicy, inference_steps: int | None) -> ChunkPolicy:
    """The policy set to sample deterministically (DDIM eta = 0) with `inference_steps` steps, frozen."""
    check_policy(policy)
    policy.set_sampling(inference_steps=inference_steps, eta=0.0 if policy.config.process.type == "diffusion" else None)
    return policy.eval().requires_grad_(False)


def flat_observation(policy: ChunkPolicy, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`{key: (B, To, d)}` -> the noise actor's input `(B, To * sum d)` (the policy's normalization)."""
    return torch.cat([policy.normalizer.normalize(k, obs[k]).flatten(1) for k in policy.config.low_dim_keys], 1)


class NoiseActionEnv(gym.Env):
    """A task environment driven through a frozen policy's initial noise (see the module docstring).

    Observation: the flattened normalized To history `(To * sum d,)`; action: w `(Tp * Da,)` in
    [-m, m]; info["env_steps"]: environment steps the chunk took.
    """

    metadata = {"render_modes": []}

    def __init__(self, env: gym.Env, policy: ChunkPolicy, action_magnitude: float) -> None:
        self.policy = policy
        self.chunk_env = ChunkEnv(env, policy.config)
        config = policy.config
        width = config.obs_horizon * sum(config.obs_shapes[k][0] for k in config.low_dim_keys)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (width,), np.float32)
        self.action_space = gym.spaces.Box(-action_magnitude, action_magnitude,
                                           (config.pred_horizon * config.action_dim,), np.float32)
        self._obs: dict[str, np.ndarray] = {}

    def _flat(self) -> np.ndarray:
        obs = {k: torch.as_tensor(np.asarray(v, np.float32))[None] for k, v in self._obs.items()}
        return flat_observation(self.policy, obs)[0].numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._obs, info = self.chunk_env.reset(seed=seed, options=options)
        return self._flat(), info

    def step(self, action: np.ndarray):
        noise = torch.as_tensor(np.clip(action, self.action_space.low, self.action_space.high), dtype=torch.float32)
        obs = {k: torch.as_tensor(np.asarray(v, np.float32))[None] for k, v in self._obs.items()}
        config = self.policy.config
        chunk = self.policy.sample(obs, x_init=noise.reshape(1, config.pred_horizon, config.action_dim))
        self._obs, reward, terminated, truncated, info = self.chunk_env.step(chunk[0].numpy())
        return self._flat(), float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        self.chunk_env.close()


class DSRLPolicy(nn.Module):
    """A noise actor + the frozen base policy: `sample(obs)` -> chunks `(B, Tp, Da)` in data units.

    Duck-types a `ChunkPolicy` for `evaluation.rollout` (it ignores the x_init it is handed: the
    actor chooses the noise). `save(dir)` writes `base/` (the base policy's `save_pretrained`),
    `actor.safetensors` and `dsrl.json`; `DSRLPolicy.load(dir)` reads them (nothing unpickled).
    """

    def __init__(self, base: ChunkPolicy, actor: nn.Sequential, layers: list[list[Any]], squash: str,
                 action_magnitude: float) -> None:
        super().__init__()
        self.base, self.actor, self.layers = base, actor, layers
        self.squash, self.action_magnitude = squash, float(action_magnitude)
        self.config = base.config

    def noise(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The actor's deterministic initial noise `(B, Tp, Da)` for observations `{key: (B, To, d)}`."""
        out = self.actor(flat_observation(self.base, obs))
        out = torch.tanh(out) * self.action_magnitude if self.squash == "tanh" else out.clamp(
            -self.action_magnitude, self.action_magnitude)
        return out.reshape(-1, self.config.pred_horizon, self.config.action_dim)

    @torch.no_grad()
    def sample(self, obs: Mapping[str, torch.Tensor], steps: int | None = None, x_init: torch.Tensor | None = None,
               generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        return self.base.sample(obs, steps=steps, x_init=self.noise(obs))

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.base.save_pretrained(directory / "base", metadata=self.base.metadata)
        save_file({k: v.contiguous() for k, v in self.actor.state_dict().items()}, str(directory / "actor.safetensors"))
        atomic_write_text(directory / "dsrl.json", json.dumps({"layers": self.layers, "squash": self.squash,
                                                               "action_magnitude": self.action_magnitude}, indent=1))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DSRLPolicy:
        directory = Path(directory)
        if not (directory / "dsrl.json").is_file():
            raise FinetuneError(f"{directory}: not a DSRL policy (no dsrl.json)")
        spec = json.loads((directory / "dsrl.json").read_text())
        actor = _build_actor(spec["layers"])
        actor.load_state_dict(load_file(str(directory / "actor.safetensors")), strict=True)
        return cls(ChunkPolicy.from_pretrained(directory / "base"), actor, spec["layers"], spec["squash"],
                   spec["action_magnitude"]).eval().requires_grad_(False)


def _build_actor(layers: list[list[Any]]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for layer in layers:
        if layer[0] == "linear":
            modules.append(nn.Linear(int(layer[1]), int(layer[2])))
        elif layer[0] in ("relu", "tanh"):
            modules.append(nn.ReLU() if layer[0] == "relu" else nn.Tanh())
        else:
            raise FinetuneError(f"dsrl.json: unknown actor layer {layer!r}")
    return nn.Sequential(*modules)


def _export_actor(model: Any) -> tuple[nn.Sequential, list[list[Any]], str]:
    """The SB3 model's deterministic actor as plain modules, their spec and the output squash."""
    from stable_baselines3 import SAC

    if isinstance(model, SAC):
        source, squash = [*model.actor.latent_pi, model.actor.mu], "tanh"
    else:
        source, squash = [*model.policy.mlp_extractor.policy_net, model.policy.action_net], "clip"
    layers = []
    for module in source:
        if isinstance(module, nn.Linear):
            layers.append(["linear", module.in_features, module.out_features])
        elif isinstance(module, (nn.ReLU, nn.Tanh)):
            layers.append(["relu" if isinstance(module, nn.ReLU) else "tanh"])
        else:
            raise FinetuneError(f"dsrl: cannot export actor layer {type(module).__name__}")
    actor = _build_actor(layers)
    actor.load_state_dict(nn.Sequential(*source).state_dict())
    return actor.cpu(), layers, squash


def finetune(policy: ChunkPolicy, make_env: Callable[[], gym.Env], config: DSRLConfig, run_dir: str | Path,
             resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Train a DSRL noise actor for the frozen `policy`; writes `run_dir/policy` (a `DSRLPolicy`),
    `run_dir/sb3/` (the learner's checkpoint, `SB3State`), curves and TensorBoard.

    The run is cut into segments of `eval_every` environment steps (one segment without it). A
    segment ends at a checkpoint at the first rollout boundary past its last step (SAC: the next
    step; PPO: the end of its rollout of n_steps x n_envs chunks, so PPO may run past an
    evaluation point and the budget by less than one rollout): evaluation, a curves row, the saved
    policy and learner; the next segment starts new episodes in every environment from seeds of
    the run seed and the segment index (`session.reset_seed`). A resumed run therefore repeats the
    uninterrupted one bit-exactly: it loads the learner with its replay buffer and RNG states and
    starts the same segment from the same seeds.
    (Resuming with a larger budget continues exactly from the last checkpoint; it equals a run
    started with that budget when the old budget ended on a segment boundary.)
    """
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    run_dir = Path(run_dir)
    base = deterministic(policy, config.inference_steps)
    probe = make_env()
    ChunkEnv(probe, base.config).close()  # checks the spaces before any step
    state = SB3State(run_dir / "sb3")
    if state.exists() and not resume:
        raise FinetuneError(f"{run_dir} already holds a DSRL run; pass --resume to continue it or choose another --out")
    if resume and not state.exists():
        raise FinetuneError(f"--resume: {run_dir} holds no DSRL run to continue")
    env = DummyVecEnv([lambda: NoiseActionEnv(make_env(), base, config.action_magnitude)
                       for _ in range(config.n_envs)])
    net = [config.hidden_dim] * config.layers
    algorithm = SAC if config.algorithm == "sac" else PPO
    if resume:
        saved = state.read()
        changed = sorted(k for k in saved["config"] if k != "env_steps" and saved["config"][k] != asdict(config)[k])
        if changed:
            raise FinetuneError(f"{state.state_path}: the run was started with other settings ({changed}); resume "
                                "with the same ones (only env_steps, the budget, may change)")
        model, saved = state.load(algorithm, env)
        counters = saved["counters"]
    else:
        if config.algorithm == "sac":
            model = SAC("MlpPolicy", env, learning_rate=config.lr, batch_size=config.batch_size,
                        buffer_size=config.buffer_size, learning_starts=config.learning_starts,
                        gradient_steps=config.gradient_steps, gamma=config.gamma, seed=config.seed,
                        policy_kwargs={"net_arch": net}, device="cpu", verbose=0)
        else:
            model = PPO("MlpPolicy", env, learning_rate=config.lr, batch_size=config.batch_size, gamma=config.gamma,
                        n_steps=max(config.batch_size // config.n_envs, 16), seed=config.seed,
                        policy_kwargs={"net_arch": net}, device="cpu", verbose=0)
        counters = {"env_steps": 0, "next_eval": config.eval_every or config.env_steps, "iteration": 0, "cpu_s": 0.0}
    curves = Curves(run_dir, counters["iteration"])
    seeds = list(range(config.eval_seed_start, config.eval_seed_start + config.eval_episodes))
    history: list[dict[str, float]] = []

    def trained_policy() -> DSRLPolicy:
        actor, layers, squash = _export_actor(model)
        return DSRLPolicy(base, actor, layers, squash, config.action_magnitude)

    def start_segment() -> None:
        """New episodes in every environment from the seeds of segment `iteration`."""
        env.seed(reset_seed(config.seed, counters["iteration"], config.n_envs))
        model._last_obs = env.reset()
        model._last_episode_starts = np.ones(config.n_envs, dtype=bool)

    class Segments(BaseCallback):
        """Counts environment steps from the wrapper's infos and ends segments (see `finetune`).

        SB3 stops learning only from `_on_step`, after an environment step whose transition it then
        drops; so a segment ends at the next rollout start (every transition stored and trained
        on), and past the budget the run stops at the step after it (which no run keeps).
        """

        def __init__(self) -> None:
            super().__init__()
            self.finished: list[tuple[float, float]] = []
            self.returns = np.zeros(config.n_envs)
            self.success = np.zeros(config.n_envs, dtype=bool)
            self.cpu_start = time.process_time()
            self.due = self.stop = False

        def _on_step(self) -> bool:
            if self.stop:
                return False
            for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"])):
                counters["env_steps"] += int(info["env_steps"])
                self.returns[i] += float(self.locals["rewards"][i])
                self.success[i] |= bool(info["is_success"])
                if done:
                    self.finished.append((self.returns[i], float(self.success[i])))
                    self.returns[i], self.success[i] = 0.0, False
            self.due = counters["env_steps"] >= min(counters["next_eval"], config.env_steps)
            return True

        def _on_rollout_start(self) -> None:
            if self.due:
                self.end_segment()
                self.stop = counters["env_steps"] >= config.env_steps
                if not self.stop:
                    start_segment()

        def end_segment(self) -> None:
            """Evaluate, log and checkpoint; the running episodes are dropped from the statistics."""
            self.due = False
            counters["iteration"] += 1
            counters["next_eval"] += config.eval_every or config.env_steps
            counters["cpu_s"] += time.process_time() - self.cpu_start
            self.cpu_start = time.process_time()
            trained = trained_policy()
            row: dict[str, Any] = {"iteration": counters["iteration"], "env_steps": counters["env_steps"],
                                   "cpu_s": round(counters["cpu_s"], 2),
                                   **evaluate(trained.sample, base.config, make_env, seeds),
                                   "train_episodes": len(self.finished)}
            if self.finished:
                row["train_return"] = float(np.mean([r for r, _ in self.finished]))
                row["train_success"] = float(np.mean([s for _, s in self.finished]))
            self.finished, self.returns[:], self.success[:] = [], 0.0, False
            curves.log(row)
            history.append(row)
            trained.save(run_dir / "policy")
            state.save(model, counters["iteration"], asdict(config), counters)
            if progress:
                print("[dsrl] " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in row.items()), flush=True)

    try:
        if counters["env_steps"] < config.env_steps:
            start_segment()
            segments = Segments()
            # SB3 counts wrapper steps (each at least one environment step): the budget ends first.
            model.learn(total_timesteps=config.env_steps - model.num_timesteps, callback=segments,
                        reset_num_timesteps=False)
            if segments.due:  # SB3's own step limit ended learn before the next rollout start
                segments.end_segment()
    finally:
        curves.close()
        env.close()
    return FinetuneResult(DSRLPolicy.load(run_dir / "policy"), run_dir / "policy", history)

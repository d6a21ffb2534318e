"""What every on-policy fine-tuning run shares: its settings, vector environments reset from
seeds at each iteration, episode statistics, held-out evaluation with the fine-tuned sampler,
learning curves, and checkpoints that resume bit-exactly on the CPU.

Why every iteration starts from `envs.reset(seed=...)`: an iteration then depends only on the
parameters, the iteration index and the saved generators, so a resumed run repeats exactly what
the uninterrupted run would have done (environment states cannot be saved in general). Episodes
longer than one iteration are cut there and bootstrapped as truncated.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl.curves import Curves
from diffpolicy.rl.errors import FinetuneError
from diffpolicy.rl.evaluate import evaluate
from diffpolicy.rl.rollout import EpisodeStats, Rollout
from diffpolicy.rl.vec_env import make_chunk_vec_env
from diffpolicy.train.checkpoints import (
    CheckpointManager,
    capture_rng_state,
    flatten_optimizer_state,
    restore_rng_state,
    state_dict_tensors,
    unflatten_optimizer_state,
)


@dataclass(frozen=True)
class OnPolicyConfig:
    """Settings shared by the on-policy algorithms (DPPO, flow PPO).

    env_steps: budget in environment steps (each chunk counts the Ta actions it executed).
    n_envs: environments stepped together; n_steps: chunks per environment per iteration.
    asynchronous: subprocess environments (`AsyncVectorEnv`). seed: the run's seed.
    gamma, gae_lambda: GAE over environment-level (chunk) steps. epochs, batch_size: PPO updates
    per iteration and minibatch size (in chunk samples). lr, critic_lr: Adam learning rates.
    max_grad_norm: gradient clipping. critic_warmup: iterations at the start in which only the critic
    learns (the actor's first update then uses a fitted value function, not a random one's
    advantages: a strong imitation start is not pushed around by noise). eval_every: iterations between held-out evaluations (0: only
    at the end); eval_episodes, eval_seed_start: held-out seeds. bc_coef: weight of the optional
    behaviour-cloning regulariser (0: off; `rl.bc`); bc_data: its demonstration store (None: the
    store the base policy was trained on).
    """

    env_steps: int = 100_000
    n_envs: int = 8
    n_steps: int = 16
    asynchronous: bool = False
    seed: int = 0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-5
    critic_lr: float = 1e-3
    max_grad_norm: float = 1.0
    critic_warmup: int = 0
    eval_every: int = 10
    eval_episodes: int = 20
    eval_seed_start: int = 100_000
    bc_coef: float = 0.0
    bc_data: str | None = None

    def __post_init__(self) -> None:
        positive = ("env_steps", "n_envs", "n_steps", "epochs", "batch_size", "eval_episodes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FinetuneError(f"config key {name!r}: expected an integer >= 1, got {value!r}")
        for name in ("critic_warmup", "eval_every", "seed", "eval_seed_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FinetuneError(f"config key {name!r}: expected an integer >= 0, got {value!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FinetuneError(f"config key {name!r}: expected a number in [0, 1], got {getattr(self, name)!r}")
        for name in ("lr", "critic_lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise FinetuneError(f"config key {name!r}: expected a number > 0, got {getattr(self, name)!r}")
        if not (isinstance(self.bc_coef, (int, float)) and not isinstance(self.bc_coef, bool)
                and math.isfinite(self.bc_coef) and self.bc_coef >= 0):
            raise FinetuneError(f"config key 'bc_coef': expected a finite number >= 0 (0: no BC regulariser), "
                                f"got {self.bc_coef!r}")
        if self.bc_data is not None and self.bc_coef == 0:
            raise FinetuneError(f"config key 'bc_data' is {self.bc_data!r} but 'bc_coef' is 0, so the BC regulariser "
                                "is off; set bc_coef > 0 or drop bc_data")


@dataclass
class FinetuneResult:
    """The fine-tuned policy, the run's latest checkpoint (its `policy/` loads with
    `ChunkPolicy.from_pretrained`) and one dict of diagnostics per iteration of this call."""

    policy: ChunkPolicy
    checkpoint: Path | None
    history: list[dict[str, float]]


def reset_seed(seed: int, iteration: int, n_envs: int) -> int:
    """The reset seed of environment 0 at the start of an iteration (environment i: this + i);
    iterations and runs with other seeds never share one."""
    return seed * 1_000_003 + iteration * n_envs


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


class Session:
    """The run directory, environments, statistics and checkpoints of one fine-tuning run.

    Args:
        run_dir: where `checkpoints/`, `curves.csv`, `curves.png` and `tensorboard/` go.
        algo: the algorithm's name (checked on resume).
        config: the algorithm's `OnPolicyConfig` subclass (saved; checked on resume).
        policy: the policy being fine-tuned (its `config` shapes the environments).
        make_env: builds one task environment (Dict observations, Box actions).
        resume: continue the latest checkpoint of run_dir (else run_dir must hold none).
    """

    def __init__(self, run_dir: str | Path, algo: str, config: OnPolicyConfig, policy: ChunkPolicy,
                 make_env: Callable[[], gym.Env], resume: bool) -> None:
        self.run_dir = Path(run_dir)
        self.algo, self.config, self.make_env = algo, config, make_env
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_top_k=1)
        latest = self.checkpoints.latest()
        if latest is not None and not resume:
            raise FinetuneError(f"{self.run_dir} already holds a fine-tuning run (latest checkpoint {latest}); "
                                "pass --resume to continue it or choose another --out")
        if resume and latest is None:
            raise FinetuneError(f"--resume: {self.run_dir} holds no fine-tuning checkpoint to continue")
        self.envs = self.make_envs(make_env, policy)
        self.stats = EpisodeStats(config.n_envs)
        self.chunk_env_steps = policy.config.action_horizon
        self.iteration, self.env_steps, self.cpu_s = 0, 0, 0.0
        self._cpu_start = time.process_time()
        self.curves: Curves | None = None

    # ------------------------------------------------------------------ environments
    def make_envs(self, make_env: Callable[[], gym.Env], policy: ChunkPolicy) -> gym.vector.VectorEnv:
        """The environments the policy is trained in: `n_envs` chunk environments of `make_env`
        (a subclass may train elsewhere, e.g. in a learned model's imagination)."""
        return make_chunk_vec_env(make_env, policy.config, self.config.n_envs, self.config.asynchronous)

    def reset(self) -> dict[str, np.ndarray]:
        """Reset every environment for iteration `self.iteration` (seeds from the run seed)."""
        base = reset_seed(self.config.seed, self.iteration, self.config.n_envs)
        obs, _ = self.envs.reset(seed=[base + i for i in range(self.config.n_envs)])
        self.stats.start()
        return obs

    def count(self, rollout: Rollout) -> None:
        """Count a training rollout against the budget (its environment steps)."""
        self.env_steps += int(rollout.env_steps.sum())

    def done(self) -> bool:
        return self.env_steps >= self.config.env_steps

    def evaluate(self, policy: ChunkPolicy) -> dict[str, float]:
        """Held-out success rate and mean return with the policy's own sampler (`policy.sample`)."""
        seeds = range(self.config.eval_seed_start, self.config.eval_seed_start + self.config.eval_episodes)
        policy.eval()
        return evaluate(policy.sample, policy.config, self.make_env, seeds, self.config.n_envs)

    # ------------------------------------------------------------------ curves
    curve_x = "env_steps"  # the x axis of curves.png and the TensorBoard step

    def log(self, row: dict[str, Any], progress: bool) -> None:
        """Log one iteration: training episodes finished in it, plus `row` (losses, evaluation)."""
        if self.curves is None:
            self.curves = Curves(self.run_dir, self.iteration - 1, x=self.curve_x)
        finished = self.stats.pop_finished()
        cpu = self.cpu_s + time.process_time() - self._cpu_start
        full = {"iteration": self.iteration, "env_steps": self.env_steps, "cpu_s": round(cpu, 2),
                "train_episodes": len(finished), **row}
        if finished:
            full["train_return"] = float(np.mean([e["return"] for e in finished]))
            full["train_success"] = float(np.mean([e["success"] for e in finished]))
        self.curves.log(full)
        if progress:
            shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in full.items()}
            print(f"[{self.algo}] " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def end_iteration(self, policy: ChunkPolicy, row: dict[str, Any], modules: dict[str, nn.Module],
                      optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
                      progress: bool) -> None:
        """Close one on-policy iteration: count it, evaluate when due (every `eval_every` iterations
        and at the end; `row` gains the evaluation), log `row` and checkpoint the run."""
        self.iteration += 1
        if self.done() or (self.config.eval_every and self.iteration % self.config.eval_every == 0):
            row.update(self.evaluate(policy))
        self.log(row, progress)
        self.save(policy, modules, optimizers, generators, row.get("eval_success"))

    # ------------------------------------------------------------------ checkpoints
    def save(self, policy: ChunkPolicy, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             generators: dict[str, torch.Generator], score: float | None = None) -> Path:
        """Checkpoint the run: `policy/` (the fine-tuned policy, `save_pretrained`) and the state."""
        groups = {f"module.{name}": state_dict_tensors(module) for name, module in modules.items()}
        meta: dict[str, Any] = {"algo": self.algo, "config": config_dict(self.config), "iteration": self.iteration,
                                "env_steps": self.env_steps,
                                "cpu_s": self.cpu_s + time.process_time() - self._cpu_start, "optimizers": {}}
        for name, optimizer in optimizers.items():
            tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
            groups[f"optimizer.{name}"] = tensors
            meta["optimizers"][name] = opt_meta
        rng_tensors, meta["rng"] = capture_rng_state(generators)
        groups["rng"] = rng_tensors
        extra_groups, meta["extra"] = self.extra_state()
        groups.update({f"extra.{name}": tensors for name, tensors in extra_groups.items()})
        metadata = {**policy.metadata, "finetune_algo": self.algo, "finetune_env_steps": self.env_steps}
        return self.checkpoints.save(self.iteration, export=lambda d: policy.save_pretrained(d, metadata=metadata),
                                     groups=groups, meta=meta, score=score)

    def restore(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                generators: dict[str, torch.Generator]) -> None:
        """Load the latest checkpoint into the given objects and the run's counters."""
        latest = self.checkpoints.latest()
        groups, meta = CheckpointManager.load_state(latest)
        if meta["algo"] != self.algo:
            raise FinetuneError(f"{latest}: a {meta['algo']} run, cannot resume it with --algo {self.algo}")
        now, defaults = config_dict(self.config), config_dict(type(self.config)())
        saved = {**defaults, **meta["config"]}  # a key added since the run started had its default
        changed = sorted(k for k in set(saved) | set(now) if k != "env_steps" and saved.get(k) != now.get(k))
        if changed:
            raise FinetuneError(f"{latest}: the run was started with other settings ({changed}); resume with the "
                                "same ones (bit-exact resume needs them; only env_steps, the budget, may change)")
        for name, module in modules.items():
            module.load_state_dict(groups[f"module.{name}"], strict=True)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(unflatten_optimizer_state(groups[f"optimizer.{name}"], meta["optimizers"][name]))
        restore_rng_state(groups["rng"], meta["rng"], generators)
        self.load_extra_state({name[len("extra."):]: tensors for name, tensors in groups.items()
                               if name.startswith("extra.")}, meta.get("extra", {}), latest)
        self.iteration, self.env_steps, self.cpu_s = meta["iteration"], meta["env_steps"], meta["cpu_s"]
        self._cpu_start = time.process_time()

    def extra_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Tensor groups and JSON meta a subclass keeps in every checkpoint besides the algorithm's
        modules (here none)."""
        return {}, {}

    def load_extra_state(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any], path: Path) -> None:
        """Restore what `extra_state` saved in checkpoint `path` (here nothing)."""

    def close(self) -> None:
        self.envs.close()
        if self.curves is not None:
            self.curves.close()

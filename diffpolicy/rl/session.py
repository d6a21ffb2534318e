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
from diffpolicy.rl.distributed import SINGLE, gather_rows, sum_over_ranks
from diffpolicy.rl.errors import FinetuneError
from diffpolicy.rl.evaluate import play_episodes, summarize
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
from diffpolicy.train.distributed import DistContext


@dataclass(frozen=True)
class OnPolicyConfig:
    """Settings shared by the on-policy algorithms (DPPO, flow PPO).

    env_steps: budget in environment steps (each chunk counts the Ta actions it executed).
    n_envs: environments stepped together; n_steps: chunks per environment per iteration.
    asynchronous: subprocess environments (`AsyncVectorEnv`). seed: the run's seed.
    gamma, gae_lambda: GAE over environment-level (chunk) steps. epochs, batch_size: PPO updates
    per iteration and minibatch size (in chunk samples). target_kl: an iteration's updates stop
    before the first minibatch whose approximate KL from the rollout's policy passes it (0: off;
    the curves' `updates` column counts the steps taken). lr, critic_lr: Adam learning rates.
    max_grad_norm: gradient clipping. critic_warmup: iterations at the start in which only the
    critic learns (the actor's first update then uses a fitted value function, not a random one's
    advantages: a strong imitation start is not pushed around by noise). eval_every: iterations
    between held-out evaluations (0: only at the end); eval_episodes, eval_seed_start: held-out seeds.
    patience: stop the run after this many evaluations in a row that did not beat the best one so far
    (scored by success, then return; 0: never stop early). The best-scored checkpoint is kept either
    way, and a run directory loads it (`diffpolicy eval --checkpoint RUN`). bc_coef: weight of the optional
    behaviour-cloning regulariser (0: off; `rl.bc`); bc_data: its demonstration store (None: the
    store the base policy was trained on). reward_scale: the learner's rewards are the environment's
    times this (the critic regresses scaled returns; locomotion's returns run into the thousands, so
    0.01-0.1 keeps its targets near 1; the logged returns stay the environment's).
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
    target_kl: float = 0.0
    lr: float = 1e-5
    critic_lr: float = 1e-3
    max_grad_norm: float = 1.0
    critic_warmup: int = 0
    eval_every: int = 10
    eval_episodes: int = 20
    eval_seed_start: int = 100_000
    patience: int = 0
    bc_coef: float = 0.0
    bc_data: str | None = None
    reward_scale: float = 1.0

    def __post_init__(self) -> None:
        positive = ("env_steps", "n_envs", "n_steps", "epochs", "batch_size", "eval_episodes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FinetuneError(f"config key {name!r}: expected an integer >= 1, got {value!r}")
        for name in ("critic_warmup", "eval_every", "seed", "eval_seed_start", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FinetuneError(f"config key {name!r}: expected an integer >= 0, got {value!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FinetuneError(f"config key {name!r}: expected a number in [0, 1], got {getattr(self, name)!r}")
        for name in ("lr", "critic_lr", "max_grad_norm", "reward_scale"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise FinetuneError(f"config key {name!r}: expected a finite number > 0, got {getattr(self, name)!r}")
        if not (isinstance(self.target_kl, (int, float)) and not isinstance(self.target_kl, bool)
                and math.isfinite(self.target_kl) and self.target_kl >= 0):
            raise FinetuneError(f"config key 'target_kl': expected a finite number >= 0 (0: no early stop), "
                                f"got {self.target_kl!r}")
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
    `ChunkPolicy.from_pretrained`), one dict of diagnostics per iteration of this call, and the
    run's best-scored checkpoint (held-out success, then return; the latest where none was scored)."""

    policy: ChunkPolicy
    checkpoint: Path | None
    history: list[dict[str, float]]
    best: Path | None = None


def reset_seed(seed: int, iteration: int, n_envs: int) -> int:
    """The reset seed of environment 0 at the start of an iteration (environment i: this + i);
    iterations and runs with other seeds never share one."""
    return seed * 1_000_003 + iteration * n_envs


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def rank_name(name: str, rank: int) -> str:
    """The checkpoint's name of rank `rank`'s generator `name` (rank 0 keeps the plain name)."""
    return name if rank == 0 else f"{name}@rank{rank}"


def gather_generators(generators: dict[str, torch.Generator], ctx: DistContext) -> dict[str, torch.Generator]:
    """Copies of the other ranks' generators, by `rank_name` (on rank 0; empty in one process)."""
    copies: dict[str, torch.Generator] = {}
    for name, generator in generators.items():
        states = gather_rows(generator.get_state()[None].long(), ctx)  # gloo gathers no uint8
        for rank in range(1, ctx.world_size):
            copies[rank_name(name, rank)] = torch.Generator()
            copies[rank_name(name, rank)].set_state(states[rank].to(torch.uint8))
    return copies


class Session:
    """The run directory, environments, statistics and checkpoints of one fine-tuning run.

    Args:
        run_dir: where `checkpoints/`, `curves.csv`, `curves.png` and `tensorboard/` go.
        algo: the algorithm's name (checked on resume).
        config: the algorithm's `OnPolicyConfig` subclass (saved; checked on resume).
        policy: the policy being fine-tuned (its `config` shapes the environments).
        make_env: builds one task environment (Dict observations, Box actions).
        resume: continue the latest checkpoint of run_dir (else run_dir must hold none).
        ctx: this process's place in a data-parallel job (`rl.distributed`): each rank steps its
            own `n_envs` environments; the ranks share each evaluation's seeds; rank 0 alone writes
            curves and checkpoints.
    """

    def __init__(self, run_dir: str | Path, algo: str, config: OnPolicyConfig, policy: ChunkPolicy,
                 make_env: Callable[[], gym.Env], resume: bool, ctx: DistContext = SINGLE) -> None:
        self.run_dir = Path(run_dir)
        self.algo, self.config, self.make_env, self.ctx = algo, config, make_env, ctx
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
        self.eval_env_steps = 0  # real steps of every held-out evaluation (never learned from)
        self.best_score: list[float] | None = None
        self.evals_since_best, self.stopped_early = 0, False

    # ------------------------------------------------------------------ environments
    def make_envs(self, make_env: Callable[[], gym.Env], policy: ChunkPolicy) -> gym.vector.VectorEnv:
        """The environments the policy is trained in: `n_envs` chunk environments of `make_env`
        (a subclass may train elsewhere, e.g. in a learned model's imagination)."""
        return make_chunk_vec_env(make_env, policy.config, self.config.n_envs, self.config.asynchronous)

    def reset(self) -> dict[str, np.ndarray]:
        """Reset every environment for iteration `self.iteration` (seeds from the run seed; rank r
        of a job takes the r-th block of `n_envs` seeds)."""
        n = self.config.n_envs
        base = reset_seed(self.config.seed, self.iteration, n * self.ctx.world_size) + n * self.ctx.rank
        obs, _ = self.envs.reset(seed=[base + i for i in range(n)])
        self.stats.start()
        return obs

    def count(self, rollout: Rollout) -> None:
        """Count a training rollout against the budget (its environment steps, every rank's)."""
        self.env_steps += int(sum_over_ranks(float(rollout.env_steps.sum()), self.ctx))

    def budget_spent(self) -> bool:
        return self.env_steps >= self.config.env_steps

    def done(self) -> bool:
        """The budget is spent or the run stopped early (`patience`)."""
        return self.budget_spent() or self.stopped_early

    def evaluate(self, policy: ChunkPolicy) -> dict[str, float]:
        """Held-out success rate, mean return and environment steps with the policy's own sampler
        (`policy.sample`), on every rank: the ranks share the batches of seeds (rank r plays batches
        r, r + W, ...) and gather the episodes, so W ranks evaluate W times faster than rank 0 alone and
        get one process's result exactly (`rl.evaluate.play_episodes`)."""
        seeds = list(range(self.config.eval_seed_start, self.config.eval_seed_start + self.config.eval_episodes))
        n_envs = min(self.config.n_envs, len(seeds))
        batches = [seeds[i:i + n_envs] for i in range(0, len(seeds), n_envs)]
        mine = [seed for batch in batches[self.ctx.rank::self.ctx.world_size] for seed in batch]
        policy.eval()
        episodes = play_episodes(policy.sample, policy.config, self.make_env, mine, n_envs)
        indexed = np.concatenate([np.asarray(mine, dtype=np.float64)[:, None], episodes], axis=1)
        gathered = gather_rows(torch.from_numpy(indexed), self.ctx).numpy()
        return summarize(gathered[np.argsort(gathered[:, 0], kind="stable"), 1:])

    def judge(self, score: list[float]) -> None:
        """Track the best evaluation score; after `patience` evaluations in a row that did not beat
        it, the run stops (`done`)."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.evals_since_best = score, 0
            return
        self.evals_since_best += 1
        if self.config.patience and self.evals_since_best >= self.config.patience:
            self.stopped_early = True
            print(f"[{self.algo}] stopped early at iteration {self.iteration}: {self.evals_since_best} evaluations "
                  f"without beating the best (success, return) {self.best_score}", flush=True)

    # ------------------------------------------------------------------ curves
    curve_x = "env_steps"  # the x axis of curves.png and the TensorBoard step

    def log(self, row: dict[str, Any], progress: bool) -> None:
        """Log one iteration (rank 0): training episodes finished in it on every rank, plus `row`
        (losses, evaluation); `cpu_s` is the CPU time of every rank."""
        finished = gather_rows(torch.tensor([[e["return"], e["success"]] for e in self.stats.pop_finished()],
                                            dtype=torch.float64).reshape(-1, 2), self.ctx)
        cpu = sum_over_ranks(self.cpu_time(), self.ctx)
        if not self.ctx.is_main:
            return
        if self.curves is None:
            self.curves = Curves(self.run_dir, self.iteration - 1, x=self.curve_x)
        full = {"iteration": self.iteration, "env_steps": self.env_steps, "cpu_s": round(cpu, 2),
                "train_episodes": len(finished), **row}
        if len(finished):
            full["train_return"] = float(np.mean(finished[:, 0].numpy()))
            full["train_success"] = float(np.mean(finished[:, 1].numpy()))
        self.curves.log(full)
        if progress:
            shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in full.items()}
            print(f"[{self.algo}] " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def end_iteration(self, policy: ChunkPolicy, row: dict[str, Any], modules: dict[str, nn.Module],
                      optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
                      progress: bool) -> None:
        """Close one on-policy iteration: count it, evaluate when due (every `eval_every` iterations
        and at the end; `row` gains the evaluation and the run's evaluation steps so far), judge the
        score for an early stop, log `row` and checkpoint the run (scored by success, then return)."""
        self.iteration += 1
        due = self.done() or (self.config.eval_every and self.iteration % self.config.eval_every == 0)
        score = None
        if due:
            row.update(self.evaluate(policy))
        if due and self.ctx.is_main:
            self.eval_env_steps += int(row["eval_steps"])
            row["eval_env_steps"] = self.eval_env_steps
            score = [row["eval_success"], row["eval_return"]]
            self.judge(score)
        self.stopped_early = bool(sum_over_ranks(float(self.stopped_early), self.ctx))  # every rank stops together
        self.log(row, progress)
        self.save(policy, modules, optimizers, generators, score)

    # ------------------------------------------------------------------ checkpoints
    def cpu_time(self) -> float:
        """This process's CPU seconds in the run (earlier sessions of a resumed run included)."""
        return self.cpu_s + time.process_time() - self._cpu_start

    def save(self, policy: ChunkPolicy, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             generators: dict[str, torch.Generator], score: float | None = None) -> Path | None:
        """Checkpoint the run (rank 0 writes it; every rank's generators are kept): `policy/` (the
        fine-tuned policy, `save_pretrained`) and the state. Returns the checkpoint (None on other ranks)."""
        generators = {**generators, **gather_generators(generators, self.ctx)}
        rank_cpu_s = gather_rows(torch.tensor([[self.cpu_time()]], dtype=torch.float64), self.ctx)[:, 0].tolist()
        if not self.ctx.is_main:
            return None
        groups = {f"module.{name}": state_dict_tensors(module) for name, module in modules.items()}
        meta: dict[str, Any] = {"algo": self.algo, "config": config_dict(self.config), "iteration": self.iteration,
                                "env_steps": self.env_steps, "world_size": self.ctx.world_size,
                                "cpu_s": rank_cpu_s[0], "optimizers": {}, "eval_env_steps": self.eval_env_steps,
                                "best_score": self.best_score, "evals_since_best": self.evals_since_best,
                                "stopped_early": self.stopped_early}
        if self.ctx.enabled:
            meta["rank_cpu_s"] = rank_cpu_s
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
        if meta.get("world_size", 1) != self.ctx.world_size:
            raise FinetuneError(f"{latest}: the run had {meta.get('world_size', 1)} process(es); resume it with as many "
                                f"(torchrun --nproc_per_node), not {self.ctx.world_size}")
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
        restore_rng_state(groups["rng"], meta["rng"], {rank_name(name, self.ctx.rank): generator
                                                        for name, generator in generators.items()})
        self.load_extra_state({name[len("extra."):]: tensors for name, tensors in groups.items()
                               if name.startswith("extra.")}, meta.get("extra", {}), latest)
        self.iteration, self.env_steps = meta["iteration"], meta["env_steps"]
        self.eval_env_steps, self.best_score = meta.get("eval_env_steps", 0), meta.get("best_score")
        self.evals_since_best, self.stopped_early = meta.get("evals_since_best", 0), meta.get("stopped_early", False)
        self.cpu_s = meta.get("rank_cpu_s", [meta["cpu_s"]])[self.ctx.rank]
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

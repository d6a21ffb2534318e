"""DPPO: PPO through the denoising chain of a diffusion chunk policy (Ren et al., 2024).

The two-level MDP: every environment step (one chunk) unrolls K denoising steps, each a Gaussian
transition N(mu_theta(x_k, t_k, s), sigma_k^2) with sigma_k at least `std_floor` (in sampling and
in the log-probability alike; DDIM with eta = `train_eta`, 1 = DDPM). Only the last K' steps are
fine-tuned, through a trainable copy of the backbone; the base stays frozen. The advantage of an
environment step (GAE over environment steps with a critic V(s)) is given to each of its fine-tuned
denoising steps, discounted by `denoising_gamma` per step away from the clean end, and PPO's clip
ramps from `clip_start` (noisiest fine-tuned step) to `clip_end` (the last). With `executed_only`
the log-probabilities count only the Ta executed actions of each chunk. Evaluation and the
saved policy sample with DDIM eta = `eval_eta` (0: deterministic) through the same fine-tuned copy.
With `bc_coef` > 0 the copy's imitation loss on demonstration windows joins the actor's loss
(`rl.bc`, off by default).

    result = finetune(ChunkPolicy.from_pretrained("runs/pusht/..."), make_env, DPPOConfig(), "runs/dppo")
    ChunkPolicy.from_pretrained("runs/dppo/checkpoints/step_.../policy")   # the fine-tuned policy
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import torch

from diffpolicy.core.samplers import StepNoise
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl.bc import BCRegularizer
from diffpolicy.rl.chain_ppo import Learner, chain_actor, executed_tokens, ppo_batch, ppo_updates
from diffpolicy.rl.critic import Critic
from diffpolicy.rl.distributed import SINGLE, normalize_advantages, rank_seed
from diffpolicy.rl.errors import FinetuneError, UnsupportedProcessError
from diffpolicy.rl.ppo import clipped_surrogate
from diffpolicy.rl.rollout import collect_rollout
from diffpolicy.rl.session import FinetuneResult, OnPolicyConfig, Session
from diffpolicy.train.distributed import DistContext


@dataclass(frozen=True)
class DPPOConfig(OnPolicyConfig):
    """DPPO's settings (see the module docstring) on top of `OnPolicyConfig`."""

    lr: float = 1e-4
    finetune_steps: int = 5
    std_floor: float = 0.1
    train_eta: float = 1.0
    eval_eta: float = 0.0
    denoising_gamma: float = 0.99
    clip_start: float = 0.001
    clip_end: float = 0.01
    executed_only: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or self.finetune_steps < 1:
            raise FinetuneError(f"config key 'finetune_steps': expected an integer >= 1, got {self.finetune_steps!r}")
        for name in ("train_eta", "eval_eta", "denoising_gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FinetuneError(f"config key {name!r}: expected a number in [0, 1], got {getattr(self, name)!r}")
        for name in ("std_floor", "clip_start", "clip_end"):
            if not getattr(self, name) > 0:
                raise FinetuneError(f"config key {name!r}: expected a number > 0, got {getattr(self, name)!r}")


def check_policy(policy: ChunkPolicy, config: DPPOConfig) -> None:
    """DPPO needs a diffusion policy with at least K' = finetune_steps inference steps."""
    if policy.config.process.type != "diffusion":
        raise UnsupportedProcessError(f"dppo fine-tunes diffusion policies; this checkpoint's process is "
                                      f"{policy.config.process.type!r} (use --algo flowppo or dsrl)")
    if config.finetune_steps > policy.config.inference_steps:
        raise FinetuneError(f"config key 'finetune_steps': at most the policy's inference_steps = "
                            f"{policy.config.inference_steps}, got {config.finetune_steps}")


def finetune(policy: ChunkPolicy, make_env: Callable[[], gym.Env], config: DPPOConfig, run_dir: str | Path,
             resume: bool = False, progress: bool = True,
             make_session: Callable[..., Session] = Session, ctx: DistContext = SINGLE) -> FinetuneResult:
    """Fine-tune `policy` (a base checkpoint, loaded with `from_pretrained`) with DPPO.

    `make_session(run_dir, algo, config, policy, make_env, resume, ctx)` builds the run's `Session`
    (where it trains, what it counts and saves); `worldmodel.dream` passes one that trains in a
    learned world model's imagination. `ctx`: this process's place in a `torchrun` job
    (`rl.distributed`; default: a single process).
    """
    torch.manual_seed(config.seed)
    check_policy(policy, config)
    policy.set_sampling(eta=config.eval_eta)
    actor_params = policy.start_finetuning(config.finetune_steps)
    critic = Critic(policy)
    actor_optimizer = torch.optim.Adam(actor_params, lr=config.lr)
    critic_params = list(critic.parameters())
    critic_optimizer = torch.optim.Adam(critic_params, lr=config.critic_lr)
    generator = torch.Generator().manual_seed(rank_seed(config.seed, ctx))
    bc = BCRegularizer.from_config(policy, config)  # None unless bc_coef > 0
    learner = Learner(critic, actor_params, critic_params, actor_optimizer, critic_optimizer, bc)
    session = make_session(run_dir, "dppo", config, policy, make_env, resume, ctx)
    modules = {"finetuned_backbone": policy.finetuned_backbone, "critic": critic}
    optimizers = {"actor": actor_optimizer, "critic": critic_optimizer}
    if resume:
        session.restore(modules, optimizers, {"sampling": generator})

    # Per fine-tuned step k = K-K' .. K-1: advantage discount gamma_denoise^(K-1-k), clip ramp.
    steps = policy.config.inference_steps
    tuned = torch.tensor(policy.finetuned_step_indices, dtype=torch.float32)
    discount = config.denoising_gamma ** (steps - 1 - tuned)
    clip = torch.linspace(config.clip_start, config.clip_end, config.finetune_steps)
    noise = StepNoise(std_floor=config.std_floor, eta=config.train_eta)
    actor = chain_actor(policy, noise, generator)
    tokens = executed_tokens(policy) if config.executed_only else None
    history: list[dict[str, float]] = []
    try:
        while not session.done():
            # 1. Roll out the stochastic chain in every environment (one batched call per step).
            policy.eval()
            obs = session.reset()
            rollout, _ = collect_rollout(session.envs, obs, actor, config.n_steps, session.stats,
                                         config.reward_scale)
            session.count(rollout)
            # 2. Advantages over environment steps, old log-probs of the fine-tuned steps.
            batch = ppo_batch(policy, critic, rollout, noise, config.gamma, config.gae_lambda, tokens)
            advantages = normalize_advantages(batch.advantages, ctx)
            # 3. PPO epochs over minibatches of (environment step x fine-tuned denoising steps), until
            #    the approximate KL passes target_kl.
            def surrogate(index: torch.Tensor):
                log_prob = policy.chain_log_prob(batch.cond[index], batch.chain.index(index), noise, tokens=tokens)
                old = batch.old_log_prob[index]
                policy_loss, stats = clipped_surrogate(log_prob, old, advantages[index, None] * discount, clip)
                return log_prob, old, policy_loss, policy_loss, stats

            critic_only = session.iteration < config.critic_warmup
            row = ppo_updates(batch, surrogate, learner, config, generator, critic_only, ctx)
            # 4. Log, evaluate with the saved sampler, checkpoint.
            history.append(row)
            session.end_iteration(policy, row, modules, optimizers, {"sampling": generator}, progress)
    finally:
        session.close()
        if bc is not None:
            bc.close()
    return FinetuneResult(policy, session.checkpoints.latest(), history, session.checkpoints.best())

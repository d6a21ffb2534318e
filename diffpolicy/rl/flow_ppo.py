"""Flow PPO (ReinFlow-style): PPO for flow-matching chunk policies with a learned step noise.

A noise network sigma_theta(x_t, t, cond), bounded in [`std_min`, `std_max`], turns each Euler
step x_s = x_t + (s - t) v(x_t, t, cond) + sigma_theta * eps into a Gaussian, so the chain of K
steps (ReinFlow's 1-4 by default) has an exact log-probability: the sum of its transitions. The
velocity network of the last K' = `finetune_steps` steps (default all) is a trainable copy of the
base's, trained with the noise network by PPO (GAE over environment steps, critic V(s), entropy
bonus `entropy_coef` * mean log sigma; the ratio from the chain's log-probability per dimension,
`log_prob_per_dim`), over the chunk's Ta executed actions only (`executed_only`, as DPPO: the
noise on the Tp - Ta positions never reaches the environment, so their terms in the ratio are noise
the clip spends itself on). Evaluation and the saved policy sample deterministic Euler steps
through the fine-tuned copy; the noise network is part of the training state only. With
`bc_coef` > 0 the copy's imitation loss on demonstration windows joins the actor's loss (`rl.bc`,
off by default).

    result = finetune(ChunkPolicy.from_pretrained("runs/pusht_flow/..."), make_env, FlowPPOConfig(), "runs/fppo")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import torch
from torch import nn

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
class FlowPPOConfig(OnPolicyConfig):
    """Flow PPO's settings (see the module docstring) on top of `OnPolicyConfig`.

    inference_steps: flow steps K of training and evaluation (default 4, in ReinFlow's range of 1-4;
    any number, e.g. DPPO's 10 with `train_eta`; None keeps the policy's).
    finetune_steps: K' (None: all K). clip: PPO clip. std_min, std_max: bounds of sigma_theta in
    normalized action units. noise_hidden_dim: width of the noise network. log_prob_per_dim: the
    PPO ratio from the chain's log-probability per Gaussian dimension (divided by K' x Tp x Da, as
    ReinFlow's normalize options). Summed, the log-ratio adds up the small changes of every
    dimension: on PushT's 4-step chains (128 dimensions) 98 % of the terms hit a clip of 0.01 in
    every iteration (docs/RESULTS.md). False keeps the sum (then size `clip` to the dimensions).
    executed_only: the chain's log-probability over the Ta executed positions of each chunk (True
    since session 25; the runs before it scored all Tp positions: `executed_only=false`).
    std_floor, train_eta: a fixed noise control instead of the noise network (both None: learned,
    in [std_min, std_max]), as DPPO's: each flow step's std is at least `std_floor`, and with
    `train_eta` the step is `FlowMatching`'s DDIM step with that eta (1: the posterior, whose noise
    the later steps draw back towards the policy's own distribution) instead of Euler plus noise.
    The ratio then moves only with the velocity copy (std_min, std_max, entropy_coef are unused).
    ratio_per_step: one PPO ratio per flow step, each with the chunk's advantage, as DPPO's
    per-denoising-step ratios (each clipped on its own), instead of one ratio for the whole chain.
    """

    lr: float = 1e-4
    inference_steps: int | None = 4
    finetune_steps: int | None = None
    clip: float = 0.01
    entropy_coef: float = 0.03
    std_min: float = 0.05
    std_max: float = 0.2
    noise_hidden_dim: int = 128
    log_prob_per_dim: bool = True
    executed_only: bool = True
    std_floor: float | None = None
    train_eta: float | None = None
    ratio_per_step: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inference_steps is not None and not (isinstance(self.inference_steps, int)
                                                     and not isinstance(self.inference_steps, bool)
                                                     and self.inference_steps >= 1):
            raise FinetuneError(f"config key 'inference_steps': expected an integer >= 1 or None, "
                                f"got {self.inference_steps!r}")
        if self.finetune_steps is not None and not (isinstance(self.finetune_steps, int) and self.finetune_steps >= 1):
            raise FinetuneError(f"config key 'finetune_steps': expected an integer >= 1 or None, got {self.finetune_steps!r}")
        if not 0 < self.std_min < self.std_max:
            raise FinetuneError(f"config keys 'std_min', 'std_max': expected 0 < std_min < std_max, got "
                                f"{self.std_min!r}, {self.std_max!r}")
        if self.std_floor is not None and not (isinstance(self.std_floor, (int, float)) and self.std_floor > 0):
            raise FinetuneError(f"config key 'std_floor': expected a number > 0 or None, got {self.std_floor!r}")
        if self.train_eta is not None and not (isinstance(self.train_eta, (int, float)) and 0 < self.train_eta <= 1):
            raise FinetuneError(f"config key 'train_eta': expected a number in (0, 1] or None, got {self.train_eta!r}")
        if not self.clip > 0 or self.entropy_coef < 0:
            raise FinetuneError(f"config keys 'clip' > 0 and 'entropy_coef' >= 0 expected, got {self.clip!r}, "
                                f"{self.entropy_coef!r}")


def ratio_log_prob(step_log_probs: torch.Tensor, dims_per_step: int, per_dim: bool,
                   per_step: bool = False) -> torch.Tensor:
    """The log-probabilities flow PPO's ratio compares: `(B, K')` transition log-probs -> `(B,)`,
    their sum, divided by the chain's K' x `dims_per_step` Gaussian dimensions when `per_dim`; or,
    `per_step`, each transition's own `(B, K')` (divided by `dims_per_step` when `per_dim`)."""
    if per_step:
        return step_log_probs / dims_per_step if per_dim else step_log_probs
    total = step_log_probs.sum(1)
    return total / (step_log_probs.shape[1] * dims_per_step) if per_dim else total


class NoiseNetwork(nn.Module):
    """sigma_theta(x_t (B, Tp, Da), t (B, Tp), s, cond (B, C)) -> std `(B, Tp, Da)` in [std_min, std_max]."""

    def __init__(self, policy: ChunkPolicy, config: FlowPPOConfig) -> None:
        super().__init__()
        horizon, dim = policy.config.pred_horizon, policy.config.action_dim
        width = horizon * dim + horizon + policy.obs_encoder.output_dim
        self.shape, self.std_min, self.std_max = (horizon, dim), config.std_min, config.std_max
        self.net = nn.Sequential(nn.Linear(width, config.noise_hidden_dim), nn.Mish(),
                                 nn.Linear(config.noise_hidden_dim, config.noise_hidden_dim), nn.Mish(),
                                 nn.Linear(config.noise_hidden_dim, horizon * dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        features = torch.cat([x_t.flatten(1), t, cond], dim=1)
        unit = torch.sigmoid(self.net(features)).reshape(-1, *self.shape)
        return self.std_min + (self.std_max - self.std_min) * unit


def check_policy(policy: ChunkPolicy) -> None:
    """Flow PPO needs a flow-matching policy without observation images (the critic is low-dim)."""
    if policy.config.process.type != "flow":
        raise UnsupportedProcessError(f"flowppo fine-tunes flow-matching policies; this checkpoint's process is "
                                      f"{policy.config.process.type!r} (use --algo dppo or dsrl)")


def finetune(policy: ChunkPolicy, make_env: Callable[[], gym.Env], config: FlowPPOConfig, run_dir: str | Path,
             resume: bool = False, progress: bool = True,
             make_session: Callable[..., Session] = Session, ctx: DistContext = SINGLE) -> FinetuneResult:
    """Fine-tune `policy` (a base flow checkpoint) with flow PPO (`make_session`: as in `dppo.finetune`)."""
    torch.manual_seed(config.seed)
    check_policy(policy)
    if config.inference_steps is not None:
        policy.set_sampling(inference_steps=config.inference_steps)
    tuned_steps = config.finetune_steps or policy.config.inference_steps
    if tuned_steps > policy.config.inference_steps:
        raise FinetuneError(f"config key 'finetune_steps': at most the {policy.config.inference_steps} flow steps, "
                            f"got {tuned_steps}")
    velocity_params = policy.start_finetuning(tuned_steps)
    learned = config.std_floor is None and config.train_eta is None
    noise_net = NoiseNetwork(policy, config) if learned else None
    critic = Critic(policy)
    actor_params = velocity_params + (list(noise_net.parameters()) if learned else [])
    actor_optimizer = torch.optim.Adam(actor_params, lr=config.lr)
    critic_params = list(critic.parameters())
    critic_optimizer = torch.optim.Adam(critic_params, lr=config.critic_lr)
    generator = torch.Generator().manual_seed(rank_seed(config.seed, ctx))
    bc = BCRegularizer.from_config(policy, config)  # None unless bc_coef > 0
    learner = Learner(critic, actor_params, critic_params, actor_optimizer, critic_optimizer, bc)
    session = make_session(run_dir, "flowppo", config, policy, make_env, resume, ctx)
    modules = {"finetuned_backbone": policy.finetuned_backbone, "critic": critic}
    if learned:
        modules["noise_network"] = noise_net
    optimizers = {"actor": actor_optimizer, "critic": critic_optimizer}
    if resume:
        session.restore(modules, optimizers, {"sampling": generator})

    noise = StepNoise(std_fn=noise_net) if learned else StepNoise(std_floor=config.std_floor or 0.0,
                                                                   eta=config.train_eta)
    actor = chain_actor(policy, noise, generator)
    tuned = torch.tensor(policy.finetuned_step_indices)
    tokens = executed_tokens(policy) if config.executed_only else None
    dims_per_step = (policy.config.action_horizon if config.executed_only else policy.config.pred_horizon) \
        * policy.config.action_dim
    history: list[dict[str, float]] = []
    try:
        while not session.done():
            # 1. Roll out the noisy flow chain in every environment (one batched call per step).
            policy.eval()
            obs = session.reset()
            rollout, _ = collect_rollout(session.envs, obs, actor, config.n_steps, session.stats,
                                         config.reward_scale)
            session.count(rollout)
            # 2. Advantages over environment steps; old log-probs of the chain (`ratio_log_prob`).
            batch = ppo_batch(policy, critic, rollout, noise, config.gamma, config.gae_lambda, tokens)
            advantages = normalize_advantages(batch.advantages, ctx)
            old_log_prob = ratio_log_prob(batch.old_log_prob, dims_per_step, config.log_prob_per_dim,
                                          config.ratio_per_step)
            advantages = advantages[:, None] if config.ratio_per_step else advantages
            # 3. PPO epochs: the chain's log-probability is one action's, entropy from log sigma.
            def surrogate(index: torch.Tensor):
                cond, chain = batch.cond[index], batch.chain.index(index)
                log_prob = ratio_log_prob(policy.chain_log_prob(cond, chain, noise, tokens=tokens), dims_per_step,
                                          config.log_prob_per_dim, config.ratio_per_step)
                policy_loss, stats = clipped_surrogate(log_prob, old_log_prob[index], advantages[index], config.clip)
                if not learned:  # a fixed noise control: no entropy to gain
                    return log_prob, old_log_prob[index], policy_loss, policy_loss, stats
                x_t, levels = chain.x[:, tuned], chain.levels[:, tuned]
                sigma = noise_net(x_t.flatten(0, 1), levels.flatten(0, 1), chain.levels[:, tuned + 1].flatten(0, 1),
                                  cond.repeat_interleave(len(tuned), 0))
                entropy = sigma.log().mean()
                return log_prob, old_log_prob[index], policy_loss, policy_loss - config.entropy_coef * entropy, stats

            critic_only = session.iteration < config.critic_warmup
            row = ppo_updates(batch, surrogate, learner, config, generator, critic_only, ctx)
            # 4. Log, evaluate the deterministic fine-tuned sampler, checkpoint.
            history.append(row)
            session.end_iteration(policy, row, modules, optimizers, {"sampling": generator}, progress)
    finally:
        session.close()
        if bc is not None:
            bc.close()
    return FinetuneResult(policy, session.checkpoints.latest(), history, session.checkpoints.best())

"""PPO on recorded denoising chains: the pieces DPPO and flow PPO share.

An environment step of a chunk policy is a chain of K Gaussian denoising transitions; the policy
acts with `ChunkPolicy.sample_chain` and is scored with `ChunkPolicy.chain_log_prob` under the
same `StepNoise`, so before the first update the PPO ratio is exactly 1. `ppo_updates` is an
iteration's PPO epochs; each algorithm passes its own surrogate loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffpolicy.core.samplers import Chain, StepNoise
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl.bc import BCRegularizer
from diffpolicy.rl.critic import Critic
from diffpolicy.rl.distributed import SINGLE
from diffpolicy.rl.gae import gae
from diffpolicy.rl.ppo import actor_critic_step, epoch_minibatches, kl_exceeded, ratio_error
from diffpolicy.rl.rollout import Actor, Rollout
from diffpolicy.rl.session import OnPolicyConfig
from diffpolicy.train.distributed import DistContext

CHAIN_FIELDS = ("x", "levels", "mean", "std", "log_prob")


def executed_tokens(policy: ChunkPolicy) -> slice:
    """The chunk positions the environment executes: the Ta actions from the newest observation's
    (To - 1), what `ChunkEnv.step` plays and what `executed_only` scores."""
    start = policy.config.obs_horizon - 1
    return slice(start, start + policy.config.action_horizon)


def chain_actor(policy: ChunkPolicy, noise: StepNoise, generator: torch.Generator) -> Actor:
    """The rollout actor: one batched `sample_chain` for all environments; records the chain."""

    def act(obs: dict[str, torch.Tensor]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        with torch.no_grad():
            result = policy.sample_chain(policy.encode_obs(obs), noise, generator)
        chunks = policy.unnormalize_action(result.x0).numpy()
        return chunks, {name: getattr(result.chain, name) for name in CHAIN_FIELDS}

    return act


@dataclass
class PPOBatch:
    """A rollout flattened to B = T N samples: obs `{key: (B, To, ...)}`, cond `(B, C)` (the frozen
    encoder's), chain (x `(B, K+1, Tp, Da)`, ...), old_log_prob `(B, K')` of the scored steps,
    advantages and returns `(B,)`, and noise_std: the mean std of the scored transitions (over
    the scored steps and chunk positions), the exploration the rollout actually had."""

    obs: dict[str, torch.Tensor]
    cond: torch.Tensor
    chain: Chain
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    noise_std: float

    def __len__(self) -> int:
        return self.cond.shape[0]


def ppo_batch(policy: ChunkPolicy, critic: Critic, rollout: Rollout, noise: StepNoise, gamma: float,
              gae_lambda: float, tokens: slice | None = None) -> PPOBatch:
    """GAE over environment steps with the critic, and the old log-probabilities of the fine-tuned
    steps (over `tokens` of the chunk) recomputed by `chain_log_prob`, the function the update calls."""
    steps, n_envs = rollout.rewards.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(steps * n_envs, *t.shape[2:])

    obs = {k: flat(v) for k, v in rollout.obs.items()}
    next_obs = {k: flat(v) for k, v in rollout.next_obs.items()}
    chain = Chain(*(flat(rollout.records[name]) for name in CHAIN_FIELDS))
    with torch.no_grad():
        values = critic(obs).reshape(steps, n_envs)
        next_values = critic(next_obs).reshape(steps, n_envs)
        advantages, returns = gae(rollout.rewards, values, next_values, rollout.terminated, rollout.truncated,
                                  gamma, gae_lambda)
        cond = policy.encode_obs(obs)
        old_log_prob = policy.chain_log_prob(cond, chain, noise, tokens=tokens)
    scored = policy.finetuned_step_indices or list(range(chain.steps))
    noise_std = float(chain.std[:, scored, tokens or slice(None)].mean())
    return PPOBatch(obs, cond, chain, old_log_prob, flat(advantages), flat(returns), noise_std)


@dataclass
class Learner:
    """What an iteration's updates train: the critic, the actor's and the critic's parameters and
    optimizers, and the optional BC regulariser (None: off; else `bc_coef` x its loss joins the actor's)."""

    critic: Critic
    actor_params: list[torch.nn.Parameter]
    critic_params: list[torch.nn.Parameter]
    actor_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer
    bc: BCRegularizer | None = None


Surrogate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]]
"""An algorithm's loss on the minibatch `index` `(b,)` of the iteration's `PPOBatch`: (log_prob,
old_log_prob) as the ratio compares them, the clipped policy loss, the actor's loss (the policy loss
plus the algorithm's own terms) and `ppo.clipped_surrogate`'s stats."""


def ppo_updates(batch: PPOBatch, surrogate: Surrogate, learner: Learner, config: OnPolicyConfig,
                generator: torch.Generator, critic_only: bool, ctx: DistContext = SINGLE) -> dict[str, float]:
    """One iteration's PPO epochs over minibatches of `batch` (drawn with `generator`): the actor's
    and critic's losses stepped together (the critic's alone while `critic_only`), until a
    minibatch's approximate KL passes `config.target_kl` (that step is not taken).

    Returns the iteration's diagnostics: the last scored minibatch's policy and value losses and
    surrogate stats, `updates` (steps taken), `first_ratio_error` (max |ratio - 1| of the first
    minibatch, before any update: exactly 0), the rollout's `noise_std` and, with a regulariser,
    `bc_loss`.
    """
    row: dict[str, float] = {"noise_std": batch.noise_std}
    updates = 0
    for index in epoch_minibatches(len(batch), config.batch_size, config.epochs, generator):
        log_prob, old_log_prob, policy_loss, actor_loss, stats = surrogate(index)
        if "first_ratio_error" not in row:
            row["first_ratio_error"] = ratio_error(log_prob, old_log_prob)
        row.update(stats, policy_loss=float(policy_loss.detach()))
        if kl_exceeded(stats["approx_kl"], config.target_kl, ctx):
            break
        value_loss = (learner.critic({k: v[index] for k, v in batch.obs.items()}) - batch.returns[index]).pow(2).mean()
        if learner.bc is not None:  # the copy's imitation loss on demonstration windows
            bc_loss = learner.bc.loss(generator)
            actor_loss = actor_loss + config.bc_coef * bc_loss
            row["bc_loss"] = float(bc_loss.detach())
        actor_critic_step(actor_loss, value_loss, learner.actor_optimizer, learner.critic_optimizer,
                          learner.actor_params, learner.critic_params, config.max_grad_norm, critic_only, ctx)
        row["value_loss"] = float(value_loss.detach())
        updates += 1
    return {**row, "updates": updates}

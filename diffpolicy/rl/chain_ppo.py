"""PPO on recorded denoising chains: the pieces DPPO and flow PPO share.

An environment step of a chunk policy is a chain of K Gaussian denoising transitions; the policy
acts with `ChunkPolicy.sample_chain` and is scored with `ChunkPolicy.chain_log_prob` under the
same `StepNoise`, so before the first update the PPO ratio is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffpolicy.core.samplers import Chain, StepNoise
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl.critic import Critic
from diffpolicy.rl.gae import gae
from diffpolicy.rl.rollout import Actor, Rollout

CHAIN_FIELDS = ("x", "levels", "mean", "std", "log_prob")


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
    advantages and returns `(B,)`."""

    obs: dict[str, torch.Tensor]
    cond: torch.Tensor
    chain: Chain
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

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
    return PPOBatch(obs, cond, chain, old_log_prob, flat(advantages), flat(returns))


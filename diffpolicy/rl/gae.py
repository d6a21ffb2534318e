"""Generalized advantage estimation over environment steps, terminated and truncated kept apart.

A *terminated* step (the task ended: success, failure) has no future: its target is the reward.
A *truncated* step (a time limit, the end of a rollout) does have one: its target bootstraps from
V of the true next state (the final observation, before the vector env's reset). Both end the
advantage recursion, since the next row of the buffer belongs to another episode.
"""

from __future__ import annotations

import torch

from diffpolicy.errors import InvalidValueError


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        truncated: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and value targets.

    Args:
        rewards, values: `(T, N)`: r_t and V(s_t) for T steps of N environments.
        next_values: `(T, N)`: V(s_{t+1}) of the state each step led to (the final observation at
            an episode end).
        terminated, truncated: `(T, N)` bool. The last row of a rollout counts as truncated
            whether or not its episode goes on (it is bootstrapped from next_values).
        gamma, lam: discount and GAE lambda.
    Returns:
        (advantages, returns) `(T, N)`, returns = advantages + values.
    """
    shape = rewards.shape
    for name, tensor in (("values", values), ("next_values", next_values), ("terminated", terminated),
                         ("truncated", truncated)):
        if tensor.shape != shape:
            raise InvalidValueError(f"gae: {name} must have the shape of rewards {tuple(shape)}, got {tuple(tensor.shape)}")
    alive = (~terminated).to(rewards.dtype)
    continues = (~(terminated | truncated)).to(rewards.dtype)
    continues[-1] = 0.0  # the rollout ends: bootstrap from next_values, do not read past the buffer
    deltas = rewards + gamma * alive * next_values - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * lam * continues[t] * running
        advantages[t] = running
    return advantages, advantages + values

"""The pieces of PPO every on-policy algorithm here shares: the clipped surrogate, minibatches,
and one gradient step of actor and critic together (advantage normalization, which spans the
ranks of a data-parallel job, is `rl.distributed.normalize_advantages`).

The ratio is exp of the log-probability difference clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO]:
a transition the update has moved far (a near-zero std, an extreme outlier) gives a large but
finite ratio and no gradient past the clamp, never inf or NaN; equal log-probabilities give
exactly 1 (exp(0)). Log-probabilities that are not finite themselves (a std of 0, a diverged
network) raise `NonFiniteLogProbError` instead of turning into a NaN loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from diffpolicy.rl.distributed import SINGLE, average_gradients, sum_over_ranks
from diffpolicy.rl.errors import NonFiniteLogProbError
from diffpolicy.train.clipping import clip_gradients
from diffpolicy.train.distributed import DistContext

MAX_LOG_RATIO = 20.0
"""|log ratio| bound: exp(20) ~ 4.9e8, far past any PPO clip, far below float32's overflow (exp(88))."""


def check_log_probs(log_prob: torch.Tensor, where: str) -> None:
    """Raise `NonFiniteLogProbError` unless every entry of `log_prob` is finite."""
    bad = ~torch.isfinite(log_prob)
    if bool(bad.any()):
        raise NonFiniteLogProbError(
            f"{where}: {int(bad.sum())} of {log_prob.numel()} log-probabilities are not finite (e.g. "
            f"{float(log_prob[bad][0])}); expected finite values: a transition std of 0 or near it (raise "
            "the std floor / std_min) or a diverged network (lower lr) makes them inf / NaN")


def log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """log(pi_new / pi_old) per entry, clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] (checked finite first)."""
    check_log_probs(log_prob, "PPO ratio: log_prob")
    check_log_probs(old_log_prob, "PPO ratio: old_log_prob")
    return (log_prob - old_log_prob).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def ratio_error(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> float:
    """max |ratio - 1| over all entries (0.0 exactly when the policy that acted is the one scored)."""
    with torch.no_grad():
        return float(log_ratio(log_prob, old_log_prob).exp().sub(1).abs().max())


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip: float | torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped policy loss (to minimize) and its diagnostics.

    Args:
        log_prob, old_log_prob, advantages: the same shape, e.g. `(B, K')` per denoising step.
        clip: epsilon, a float or a tensor broadcastable to them (DPPO ramps it over steps).
    Returns:
        (loss, {"ratio": mean ratio, "clip_fraction": share of clipped terms, "approx_kl": ...}).
        The ratio is exp(`log_ratio`), clamped (see the module docstring).
    """
    log_r = log_ratio(log_prob, old_log_prob)
    ratio = log_r.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.max(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"ratio": float(ratio.mean()),
                 "clip_fraction": float(((ratio - 1.0).abs() > clip).float().mean()),
                 "approx_kl": float(((ratio - 1.0) - log_r).mean())}
    return loss, stats


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation of range(n) (from `generator`) cut into index tensors of `batch_size`
    (the last one shorter if n is not a multiple; a 1-row remainder joins the previous batch, so
    every batch has at least 2 rows and batched networks give row-exact results)."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


def epoch_minibatches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The minibatches of `epochs` passes over range(n), one `minibatches` permutation per pass,
    drawn lazily: a loop that stops early (`kl_exceeded`) draws no permutation it does not use."""
    for _ in range(epochs):
        yield from minibatches(n, batch_size, generator)


def kl_exceeded(approx_kl: float, target_kl: float, ctx: DistContext = SINGLE) -> bool:
    """Whether a minibatch's approximate KL from the rollout's policy, averaged over the job's ranks,
    is past `target_kl` (0: never). Every rank gets the same answer, so the ranks stop their
    iteration's updates together (SB3's PPO stops so at 1.5 x its target_kl: the step is not taken)."""
    if target_kl <= 0:
        return False
    return sum_over_ranks(approx_kl, ctx) / ctx.world_size > target_kl


def joint_step(loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer],
               parameter_groups: Sequence[Sequence[torch.nn.Parameter]], max_grad_norm: float,
               ctx: DistContext = SINGLE) -> None:
    """Backpropagate `loss` once and step every optimizer, each group's gradient averaged over the
    job's ranks, then its norm clipped to `max_grad_norm` (the actor and the critic of an
    actor-critic loss)."""
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    for parameters in parameter_groups:
        average_gradients(parameters, ctx)
        clip_gradients(parameters, max_grad_norm)
    for optimizer in optimizers:
        optimizer.step()


def actor_critic_step(actor_loss: torch.Tensor, value_loss: torch.Tensor, actor_optimizer: torch.optim.Optimizer,
                      critic_optimizer: torch.optim.Optimizer, actor_params: Sequence[torch.nn.Parameter],
                      critic_params: Sequence[torch.nn.Parameter], max_grad_norm: float, critic_only: bool,
                      ctx: DistContext = SINGLE) -> None:
    """One update of an actor-critic minibatch: both losses through `joint_step`, or, while the
    critic warms up (`critic_only`), the value loss alone and the actor left untouched."""
    if critic_only:
        joint_step(value_loss, [critic_optimizer], [critic_params], max_grad_norm, ctx)
    else:
        joint_step(actor_loss + value_loss, [actor_optimizer, critic_optimizer], [actor_params, critic_params],
                   max_grad_norm, ctx)

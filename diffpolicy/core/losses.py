"""The denoising loss per token, with masks and loss weightings (uniform, Min-SNR-gamma).

Min-SNR-gamma (Hang et al. 2023) weights the loss so that, measured in x0 space, a token at
signal-to-noise ratio SNR = alpha^2 / sigma^2 counts min(SNR, gamma). A loss on the network output
is a multiple c(t) of the loss on x0: |out - out*|^2 = c |x0_hat - x0|^2, with
    epsilon:             c = SNR             -> weight min(SNR, gamma) / SNR     = min(1, gamma / SNR)
    sample:              c = 1               -> weight min(SNR, gamma)
    v (VP, a^2+s^2 = 1): c = 1 / sigma^2 = SNR + 1 -> weight min(SNR, gamma) / (SNR + 1)
                                                    = min(alpha^2, gamma sigma^2)
    flow velocity:       c = 1 / t^2 (x0_hat = x_t - t v; alpha = 1 - t, sigma = t, SNR = ((1 - t)/t)^2)
                         -> weight t^2 min(SNR, gamma) = min((1 - t)^2, gamma t^2).
The forms on the right are the ones computed (finite at t = 0 and t = 1).
"""

from __future__ import annotations

import torch

from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.core.processes import Process, check_like
from diffpolicy.core.schedules import check_time

WEIGHTINGS = ("uniform", "min_snr")


def per_token_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over D: pred, target `(B, L, D)` -> `(B, L)`."""
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3:
        raise CoreInputError(f"per_token_loss: pred must be a (B, L, D) tensor, "
                             f"got {getattr(pred, 'shape', type(pred).__name__)}")
    check_like(target, pred, "per_token_loss", "target", "pred")
    return (pred - target).pow(2).mean(-1)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the kept tokens of weight * per-token squared error.

    Args:
        pred, target: `(B, L, D)`.
        mask: `(B, L)`, bool or float (1 = the token counts; e.g. ~action_is_pad, or 0 on an inpainted
            prefix); None = every token. The loss is sum(mask * weight * err) / sum(mask), 0 if the
            mask is empty.
        weight: `(B, L)` per-token loss weight (`loss_weight`); None = 1.
    Returns:
        A scalar.
    """
    err = per_token_loss(pred, target)
    for name, value in (("mask", mask), ("weight", weight)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != err.shape):
            raise CoreInputError(f"denoising_loss: {name} must have shape (B, L) = {tuple(err.shape)}, "
                                 f"got {getattr(value, 'shape', type(value).__name__)}")
    if weight is not None:
        err = err * weight.to(err.dtype)
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype)
    return (err * mask).sum() / mask.sum().clamp(min=1.0)


def min_snr_weight(process: Process, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weight for the loss on `process`'s network output (module docstring). t `(B, L)` -> `(B, L)`."""
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise CoreConfigError(f"min_snr_weight: gamma must be a number > 0, got {gamma!r}")
    alpha, sigma = process.alpha_sigma(t)
    a2, s2 = alpha ** 2, sigma ** 2
    if process.prediction == "epsilon":
        return torch.clamp(gamma * s2 / a2, max=1.0)
    if process.prediction == "sample":
        return torch.clamp(a2 / s2, max=gamma)  # a2 / 0 = inf at t = 0 -> gamma
    if process.prediction in ("v", "velocity"):
        return torch.minimum(a2, gamma * s2)
    raise CoreConfigError(f"min_snr_weight: no Min-SNR weighting for prediction {process.prediction!r}")


def loss_weight(process: Process, t: torch.Tensor, weighting: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
    """Per-token loss weight `(B, L)` for times t `(B, L)`: "uniform" (1) or "min_snr" (`min_snr_weight`)."""
    if weighting not in WEIGHTINGS:
        raise CoreConfigError(f"loss_weight: unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise CoreInputError(f"loss_weight: t must be a (B, L) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if weighting == "uniform":
        check_time(t, "loss_weight: t")
        return torch.ones_like(t)
    return min_snr_weight(process, t, gamma)

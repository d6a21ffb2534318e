"""diffpolicy.core: the shared generative core (knows nothing about robots).

Every model is a denoiser over tokens, each with its own noise level:
`out = denoiser(x_t (B, L, D), t (B, L), cond) -> (B, L, D)`; t = 0 is clean data, t = 1 pure noise.

- `schedules`: variance-preserving noise schedules over continuous t (linear-beta DDPM, cosine,
  sigmoid; logSNR shift).
- `processes`: `GaussianDiffusion` (DDPM / DDIM with eta) and `FlowMatching` (linear path, Euler,
  optional explicit step noise): corruption, targets, x0 / noise predictions and Gaussian reverse
  steps with log-probabilities.
- `masked`: `MaskedDiffusion`, the absorbing-state process over one-hot tokens `(B, L, V + 1)`:
  forward marginals, the per-token negative-ELBO loss, the likelihood bound, and
  confidence-ordered unmasking as its reverse step (driven by the same `sample` loop).
- `losses`: the per-token denoising loss with masks and Min-SNR-gamma weighting.
- `samplers`: `sample(...)`, one loop with per-token start levels, guidance, per-step noise control
  (`StepNoise`) and a recorded, stacked `Chain`; `chain_log_prob` re-scores a chain in one pass.
- `guidance`: classifier-free guidance, hard prefix inpainting, RTC-style guided inpainting.
"""

from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.core.guidance import (
    ClassifierFreeGuidance,
    ComposedGuidance,
    Guidance,
    GuidedInpainting,
    PrefixInpainting,
    rtc_prefix_weights,
)
from diffpolicy.core.losses import denoising_loss, loss_weight, min_snr_weight, per_token_loss
from diffpolicy.core.masked import MaskedDiffusion
from diffpolicy.core.processes import (
    FlowMatching,
    GaussianDiffusion,
    Process,
    StepResult,
    gaussian_log_prob,
)
from diffpolicy.core.samplers import Chain, SampleResult, StepNoise, chain_log_prob, sample
from diffpolicy.core.schedules import (
    CosineSchedule,
    LinearBetaSchedule,
    NoiseSchedule,
    SigmoidSchedule,
    make_schedule,
)

__all__ = [
    "Chain", "ClassifierFreeGuidance", "ComposedGuidance", "CoreConfigError", "CoreInputError",
    "CosineSchedule", "FlowMatching", "GaussianDiffusion", "Guidance", "GuidedInpainting",
    "LinearBetaSchedule", "MaskedDiffusion", "NoiseSchedule", "PrefixInpainting", "Process", "SampleResult",
    "SigmoidSchedule", "StepNoise", "StepResult", "chain_log_prob", "denoising_loss", "gaussian_log_prob",
    "loss_weight",
    "make_schedule", "min_snr_weight", "per_token_loss", "rtc_prefix_weights", "sample",
]

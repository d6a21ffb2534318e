"""Processes: corruption, parameterizations, DDPM/DDIM and flow steps, log-probabilities, bad input."""

import numpy as np
import pytest
import torch
from core_oracles import gaussian_oracle
from torch.distributions import Normal

from diffpolicy.core import (
    CoreConfigError,
    CoreInputError,
    FlowMatching,
    GaussianDiffusion,
    gaussian_log_prob,
    make_schedule,
)
from diffpolicy.core.schedules import LinearBetaSchedule

B, L, D = 4, 6, 3


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def processes():
    return [GaussianDiffusion(make_schedule("cosine"), "epsilon"),
            GaussianDiffusion(make_schedule("linear"), "sample"),
            GaussianDiffusion(make_schedule("sigmoid", shift=2.0), "v"),
            FlowMatching()]


PROCESS_IDS = ["eps-cosine", "sample-linear", "v-sigmoid", "flow"]


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def times(seed=1, low=0.0, high=1.0, dtype=torch.float32):
    return low + (high - low) * torch.rand(B, L, generator=gen(seed), dtype=dtype)


@pytest.mark.parametrize("process", processes(), ids=PROCESS_IDS)
def test_corrupt_is_the_exact_formula(process):
    x0, noise, t = rand(B, L, D, seed=0), rand(B, L, D, seed=1), times()
    if isinstance(process, FlowMatching):
        expected = (1 - t)[..., None] * x0 + t[..., None] * noise
    else:
        alpha, sigma = process.schedule.alpha_sigma(t)
        expected = alpha[..., None] * x0 + sigma[..., None] * noise
    torch.testing.assert_close(process.corrupt(x0, t, noise), expected)


@pytest.mark.parametrize("process", processes(), ids=PROCESS_IDS)
def test_corrupt_matches_the_marginal_mean_and_std(process):
    n = 20000
    x0 = torch.full((n, 3, 1), 0.8)
    t = torch.tensor([0.1, 0.5, 0.9]).expand(n, 3)
    x_t = process.corrupt(x0, t, rand(n, 3, 1, seed=3))
    alpha, sigma = process.alpha_sigma(t[0])
    # sample mean error ~ sigma / sqrt(n) < 0.007; sample std error ~ sigma / sqrt(2 n) < 0.005
    torch.testing.assert_close(x_t.mean(0).squeeze(-1), alpha * 0.8, atol=0.03, rtol=0)
    torch.testing.assert_close(x_t.std(0).squeeze(-1), sigma, atol=0.025, rtol=0)


@pytest.mark.parametrize("process", processes(), ids=PROCESS_IDS)
def test_parameterizations_are_consistent(process):
    x0, noise, t = rand(B, L, D, seed=0, dtype=torch.float64), rand(B, L, D, seed=1, dtype=torch.float64), \
        times(low=0.02, high=0.98, dtype=torch.float64)
    x_t = process.corrupt(x0, t, noise)
    out = process.target(x0, noise, t)
    torch.testing.assert_close(process.predict_x0(x_t, t, out), x0)
    torch.testing.assert_close(process.predict_noise(x_t, t, out), noise)
    torch.testing.assert_close(process.output_from_x0(x_t, t, x0), out)


def test_targets_are_the_documented_ones():
    x0, noise, t = rand(B, L, D, seed=0), rand(B, L, D, seed=1), times()
    schedule = make_schedule("cosine")
    alpha, sigma = (c[..., None] for c in schedule.alpha_sigma(t))
    torch.testing.assert_close(GaussianDiffusion(schedule, "epsilon").target(x0, noise, t), noise)
    torch.testing.assert_close(GaussianDiffusion(schedule, "sample").target(x0, noise, t), x0)
    torch.testing.assert_close(GaussianDiffusion(schedule, "v").target(x0, noise, t), alpha * noise - sigma * x0)
    torch.testing.assert_close(FlowMatching().target(x0, noise, t), noise - x0)


def test_epsilon_x0_prediction_is_finite_at_t_one():
    process = GaussianDiffusion(make_schedule("cosine"), "epsilon")
    x_t = rand(B, L, D)
    x0 = process.predict_x0(x_t, torch.ones(B, L), rand(B, L, D, seed=5))
    assert bool(torch.isfinite(x0).all())


def discrete_linear_ddpm(n):
    betas = np.linspace(1e-4, 0.02, n)
    return betas, np.cumprod(1.0 - betas)


def ddpm_posterior(alpha_bar_t, alpha_bar_s):
    """DDPM's posterior q(x_s | x_t, x0) in the discrete form (diffusers' DDPMScheduler):
    (std, coefficient of x0, coefficient of x_t), with beta = 1 - alpha_bar_t / alpha_bar_s."""
    beta = 1 - alpha_bar_t / alpha_bar_s
    var = beta * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    coef_x0 = beta * np.sqrt(alpha_bar_s) / (1 - alpha_bar_t)
    coef_xt = (1 - alpha_bar_s) * np.sqrt(1 - beta) / (1 - alpha_bar_t)
    return np.sqrt(var), coef_x0, coef_xt


@pytest.mark.parametrize("k", [1, 2, 37, 100])
def test_ddpm_step_is_the_closed_form_posterior(k):
    """eta = 1, t = k / N -> s = (k - 1) / N with an x0 ("sample") output: the DDPM posterior, exactly for
    the schedule's own alpha_bar, and closely for the discrete linear-beta DDPM table."""
    n = 100
    schedule = LinearBetaSchedule(num_train_steps=n)
    process = GaussianDiffusion(schedule, "sample", eta=1.0)
    x_t, x0 = rand(B, L, D, seed=0, dtype=torch.float64), rand(B, L, D, seed=1, dtype=torch.float64)
    t = torch.full((B, L), k / n, dtype=torch.float64)
    s = torch.full((B, L), (k - 1) / n, dtype=torch.float64)
    x_s, mean, std = process.step(x_t, t, s, x0, noise=rand(B, L, D, seed=2, dtype=torch.float64))

    own = ddpm_posterior(float(schedule.alpha_sigma(t[0, 0])[0] ** 2), float(schedule.alpha_sigma(s[0, 0])[0] ** 2))
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, n))
    table = ddpm_posterior(alphas_cumprod[k - 1], alphas_cumprod[k - 2] if k >= 2 else 1.0)
    for (std_ref, coef_x0, coef_xt), rtol in ((own, 1e-9), (table, 2e-3)):
        torch.testing.assert_close(std, torch.full_like(std, std_ref), rtol=rtol, atol=0)
        torch.testing.assert_close(mean, coef_x0 * x0 + coef_xt * x_t, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_ddim_eta_zero_is_deterministic(prediction):
    process = GaussianDiffusion(make_schedule("cosine"), prediction, eta=0.0)
    x_t, out, t = rand(B, L, D), rand(B, L, D, seed=1), times(low=0.3)
    s = t * 0.5
    a = process.step(x_t, t, s, out, noise=rand(B, L, D, seed=2))
    b = process.step(x_t, t, s, out, noise=rand(B, L, D, seed=3))
    c = process.step(x_t, t, s, out)
    assert bool((a.std == 0).all())
    assert torch.equal(a.x_s, b.x_s) and torch.equal(a.x_s, c.x_s) and torch.equal(a.x_s, a.mean)
    # the DDIM formula: x_s = alpha_s x0_hat + sigma_s eps_hat
    alpha_s, sigma_s = (c[..., None] for c in process.alpha_sigma(s))
    expected = alpha_s * process.predict_x0(x_t, t, out) + sigma_s * process.predict_noise(x_t, t, out)
    torch.testing.assert_close(a.x_s, expected)


def test_eta_overrides_per_call_and_interpolates_the_std():
    process = GaussianDiffusion(make_schedule("linear"), "epsilon", eta=1.0)
    x_t, out, t = rand(B, L, D), rand(B, L, D, seed=1), times(low=0.3)
    s = t * 0.7
    full = process.transition(x_t, t, s, out)[1]
    half = process.transition(x_t, t, s, out, eta=0.5)[1]
    torch.testing.assert_close(half, 0.5 * full)
    assert bool((process.transition(x_t, t, s, out, eta=0.0)[1] == 0).all())


def ddim_invert(process, denoiser, x0, steps):
    """Run the deterministic step backwards, level k/steps -> (k+1)/steps: solve step(y).x_s = x for y.

    The step of an affine denoiser is affine and elementwise here, so Newton's method with the
    elementwise derivative converges in one iteration (two for safety)."""
    x = x0
    for k in range(steps):
        lo = torch.full(x.shape[:2], k / steps, dtype=x.dtype)
        hi = torch.full(x.shape[:2], (k + 1) / steps, dtype=x.dtype)
        y = x.clone()
        for _ in range(2):
            y = y.detach().requires_grad_(True)
            x_s = process.step(y, hi, lo, denoiser(y, hi)).x_s
            (slope,) = torch.autograd.grad(x_s.sum(), y)
            y = (y - (x_s - x) / slope).detach()
        x = y
    return x


@pytest.mark.parametrize("process", [GaussianDiffusion(make_schedule("linear"), "epsilon", eta=0.0),
                                     GaussianDiffusion(make_schedule("cosine"), "v", eta=0.0),
                                     FlowMatching()], ids=["ddim-eps-linear", "ddim-v-cosine", "flow"])
def test_deterministic_inversion_reconstructs(process):
    mean, std, steps = 0.5, 0.3, 100
    denoiser = gaussian_oracle(process, mean, std)
    x0 = mean + std * rand(64, 2, 1, seed=4, dtype=torch.float64)
    noise = ddim_invert(process, denoiser, x0, steps)
    # the probability-flow ODE of Gaussian data maps x0 to the standardized (x0 - mean) / std
    torch.testing.assert_close(noise, (x0 - mean) / std, rtol=0.08, atol=0.01)  # 100-step discretization
    x = noise
    for k in range(steps):
        t = torch.full((64, 2), (steps - k) / steps, dtype=torch.float64)
        s = torch.full((64, 2), (steps - k - 1) / steps, dtype=torch.float64)
        x = process.step(x, t, s, denoiser(x, t)).x_s
    torch.testing.assert_close(x, x0, atol=1e-7, rtol=0)


def test_flow_euler_step_is_exact_on_a_straight_path():
    process = FlowMatching()
    x0, noise = rand(B, L, D, seed=0), rand(B, L, D, seed=1)
    v = noise - x0
    one = torch.ones(B, L)
    torch.testing.assert_close(process.step(noise, one, torch.zeros(B, L), v).x_s, x0, rtol=0, atol=1e-6)
    t, s = times(seed=2), times(seed=3)
    t, s = torch.maximum(t, s), torch.minimum(t, s)
    x_t = process.corrupt(x0, t, noise)
    torch.testing.assert_close(process.step(x_t, t, s, v).x_s, process.corrupt(x0, s, noise))


def stochastic_cases():
    t = times(low=0.2)
    s = t * torch.rand(B, L, generator=gen(9))
    return [
        (GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=1.0), t, s, {}),
        (GaussianDiffusion(make_schedule("linear"), "v", eta=0.6, clip_x0=1.0), t, s, {}),
        (FlowMatching(std=0.3), t, s, {}),
        (FlowMatching(), t, s, {"std": 0.05 + torch.rand(B, L, D, generator=gen(8))}),
    ]


@pytest.mark.parametrize("process,t,s,kwargs", stochastic_cases(),
                         ids=["ddpm", "ddim-0.6-clip", "flow-float", "flow-tensor"])
def test_step_log_prob_matches_torch_normal(process, t, s, kwargs):
    x_t, out, noise = rand(B, L, D), rand(B, L, D, seed=1), rand(B, L, D, seed=2)
    x_s, mean, std = process.step(x_t, t, s, out, noise=noise, **kwargs)
    assert bool((std > 0).all())
    torch.testing.assert_close(x_s, mean + std * noise)
    expected = Normal(mean, std).log_prob(x_s).sum((1, 2))
    torch.testing.assert_close(gaussian_log_prob(x_s, mean, std), expected)
    torch.testing.assert_close(process.transition_log_prob(x_t, t, s, out, x_s, **kwargs), expected)
    # the same transition under a different model output (a fine-tuned model)
    other = rand(B, L, D, seed=7)
    mean2, std2 = process.transition(x_t, t, s, other, **kwargs)
    torch.testing.assert_close(process.transition_log_prob(x_t, t, s, other, x_s, **kwargs),
                               Normal(mean2, std2).log_prob(x_s).sum((1, 2)))
    # a std floor, as DPPO uses for evaluation
    torch.testing.assert_close(process.transition_log_prob(x_t, t, s, out, x_s, std_floor=0.1, **kwargs),
                               Normal(mean, std.clamp(min=0.1)).log_prob(x_s).sum((1, 2)))


def test_std_floor_turns_a_deterministic_move_into_a_gaussian_but_not_a_frozen_token():
    process = GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=0.0)
    x_t, out = rand(B, L, D), rand(B, L, D, seed=1)
    t = times(low=0.3)
    t[:, 0] = 0.0  # frozen tokens
    s = t * 0.5
    x_s = process.step(x_t, t, s, out).x_s
    assert bool((process.transition_log_prob(x_t, t, s, out, x_s) == 0).all())
    mean, _ = process.transition(x_t, t, s, out)
    expected = Normal(mean[:, 1:], 0.1).log_prob(x_s[:, 1:]).sum((1, 2))
    torch.testing.assert_close(process.transition_log_prob(x_t, t, s, out, x_s, std_floor=0.1), expected)


def test_gaussian_log_prob_leaves_out_zero_std_entries():
    x, mean = rand(B, L, D), rand(B, L, D, seed=1)
    std = torch.rand(B, L, D, generator=gen(2)) + 0.1
    std[:, :2] = 0.0
    expected = Normal(mean[:, 2:], std[:, 2:]).log_prob(x[:, 2:]).sum((1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.5), Normal(mean, 0.5).log_prob(x).sum((1, 2)))
    with pytest.raises(CoreInputError, match="broadcast"):
        gaussian_log_prob(x, mean, torch.ones(2))
    with pytest.raises(CoreInputError, match=">= 0"):
        gaussian_log_prob(x, mean, -torch.ones(1))


@pytest.mark.parametrize("process", processes() + [FlowMatching(std=0.5)], ids=PROCESS_IDS + ["flow-std"])
def test_tokens_with_t_equal_s_are_untouched(process):
    x_t = rand(B, L, D)
    t = times(low=0.1)
    t[:, 0] = 0.0
    t[:, 1] = 0.5
    s = t * 0.5
    s[:, 1] = 0.5  # t == s == 0.5
    out = rand(B, L, D, seed=1).requires_grad_(True)
    x_s, mean, std = process.step(x_t, t, s, out, noise=rand(B, L, D, seed=2))
    assert torch.equal(x_s[:, :2], x_t[:, :2]) and torch.equal(mean[:, :2], x_t[:, :2])
    assert bool((std[:, :2] == 0).all())
    log_prob = process.transition_log_prob(x_t, t, s, out, x_s.detach(), std_floor=0.1)
    (grad,) = torch.autograd.grad(log_prob.sum(), out)
    assert bool(torch.isfinite(grad).all()) and bool((grad[:, :2] == 0).all())


def test_clip_x0_clips_the_sample():
    process = GaussianDiffusion(make_schedule("cosine"), "sample", eta=1.0, clip_x0=1.0)
    x_t = rand(B, L, D)
    out = 3.0 * rand(B, L, D, seed=1)
    x_s = process.step(x_t, torch.full((B, L), 0.3), torch.zeros(B, L), out).x_s
    torch.testing.assert_close(x_s, out.clamp(-1, 1))
    # the epsilon estimate is recomputed from the clipped x0: a DDIM step stays on the line through x_t
    ddim = GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=0.0, clip_x0=0.5)
    t, s = torch.full((B, L), 0.6), torch.full((B, L), 0.3)
    eps = rand(B, L, D, seed=3)
    x0_clipped = ddim.predict_x0(x_t, t, eps).clamp(-0.5, 0.5)
    alpha_t, sigma_t = (c[..., None] for c in ddim.alpha_sigma(t))
    alpha_s, sigma_s = (c[..., None] for c in ddim.alpha_sigma(s))
    expected = alpha_s * x0_clipped + sigma_s * (x_t - alpha_t * x0_clipped) / sigma_t
    torch.testing.assert_close(ddim.step(x_t, t, s, eps).x_s, expected)


def test_bad_inputs_raise_clear_errors():
    process = GaussianDiffusion(make_schedule("cosine"), "epsilon")
    x, t = rand(B, L, D), times()
    with pytest.raises(CoreInputError, match=r"t must have shape \(B, L\) = \(4, 6\).*got \(4,\)"):
        process.corrupt(x, t[:, 0], x)
    with pytest.raises(CoreInputError, match=r"x0 must have shape \(B, L, D\)"):
        process.corrupt(x[0], t, x[0])
    with pytest.raises(CoreInputError, match="noise must have the shape"):
        process.corrupt(x, t, x[:, :2])
    with pytest.raises(CoreInputError, match=r"\[0, 1\]"):
        process.predict_x0(x, t + 1.0, x)
    with pytest.raises(CoreInputError, match="out must have the shape"):
        process.predict_x0(x, t, x[..., :1])
    with pytest.raises(CoreInputError, match=r"s <= t.*index \(0, 0\)"):
        process.step(x, torch.full((B, L), 0.3), torch.full((B, L), 0.4), x, noise=x)
    with pytest.raises(CoreInputError, match="s must have shape"):
        process.step(x, t, t[:, :3], x, noise=x)
    with pytest.raises(CoreInputError, match="noise is None"):
        process.step(x, t, t * 0.5, x)
    with pytest.raises(TypeError, match="floating"):
        process.corrupt(x.long(), t, x)
    with pytest.raises(CoreConfigError, match="unknown prediction 'eps'"):
        GaussianDiffusion(make_schedule("cosine"), "eps")
    with pytest.raises(CoreConfigError, match="eta"):
        GaussianDiffusion(make_schedule("cosine"), eta=1.5)
    with pytest.raises(CoreConfigError, match="eta"):
        process.step(x, t, t * 0.5, x, noise=x, eta=-1.0)
    with pytest.raises(CoreConfigError, match="clip_x0"):
        GaussianDiffusion(make_schedule("cosine"), clip_x0=0)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        GaussianDiffusion("cosine")
    with pytest.raises(CoreConfigError, match="std"):
        FlowMatching(std=-0.1)
    with pytest.raises(CoreInputError, match="broadcast"):
        FlowMatching().step(x, t, t * 0.5, x, noise=x, std=torch.ones(2, 2))
    with pytest.raises(CoreInputError, match=">= 0"):
        FlowMatching().step(x, t, t * 0.5, x, noise=x, std=-torch.ones(1))
    with pytest.raises(CoreConfigError, match="std_floor"):
        process.transition_log_prob(x, t, t * 0.5, x, x, std_floor=-1.0)

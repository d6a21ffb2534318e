"""Guidance: classifier-free guidance, hard prefix inpainting, RTC-style guided inpainting, composition."""

import math

import pytest
import torch
from core_oracles import gaussian_oracle

from diffpolicy.core import (
    ClassifierFreeGuidance,
    ComposedGuidance,
    CoreConfigError,
    CoreInputError,
    FlowMatching,
    GaussianDiffusion,
    GuidedInpainting,
    PrefixInpainting,
    make_schedule,
    rtc_prefix_weights,
    sample,
)

B, L, D = 3, 5, 2
MEAN, STD = 0.7, 0.3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def conditional_model(x_t, t, cond):
    """A model whose output depends on cond: a tensor (B, C) or a dict {"c": (B, C)}."""
    c = cond["c"] if isinstance(cond, dict) else cond
    return torch.sin(x_t) + t.unsqueeze(-1) * c.sum(-1)[:, None, None]


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5])
def test_cfg_is_uncond_plus_scale_times_the_difference(scale):
    x_t, t = rand(B, L, D), torch.rand(B, L, generator=gen(1))
    cond, null = rand(B, 4, seed=2), torch.zeros(4)
    calls = []

    def model(x, tt, c):
        calls.append(x.shape[0])
        return conditional_model(x, tt, c)

    expected = conditional_model(x_t, t, null.expand(B, 4)) + scale * (
        conditional_model(x_t, t, cond) - conditional_model(x_t, t, null.expand(B, 4)))
    process = FlowMatching()
    batched = ClassifierFreeGuidance(scale, null).model_output(model, process, x_t, t, cond)
    torch.testing.assert_close(batched, expected)
    assert calls == [2 * B]  # tensors: one batch of 2B
    calls.clear()
    separate = ClassifierFreeGuidance(scale, {"c": null.expand(B, 4)}).model_output(model, process, x_t, t, {"c": cond})
    torch.testing.assert_close(separate, expected)
    assert calls == [B, B]


def test_cfg_bad_inputs():
    with pytest.raises(CoreConfigError, match="scale"):
        ClassifierFreeGuidance(float("nan"), None)
    with pytest.raises(CoreInputError, match=r"null_cond of shape \(3,\) does not broadcast to cond \(3, 4\)"):
        ClassifierFreeGuidance(2.0, torch.zeros(3)).model_output(
            conditional_model, FlowMatching(), rand(B, L, D), torch.rand(B, L), rand(B, 4))


@pytest.mark.parametrize("process", [GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=1.0),
                                     FlowMatching(std=0.3)], ids=["ddpm", "flow-std"])
def test_prefix_inpainting_returns_the_prefix_exactly(process):
    prefix = rand(B, 2, D, seed=3)
    x_init = rand(B, L, D)
    x_copy = x_init.clone()
    seen_t = []

    def denoiser(x_t, t, cond):
        seen_t.append(t)
        return gaussian_oracle(process, MEAN, STD)(x_t, t)

    result = sample(denoiser, process, x_init, 6, guidance=PrefixInpainting(prefix), generator=gen(1))
    assert torch.equal(result.x0[:, :2], prefix)
    assert torch.equal(x_init, x_copy)  # the caller's tensor is untouched
    assert all(bool((t[:, :2] == 0).all()) for t in seen_t)  # the model sees the prefix as clean
    assert not torch.allclose(result.x0[:, 2:], x_init[:, 2:])


def test_prefix_inpainting_bad_shapes():
    process = FlowMatching()
    denoiser = gaussian_oracle(process, MEAN, STD)
    for prefix in (rand(B, L + 1, D), rand(B + 1, 2, D), rand(B, 2, D + 1)):
        with pytest.raises(CoreInputError, match=r"prefix \(B, P, D\).*does not fit x_init"):
            sample(denoiser, process, rand(B, L, D), 2, guidance=PrefixInpainting(prefix))
    with pytest.raises(CoreInputError, match=r"PrefixInpainting: prefix must have shape"):
        PrefixInpainting(rand(2, D))


def token_mixing(matrix, bias=0.0):
    """A linear model out = M x + bias mixing tokens: (L, L) acting on the token axis."""
    return lambda x_t, t, cond: torch.einsum("ij,bjd->bid", matrix.to(x_t), x_t) + bias


def test_guided_inpainting_on_flow_is_rtc_in_its_own_time():
    """RTC in its time tau = 1 - t (0 = noise):
    v_rtc <- v_rtc + min(beta, w(tau)) J^T [W (Y - x1_hat)],  x1_hat = x + (1 - tau) v_rtc."""
    beta = 5.0
    matrix = 0.3 * rand(L, L, seed=4, dtype=torch.float64)
    model = token_mixing(matrix, bias=0.1)
    x_t = rand(B, L, D, seed=1, dtype=torch.float64)
    t = torch.tensor([1.0, 0.95, 0.6, 0.3, 0.05], dtype=torch.float64).expand(B, L)
    target = rand(B, L, D, seed=2, dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0, 0.6, 0.2, 0.0], dtype=torch.float64)
    out = GuidedInpainting(target, weights, max_weight=beta).model_output(model, FlowMatching(), x_t, t, None)

    tau = 1 - t
    v_rtc = -model(x_t, t, None)
    x1_hat = x_t + (1 - tau).unsqueeze(-1) * v_rtc
    residual = weights[:, None] * (target - x1_hat)
    # J = d x1_hat / d x = I - diag(1 - tau) M on the token axis, so J^T r = r - M^T ((1 - tau) r)
    correction = residual - torch.einsum("ji,bjd->bid", matrix, (1 - tau).unsqueeze(-1) * residual)
    w = ((1 - tau) / tau) * (tau ** 2 + (1 - tau) ** 2) / (1 - tau) ** 2  # inf at tau = 0
    v_rtc_guided = v_rtc + torch.clamp(w, max=beta).unsqueeze(-1) * correction
    torch.testing.assert_close(out, -v_rtc_guided)
    assert float(w[0, 0]) == math.inf and float(w[0, 2]) < beta  # both sides of the clip are covered


def test_guided_inpainting_on_vp_diffusion_follows_the_documented_gain():
    beta = 4.0
    process = GaussianDiffusion(make_schedule("cosine"), "epsilon")
    matrix = 0.3 * rand(L, L, seed=4, dtype=torch.float64)
    model = token_mixing(matrix)
    x_t = rand(B, L, D, seed=1, dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0], dtype=torch.float64).expand(B, L)
    target = rand(B, L, D, seed=2, dtype=torch.float64)
    weights = torch.rand(B, L, generator=gen(5), dtype=torch.float64)
    out = GuidedInpainting(target, weights, max_weight=beta).model_output(model, process, x_t, t, None)

    alpha, sigma = (c.unsqueeze(-1) for c in process.alpha_sigma(t))
    eps = model(x_t, t, None)
    x0_hat = (x_t - sigma * eps) / alpha
    residual = weights.unsqueeze(-1) * (target - x0_hat)
    # x0_hat_i = (x_i - sigma_i (M x)_i) / alpha_i  ->  J^T r = r / alpha - M^T (sigma r / alpha)
    correction = residual / alpha - torch.einsum("ji,bjd->bid", matrix, sigma * residual / alpha)
    gain = torch.minimum(1 / alpha, beta * sigma)  # alpha^2 + sigma^2 = 1
    x0_guided = x0_hat + gain * correction
    expected = (x_t - alpha * x0_guided) / sigma
    torch.testing.assert_close(out[:, :4], expected[:, :4])
    torch.testing.assert_close(process.predict_x0(x_t, t, out)[:, 4], x_t[:, 4])  # t = 0: no correction


@pytest.mark.parametrize("process", [GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=1.0),
                                     FlowMatching()], ids=["ddpm", "flow"])
def test_guided_inpainting_pulls_toward_the_target_under_no_grad(process):
    horizon, steps = 8, 10
    denoiser = gaussian_oracle(process, MEAN, STD)
    x_init = rand(64, horizon, D, seed=0)
    target = torch.full((64, horizon, D), 1.5)
    weights = rtc_prefix_weights(horizon, delay=2, exec_horizon=2)
    with torch.no_grad():
        plain = sample(denoiser, process, x_init, steps, generator=gen(1)).x0
        guided = sample(denoiser, process, x_init, steps, generator=gen(1),
                        guidance=GuidedInpainting(target, weights, max_weight=5.0)).x0
    held = weights == 1
    plain_gap = (plain[:, held] - 1.5).abs().mean()
    guided_gap = (guided[:, held] - 1.5).abs().mean()
    assert guided_gap < 0.5 * plain_gap, (float(guided_gap), float(plain_gap))
    free = weights == 0  # the analytic denoiser treats tokens independently: untouched by guidance
    torch.testing.assert_close(guided[:, free], plain[:, free])


def test_guided_inpainting_refuses_inference_mode():
    guidance = GuidedInpainting(rand(B, L, D), torch.ones(L))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode.*no_grad"):
        guidance.model_output(token_mixing(torch.eye(L)), FlowMatching(), rand(B, L, D), torch.rand(B, L), None)


def test_guided_inpainting_of_a_model_without_x_dependence_is_unchanged():
    process = GaussianDiffusion(make_schedule("cosine"), "sample")
    constant = rand(B, L, D, seed=3)
    t = torch.rand(B, L, generator=gen(1))
    out = GuidedInpainting(rand(B, L, D), torch.ones(L)).model_output(lambda x, tt, c: constant, process,
                                                                        rand(B, L, D), t, None)
    torch.testing.assert_close(out, constant)


def test_guided_inpainting_bad_inputs():
    with pytest.raises(CoreInputError, match=r"weights must have shape \(L,\) = \(5,\) or \(B, L\) = \(3, 5\)"):
        GuidedInpainting(rand(B, L, D), torch.ones(L + 1))
    with pytest.raises(CoreInputError, match=">= 0"):
        GuidedInpainting(rand(B, L, D), -torch.ones(L))
    with pytest.raises(CoreConfigError, match="max_weight"):
        GuidedInpainting(rand(B, L, D), torch.ones(L), max_weight=-1.0)
    with pytest.raises(CoreInputError, match="target must have the shape of x_t"):
        GuidedInpainting(rand(B, L, D), torch.ones(L)).model_output(
            token_mixing(torch.eye(L + 1)), FlowMatching(), rand(B, L + 1, D), torch.rand(B, L + 1), None)


def test_rtc_prefix_weights():
    weights = rtc_prefix_weights(8, delay=2, exec_horizon=3)
    c = torch.tensor([3 / 4, 2 / 4, 1 / 4])
    expected = torch.cat([torch.ones(2), c * (c.exp() - 1) / (math.e - 1), torch.zeros(3)])
    torch.testing.assert_close(weights, expected)
    assert torch.equal(rtc_prefix_weights(4, 0, 0, dtype=torch.float64), torch.tensor(
        [c * math.expm1(c) / math.expm1(1) for c in (4 / 5, 3 / 5, 2 / 5, 1 / 5)], dtype=torch.float64))
    assert torch.equal(rtc_prefix_weights(6, 3, 3), torch.tensor([1.0, 1, 1, 0, 0, 0]))
    with pytest.raises(CoreConfigError, match="d \\+ s <= H"):
        rtc_prefix_weights(8, 5, 4)
    with pytest.raises(CoreConfigError, match="ints"):
        rtc_prefix_weights(8, 1.5, 2)


def test_composed_guidance_orders_the_hooks():
    process = FlowMatching()
    x_t, t = rand(B, L, D), torch.rand(B, L, generator=gen(1))
    cond, null = rand(B, 4, seed=2), torch.zeros(4)
    cfg = ClassifierFreeGuidance(2.0, null)
    guided = GuidedInpainting(rand(B, L, D, seed=3), torch.linspace(1, 0, L))
    composed = ComposedGuidance([cfg, guided]).model_output(conditional_model, process, x_t, t, cond)

    def cfg_model(x, tt, c):
        return cfg.model_output(conditional_model, process, x, tt, c)

    torch.testing.assert_close(composed, guided.model_output(cfg_model, process, x_t, t, cond))

    prefix = rand(B, 2, D, seed=4)
    both = ComposedGuidance([PrefixInpainting(prefix), guided])
    x0 = sample(gaussian_oracle(process, MEAN, STD), process, rand(B, L, D), 4, guidance=both).x0
    assert torch.equal(x0[:, :2], prefix)
    with pytest.raises(TypeError, match="index 1"):
        ComposedGuidance([cfg, "guided"])

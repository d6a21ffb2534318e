"""Losses: masked per-token denoising loss and Min-SNR-gamma weights."""

import pytest
import torch

from diffpolicy.core import (
    CoreConfigError,
    CoreInputError,
    FlowMatching,
    GaussianDiffusion,
    denoising_loss,
    loss_weight,
    make_schedule,
    min_snr_weight,
    per_token_loss,
)

GAMMA = 5.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


def interior_times():
    return torch.linspace(0.01, 0.99, 99, dtype=torch.float64).reshape(9, 11)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_min_snr_matches_the_paper_formulas(prediction):
    process = GaussianDiffusion(make_schedule("cosine"), prediction)
    t = interior_times()
    snr = process.schedule.log_snr(t).exp()
    clipped = torch.clamp(snr, max=GAMMA)
    expected = {"epsilon": clipped / snr, "sample": clipped, "v": clipped / (snr + 1)}[prediction]
    torch.testing.assert_close(min_snr_weight(process, t, GAMMA), expected)


def test_min_snr_for_flow_is_t_squared_times_min_snr_gamma():
    t = interior_times()
    snr = ((1 - t) / t) ** 2
    torch.testing.assert_close(min_snr_weight(FlowMatching(), t, GAMMA), t ** 2 * torch.clamp(snr, max=GAMMA))


@pytest.mark.parametrize("process", [GaussianDiffusion(make_schedule("linear"), "epsilon"),
                                     GaussianDiffusion(make_schedule("sigmoid"), "sample"),
                                     GaussianDiffusion(make_schedule("cosine"), "v"), FlowMatching()],
                         ids=["epsilon", "sample", "v", "flow"])
def test_min_snr_weighted_output_error_is_min_snr_times_x0_error(process):
    """The principle behind every branch: weight * |out - out*|^2 = min(SNR, gamma) * |x0_hat - x0|^2."""
    t = interior_times()
    x0 = torch.randn(9, 11, 2, generator=gen(0), dtype=torch.float64)
    noise = torch.randn(9, 11, 2, generator=gen(1), dtype=torch.float64)
    x_t = process.corrupt(x0, t, noise)
    target = process.target(x0, noise, t)
    out = target + 0.1 * torch.randn(9, 11, 2, generator=gen(2), dtype=torch.float64)
    alpha, sigma = process.alpha_sigma(t)
    x0_error = per_token_loss(process.predict_x0(x_t, t, out), x0)
    torch.testing.assert_close(min_snr_weight(process, t, GAMMA) * per_token_loss(out, target),
                               torch.clamp(alpha ** 2 / sigma ** 2, max=GAMMA) * x0_error)


@pytest.mark.parametrize("process", [GaussianDiffusion(make_schedule("cosine"), p) for p in ("epsilon", "sample", "v")]
                         + [FlowMatching()], ids=["epsilon", "sample", "v", "flow"])
def test_min_snr_is_finite_at_the_ends(process):
    t = torch.tensor([[0.0, 1.0]])
    weight = min_snr_weight(process, t, GAMMA)
    assert bool(torch.isfinite(weight).all()) and bool((weight >= 0).all())
    if process.prediction == "sample":
        assert float(weight[0, 0]) == GAMMA


def test_denoising_loss_masks_and_weights_tokens():
    pred = torch.randn(3, 4, 2, generator=gen(0), requires_grad=True)
    target = torch.randn(3, 4, 2, generator=gen(1))
    err = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(per_token_loss(pred, target), err)
    torch.testing.assert_close(denoising_loss(pred, target), err.mean())
    mask = torch.tensor([[True, True, False, False], [True, False, False, False], [True, True, True, True]])
    weight = torch.rand(3, 4, generator=gen(2))
    torch.testing.assert_close(denoising_loss(pred, target, mask=mask), err[mask].mean())
    torch.testing.assert_close(denoising_loss(pred, target, mask=mask, weight=weight), (err * weight)[mask].mean())
    empty = denoising_loss(pred, target, mask=torch.zeros(3, 4, dtype=torch.bool))
    assert float(empty.detach()) == 0.0
    empty.backward()
    assert bool((pred.grad == 0).all())


def test_loss_weight_dispatch():
    process = GaussianDiffusion(make_schedule("cosine"), "epsilon")
    t = torch.rand(3, 4, generator=gen(0))
    assert torch.equal(loss_weight(process, t), torch.ones(3, 4))
    torch.testing.assert_close(loss_weight(process, t, "min_snr", gamma=2.0), min_snr_weight(process, t, 2.0))


def test_bad_inputs_raise_clear_errors():
    process = GaussianDiffusion(make_schedule("cosine"), "epsilon")
    pred = torch.zeros(3, 4, 2)
    with pytest.raises(CoreInputError, match="target must have the shape of pred"):
        denoising_loss(pred, torch.zeros(3, 4, 3))
    with pytest.raises(CoreInputError, match=r"mask must have shape \(B, L\) = \(3, 4\)"):
        denoising_loss(pred, pred, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(CoreInputError, match="weight must have shape"):
        denoising_loss(pred, pred, weight=torch.ones(4, 3))
    with pytest.raises(CoreInputError, match=r"\(B, L, D\)"):
        per_token_loss(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(CoreConfigError, match="unknown weighting 'snr'"):
        loss_weight(process, torch.zeros(3, 4), "snr")
    with pytest.raises(CoreInputError, match=r"\(B, L\)"):
        loss_weight(process, torch.zeros(3))
    with pytest.raises(CoreInputError, match=r"\[0, 1\]"):
        loss_weight(process, torch.full((3, 4), 2.0))
    with pytest.raises(CoreConfigError, match="gamma"):
        min_snr_weight(process, torch.zeros(3, 4), gamma=0)

"""Noise schedules: discrete DDPM agreement, closed forms, boundary values, shift, bad input."""

import math

import numpy as np
import pytest
import torch

from diffpolicy.core import CoreConfigError, CoreInputError, make_schedule
from diffpolicy.core.schedules import LOG_SNR_MIN, CosineSchedule, LinearBetaSchedule, SigmoidSchedule

KINDS = ["linear", "cosine", "sigmoid"]


@pytest.mark.parametrize("n", [1000, 100])
def test_linear_beta_matches_discrete_ddpm_alphas_cumprod(n):
    betas = np.linspace(1e-4, 0.02, n)
    alphas_cumprod = np.cumprod(1.0 - betas)
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    alpha, sigma = LinearBetaSchedule(1e-4, 0.02, n).alpha_sigma(t)
    np.testing.assert_allclose(alpha.numpy() ** 2, alphas_cumprod, rtol=1e-6)
    np.testing.assert_allclose(sigma.numpy() ** 2, 1.0 - alphas_cumprod, rtol=0, atol=1e-7)


def test_constant_betas():
    t = torch.arange(0, 51, dtype=torch.float64) / 50
    alpha, _ = LinearBetaSchedule(0.01, 0.01, 50).alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2, 0.99 ** torch.arange(0, 51, dtype=torch.float64))


def test_cosine_matches_discrete_squaredcos_cap_v2():
    n = 100

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    alphas_cumprod = np.cumprod(1.0 - betas)
    t = torch.arange(1, n, dtype=torch.float64) / n  # the last discrete beta is capped at 0.999
    alpha, _ = CosineSchedule().alpha_sigma(t)
    np.testing.assert_allclose(alpha.numpy() ** 2, alphas_cumprod[:-1], rtol=1e-12)


def test_sigmoid_matches_its_formula():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    start, end, tau = -3.0, 3.0, 0.7

    def sig(x):
        return 1 / (1 + np.exp(-x))

    expected = (sig(end / tau) - sig((t.numpy() * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
    alpha, _ = SigmoidSchedule(start, end, tau).alpha_sigma(t)
    np.testing.assert_allclose(alpha.numpy() ** 2, expected, rtol=1e-12)


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_variance_preserving_boundaries_and_monotone(name, shift):
    schedule = make_schedule(name, shift=shift)
    t = torch.linspace(0, 1, 1001)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    assert alpha[0] == 1.0 and sigma[0] == 0.0  # t = 0 is exactly clean
    assert 0 < alpha[-1] < (1e-2 if shift >= 1 else 2e-2)  # tiny but positive
    log_snr = schedule.log_snr(t.double())
    assert log_snr[0] == math.inf and log_snr.min() >= LOG_SNR_MIN
    assert bool((log_snr[1:] <= log_snr[:-1]).all()), "log_snr must decrease with t"
    assert bool((alpha[1:] <= alpha[:-1]).all())
    # x0 from an epsilon prediction at t = 1 stays finite
    assert torch.isfinite((1.0 - sigma[-1] * 3.0) / alpha[-1])


@pytest.mark.parametrize("name", KINDS)
def test_shift_lowers_log_snr_by_two_log_shift(name):
    t = torch.linspace(0.05, 0.9, 18, dtype=torch.float64)
    base, shifted = make_schedule(name), make_schedule(name, shift=2.5)
    torch.testing.assert_close(shifted.log_snr(t), base.log_snr(t) - 2 * math.log(2.5))
    assert bool((shifted.alpha_sigma(t)[0] < base.alpha_sigma(t)[0]).all()), "shift > 1 must be noisier"


@pytest.mark.parametrize("name", KINDS)
def test_any_shape_and_dtype(name):
    schedule = make_schedule(name)
    t = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    alpha, sigma = schedule.alpha_sigma(t)
    assert alpha.shape == t.shape and alpha.dtype == torch.float32
    alpha64, _ = schedule.alpha_sigma(t.double())
    torch.testing.assert_close(alpha, alpha64.float())
    assert schedule.alpha_sigma(0.5)[0].shape == ()


@pytest.mark.parametrize("name", KINDS)
def test_to_config_round_trip(name):
    schedule = make_schedule(name, shift=1.7)
    rebuilt = make_schedule(**schedule.to_config())
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(rebuilt.log_snr(t), schedule.log_snr(t))
    assert repr(rebuilt) == repr(schedule)


def test_bad_inputs_raise_clear_errors():
    schedule = make_schedule("cosine")
    with pytest.raises(CoreInputError, match=r"\[0, 1\].*1.5.*index \(1,\)"):
        schedule.alpha_sigma(torch.tensor([0.5, 1.5]))
    with pytest.raises(CoreInputError, match="index"):
        schedule.log_snr(torch.tensor([[0.2, -0.1]]))
    with pytest.raises(CoreInputError):
        schedule.alpha_sigma(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="floating"):
        schedule.alpha_sigma(torch.tensor([0, 1]))
    with pytest.raises(CoreConfigError, match="unknown schedule 'cosin'.*cosine"):
        make_schedule("cosin")
    with pytest.raises(CoreConfigError, match="make_schedule"):
        make_schedule("linear", beta=0.1)
    with pytest.raises(CoreConfigError, match="shift"):
        make_schedule("sigmoid", shift=0.0)
    with pytest.raises(CoreConfigError, match="beta_start"):
        LinearBetaSchedule(beta_start=0.1, beta_end=0.01)
    with pytest.raises(CoreConfigError, match="num_train_steps"):
        LinearBetaSchedule(num_train_steps=1)
    with pytest.raises(CoreConfigError, match="start < end"):
        SigmoidSchedule(start=3, end=-3)

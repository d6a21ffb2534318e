"""The recorded chain (stacked tensors), per-step noise control and `chain_log_prob`: recorded and
recomputed log-probabilities against torch.distributions, the std floor and the learned std in
sampling and scoring alike, per-step denoisers, bad input."""

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from diffpolicy.core import (
    Chain,
    CoreConfigError,
    CoreInputError,
    FlowMatching,
    GaussianDiffusion,
    StepNoise,
    chain_log_prob,
    make_schedule,
    sample,
)

B, L, D, C, K = 3, 5, 2, 4, 6


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Net(nn.Module):
    """A small conditional denoiser `(x (B, L, D), t (B, L), cond (B, C)) -> (B, L, D)`."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(L * D + L + C, 32), nn.Mish(), nn.Linear(32, L * D))

    def forward(self, x, t, cond):
        return self.net(torch.cat([x.flatten(1), t, cond], 1)).reshape(x.shape)


def learned_std(x, t, s, cond):
    """A std that depends on every input, in [0.05, 0.25]."""
    return 0.05 + 0.2 * torch.sigmoid(x + t.unsqueeze(-1) - s.unsqueeze(-1) + cond[:, :1, None])


CASES = {
    "ddpm-floor": (GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=1.0), StepNoise(std_floor=0.1)),
    "ddim-eta0-floor": (GaussianDiffusion(make_schedule("cosine"), "sample", eta=1.0, clip_x0=1.0),
                        StepNoise(std_floor=0.1, eta=0.0)),
    "flow-learned-std": (FlowMatching(), StepNoise(std_fn=learned_std, std_floor=0.07)),
    "flow-ddim-eta-floor": (FlowMatching(), StepNoise(std_floor=0.02, eta=1.0)),
}


def record(process, noise, denoiser, seed=0, dtype=torch.float32):
    cond = torch.randn(B, C, generator=gen(seed), dtype=dtype)
    x_init = torch.randn(B, L, D, generator=gen(seed + 1), dtype=dtype)
    return cond, sample(denoiser, process, x_init, K, cond=cond, generator=gen(seed + 2), record=True, noise=noise)


@pytest.mark.parametrize("case", list(CASES))
def test_chain_log_prob_equals_torch_distributions_on_a_recorded_chain(case):
    process, noise = CASES[case]
    net = Net().double()  # float64: the batched re-scoring's rounding stays far below the tolerance
    cond, result = record(process, noise, net, dtype=torch.float64)
    chain = result.chain
    assert chain.x.shape == (B, K + 1, L, D) and chain.levels.shape == (B, K + 1, L)
    assert chain.mean.shape == chain.std.shape == (B, K, L, D) and chain.log_prob.shape == (B, K)
    # Every step is a Gaussian with std >= the floor, and the chain holds its draws.
    assert bool((chain.std >= noise.std_floor).all())
    expected = Normal(chain.mean, chain.std).log_prob(chain.x[:, 1:]).sum((2, 3))
    torch.testing.assert_close(chain.log_prob, expected)
    # Recomputed in one batched pass (B K rows instead of B: equal up to the rounding of the
    # network's batched matmuls), and the same as torch.distributions.
    with torch.no_grad():
        scored = chain_log_prob(net, process, chain, cond, noise=noise)
    torch.testing.assert_close(scored, chain.log_prob, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(scored, expected)
    # Only some chunk positions (the executed actions DPPO and flow PPO score): their terms alone.
    executed = chain_log_prob(net, process, chain, cond, noise=noise, tokens=slice(1, 3))
    torch.testing.assert_close(executed, Normal(chain.mean, chain.std).log_prob(chain.x[:, 1:])[:, :, 1:3].sum((2, 3)))
    # A subset of steps, and gradients reach the network.
    part = chain_log_prob(net, process, chain, cond, steps=[K - 2, K - 1], noise=noise)
    torch.testing.assert_close(part.detach(), scored[:, K - 2:], rtol=1e-9, atol=1e-9)
    part.sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())


def exact_velocity(mu0, s0):
    """E[noise - x0 | x_t] on the linear path for 1-D data x0 ~ N(mu0, s0^2): `(x (B, L, D), t (B, L), cond) -> v`."""

    def velocity(x, t, cond):
        a, t = (1 - t).unsqueeze(-1), t.unsqueeze(-1)
        var = a ** 2 * s0 ** 2 + t ** 2
        centred = x - a * mu0
        return t / var * centred - (mu0 + a * s0 ** 2 / var * centred)

    return velocity


def test_flow_ddim_step_is_euler_at_eta_zero_and_keeps_the_models_marginals_at_eta_one():
    """With the exact velocity of N(mu0, s0^2) data, the eta = 1 chain samples that distribution,
    while Euler with a std of the same total size adds its noise to it."""
    process, mu0, s0 = FlowMatching(), 0.3, 0.2
    x, out = torch.randn(B, L, D, generator=gen(0)), torch.randn(B, L, D, generator=gen(1))
    t, s = torch.full((B, L), 0.75), torch.full((B, L), 0.5)
    euler, _ = process.transition(x, t, s, out)
    mean, std = process.transition(x, t, s, out, eta=0.0)
    torch.testing.assert_close(mean, euler)
    assert bool((std == 0).all())
    _, std = process.transition(x, t, s, out, eta=1.0)  # (s/t)^2 (t^2 - ((1-t)/(1-s))^2 s^2), here 2/9
    torch.testing.assert_close(std, torch.full_like(std, (2 / 9) ** 0.5))
    n, steps = 4000, 200  # enough steps for both samplers to converge to the data distribution
    x_init = torch.randn(n, 1, 1, generator=gen(2))
    velocity = exact_velocity(mu0, s0)
    ancestral = sample(velocity, process, x_init, steps, cond=None, generator=gen(3), noise=StepNoise(eta=1.0)).x0
    ode = sample(velocity, process, x_init, steps, cond=None).x0
    assert abs(float(ancestral.mean()) - mu0) < 0.015 and abs(float(ancestral.std()) - s0) < 0.015
    assert abs(float(ode.std()) - s0) < 0.015
    chain = sample(velocity, process, x_init, steps, cond=None, generator=gen(3), noise=StepNoise(eta=1.0),
                   record=True).chain
    euler_noise = StepNoise(std_floor=float(chain.std.pow(2).sum(1).mean().sqrt() / steps ** 0.5))
    blurred = sample(velocity, process, x_init, steps, cond=None, generator=gen(3), noise=euler_noise).x0
    assert float(blurred.std()) > s0 + 0.1  # the same noise, never drawn back


def test_learned_std_is_the_step_std_and_scoring_uses_it():
    process, noise = CASES["flow-learned-std"]
    net = Net()
    cond, result = record(process, noise, net)
    chain = result.chain
    for k in range(K):
        t, s = chain.levels[:, k], chain.levels[:, k + 1]
        torch.testing.assert_close(chain.std[:, k], learned_std(chain.x[:, k], t, s, cond).clamp(min=0.07))
        torch.testing.assert_close(chain.mean[:, k], chain.x[:, k] + (s - t).unsqueeze(-1) * net(chain.x[:, k], t, cond))
    # Scoring with another std changes the log-probability: the std is part of the policy.
    other = chain_log_prob(net, process, chain, cond, noise=StepNoise(std_fn=lambda x, t, s, c: 2 * learned_std(x, t, s, c)))
    assert not torch.allclose(other, chain.log_prob)


def test_default_noise_is_the_process_step_and_floor_zero_keeps_ddim_deterministic():
    process = GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=0.0)
    net = Net()
    _, a = record(process, StepNoise(), net)
    _, b = record(process, StepNoise(std_floor=0.0), net, seed=0)
    assert torch.equal(a.x0, b.x0) and bool((a.chain.log_prob == 0).all())
    _, floored = record(process, StepNoise(std_floor=0.1), net)
    assert not torch.equal(floored.x0, a.x0) and bool((floored.chain.log_prob != 0).all())


def test_per_step_denoisers_run_in_order():
    process = FlowMatching()
    base, tuned = Net(0), Net(1)
    cond = torch.randn(B, C, generator=gen(0))
    x_init = torch.randn(B, L, D, generator=gen(1))
    mixed = sample([base] * (K - 2) + [tuned] * 2, process, x_init, K, cond=cond, record=True)
    plain = sample(base, process, x_init, K, cond=cond, record=True)
    assert torch.equal(mixed.chain.x[:, :K - 1], plain.chain.x[:, :K - 1])  # the first K-2 steps
    assert not torch.equal(mixed.x0, plain.x0)
    with pytest.raises(CoreConfigError, match="sequence of steps = 6 callables, got a sequence of 2"):
        sample([base, tuned], process, x_init, K, cond=cond)


def test_bad_noise_control_and_chains_raise():
    net = Net()
    x = torch.randn(B, L, D)
    diffusion = GaussianDiffusion(make_schedule("cosine"))
    with pytest.raises(CoreConfigError, match="std_floor must be a number >= 0"):
        StepNoise(std_floor=-0.1)
    with pytest.raises(CoreConfigError, match="learned std .* needs a FlowMatching process, got GaussianDiffusion"):
        sample(net, diffusion, x, 3, cond=torch.randn(B, C), noise=StepNoise(std_fn=learned_std))
    with pytest.raises(CoreConfigError, match=r"a learned std \(std_fn\) or an eta, not both"):
        sample(net, FlowMatching(), x, 3, cond=torch.randn(B, C), noise=StepNoise(eta=0.5, std_fn=learned_std))
    with pytest.raises(CoreConfigError, match=r"FlowMatching.step: eta must be a number in \[0, 1\], got 1.5"):
        sample(net, FlowMatching(), x, 3, cond=torch.randn(B, C), generator=gen(0), noise=StepNoise(eta=1.5))
    with pytest.raises(CoreConfigError, match="give a std or an eta, not both"):
        FlowMatching().transition(x, torch.ones(B, L), torch.zeros(B, L), x, std=0.1, eta=0.5)
    cond, result = record(FlowMatching(), StepNoise(), net)
    chain = result.chain
    broken = Chain(chain.x, chain.levels[:, :-1], chain.mean, chain.std, chain.log_prob)
    with pytest.raises(CoreInputError, match=r"chain.levels must have shape \(3, 7, 5\)"):
        chain_log_prob(net, FlowMatching(), broken, cond)
    with pytest.raises(CoreInputError, match=r"steps must be a non-empty list of indices in \[0, 6\)"):
        chain_log_prob(net, FlowMatching(), chain, cond, steps=[6])
    with pytest.raises(CoreInputError, match=r"cond must be a tensor \(B = 3, ...\)"):
        chain_log_prob(net, FlowMatching(), chain, cond[:2])

"""The PPO ratio's safety: equal log-probabilities give exactly 1, extreme but finite differences
give finite ratios, losses and gradients (the log-ratio is clamped), and log-probabilities that
are not finite raise instead of turning the loss into NaN."""

import math

import pytest
import torch
from rl_tasks import make_bc_policy
from torch.distributions import Normal

from diffpolicy.core.samplers import StepNoise
from diffpolicy.rl import flow_ppo
from diffpolicy.rl.errors import NonFiniteLogProbError
from diffpolicy.rl.ppo import MAX_LOG_RATIO, clipped_surrogate, log_ratio, ratio_error


def test_equal_log_probabilities_give_a_ratio_of_exactly_one():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, 5, generator=g) * 1e4  # large magnitudes: exp(old) alone would under/overflow
    advantages = torch.randn(64, 5, generator=g)
    loss, stats = clipped_surrogate(old.clone(), old, advantages, 0.01)
    assert torch.equal(log_ratio(old.clone(), old).exp(), torch.ones_like(old))
    assert loss == -advantages.mean() and stats == {"ratio": 1.0, "clip_fraction": 0.0, "approx_kl": 0.0}
    assert ratio_error(old.clone(), old) == 0.0


def test_extreme_log_ratios_give_finite_ratios_losses_and_gradients():
    old = torch.zeros(4)
    new = torch.tensor([1e4, -1e4, 30.0, 0.5], requires_grad=True)
    assert math.isinf(float((new.detach() - old).exp().max()))  # the unclamped ratio overflows
    advantages = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    loss, stats = clipped_surrogate(new, old, advantages, 0.2)
    loss.backward()
    bound = math.exp(MAX_LOG_RATIO)
    assert math.isfinite(float(loss)) and all(math.isfinite(v) for v in stats.values())
    assert float(loss) == pytest.approx((bound - math.exp(-MAX_LOG_RATIO) + bound - 1.2) / 4, rel=1e-6)
    assert torch.isfinite(new.grad).all()
    assert new.grad[:3].tolist() == [0.0, 0.0, 0.0]  # past the clamp: no gradient
    assert new.grad[3] == 0.0  # inside the range but clipped by PPO (ratio e^0.5 > 1.2 with A > 0)
    assert ratio_error(new, old) == pytest.approx(bound - 1, rel=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_log_probabilities_raise(bad):
    old = torch.zeros(3, 2)
    new = torch.zeros(3, 2)
    new[1, 0] = bad
    with pytest.raises(NonFiniteLogProbError, match=r"PPO ratio: log_prob: 1 of 6 log-probabilities are not finite "
                                                     r".*raise the std floor / std_min"):
        clipped_surrogate(new, old, torch.ones(3, 2), 0.1)
    with pytest.raises(NonFiniteLogProbError, match="PPO ratio: old_log_prob: 1 of 6"):
        clipped_surrogate(old, new, torch.ones(3, 2), 0.1)


def test_a_near_zero_std_floor_gives_finite_ratios_on_a_recorded_chain():
    # DDIM eta = 0 is deterministic: every std is the floor, here 1e-5. A tiny change of the copy's
    # weights then moves each mean by thousands of stds, so the log-ratios are huge.
    policy = make_bc_policy("diffusion")
    policy.start_finetuning(3)
    noise = StepNoise(std_floor=1e-5, eta=0.0)
    obs = {"pos": torch.rand(8, 1, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1}
    with torch.no_grad():
        cond = policy.encode_obs(obs)
        chain = policy.sample_chain(cond, noise, torch.Generator().manual_seed(2)).chain
        old = policy.chain_log_prob(cond, chain, noise)
        for parameter in policy.finetuned_backbone.parameters():
            parameter.add_(1e-3)
    new = policy.chain_log_prob(cond, chain, noise)
    assert float((new - old).abs().max()) > 10 * MAX_LOG_RATIO
    loss, stats = clipped_surrogate(new, old, torch.randn(8, 3, generator=torch.Generator().manual_seed(3)), 0.01)
    loss.backward()
    assert math.isfinite(float(loss)) and math.isfinite(stats["ratio"]) and math.isfinite(stats["approx_kl"])
    assert all(torch.isfinite(p.grad).all() for p in policy.finetuned_backbone.parameters() if p.grad is not None)


def test_flow_ppo_scores_the_chain_per_gaussian_dimension():
    """Flow PPO's ratio reads the chain's log-probability divided by its K' x Tp x Da dimensions
    (the default) or summed; both from the transitions' torch.distributions log-densities."""
    policy = make_bc_policy("flow", inference_steps=4)
    policy.start_finetuning(3)
    noise = StepNoise(std_fn=lambda x, t, s, c: 0.02 + 0.03 * torch.sigmoid(x))
    obs = {"pos": torch.rand(8, 1, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1}
    with torch.no_grad():
        cond = policy.encode_obs(obs)
        chain = policy.sample_chain(cond, noise, torch.Generator().manual_seed(2)).chain
        steps = policy.chain_log_prob(cond, chain, noise)  # (8, 3): the fine-tuned transitions
    densities = Normal(chain.mean[:, 1:], chain.std[:, 1:]).log_prob(chain.x[:, 2:]).sum((1, 2, 3))
    per_step = policy.config.pred_horizon * policy.config.action_dim
    assert per_step == 8 and flow_ppo.FlowPPOConfig().log_prob_per_dim
    torch.testing.assert_close(flow_ppo.ratio_log_prob(steps, per_step, per_dim=True), densities / (3 * per_step),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow_ppo.ratio_log_prob(steps, per_step, per_dim=False), densities, rtol=1e-5, atol=1e-4)
    assert torch.equal(flow_ppo.ratio_log_prob(steps, per_step, per_dim=False), steps.sum(1))

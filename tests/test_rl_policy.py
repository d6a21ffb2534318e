"""What the policy offers RL: fine-tuning the last K' steps through a trainable copy (base frozen),
sampling and scoring the recorded chain with the same noise control, checkpoints of fine-tuned
policies, bad input."""

import pytest
import torch
from policy_helpers import DA, TP, B, make_obs, make_policy
from torch.distributions import Normal

from diffpolicy.core import StepNoise
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.errors import ConfigError


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_finetuning_copy_runs_only_the_last_steps_and_the_base_is_frozen(kind):
    policy = make_policy(kind).eval()
    obs = make_obs()
    before = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    params = policy.start_finetuning(3)
    assert policy.config.finetune_steps == 3 and policy.finetuned_step_indices == [5, 6, 7]
    assert all(p.requires_grad for p in params) and {id(p) for p in params} == {id(p) for p in policy.finetuned_backbone.parameters()}
    assert not any(p.requires_grad for p in policy.backbone.parameters())
    assert not any(p.requires_grad for p in policy.obs_encoder.parameters())
    # The copy starts equal to the base: the same samples bit for bit.
    assert torch.equal(policy.sample(obs, generator=torch.Generator().manual_seed(0)), before)
    # Changing the copy changes only the last K' = 3 of the 8 steps.
    with torch.no_grad():
        for p in policy.finetuned_backbone.parameters():
            p.add_(0.05)
    cond = policy.encode_obs(obs)
    noise = StepNoise(std_floor=0.1) if kind == "diffusion" else StepNoise(std_floor=0.05)
    base_chain = make_policy(kind).eval().sample_chain(cond, noise, torch.Generator().manual_seed(1)).chain
    tuned_chain = policy.sample_chain(cond, noise, torch.Generator().manual_seed(1)).chain
    assert tuned_chain.x.shape == (B, 9, TP, DA)
    assert torch.equal(tuned_chain.x[:, :6], base_chain.x[:, :6])
    assert not torch.equal(tuned_chain.x[:, 6:], base_chain.x[:, 6:])


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_chain_log_prob_rescores_the_recorded_chain_with_the_same_noise(kind):
    policy = make_policy(kind).eval()
    policy.start_finetuning(3)
    cond = policy.encode_obs(make_obs())
    noise = (StepNoise(std_floor=0.1, eta=1.0) if kind == "diffusion"
             else StepNoise(std_fn=lambda x, t, s, c: 0.05 + 0.1 * torch.sigmoid(x), std_floor=0.06))
    chain = policy.sample_chain(cond, noise, torch.Generator().manual_seed(2)).chain
    expected = Normal(chain.mean, chain.std).log_prob(chain.x[:, 1:]).sum((2, 3))
    tuned = policy.chain_log_prob(cond, chain, noise)  # default: the fine-tuned steps
    every = policy.chain_log_prob(cond, chain, noise, steps=list(range(8)))
    assert tuned.shape == (B, 3) and every.shape == (B, 8)
    torch.testing.assert_close(tuned, expected[:, 5:], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(every, chain.log_prob, rtol=1e-5, atol=1e-4)
    tuned.sum().backward()  # gradients reach the copy, not the frozen base
    assert all(p.grad is not None for p in policy.finetuned_backbone.parameters())
    assert all(p.grad is None for p in policy.backbone.parameters())


def test_a_finetuned_policy_saves_and_loads_with_its_copy(tmp_path):
    policy = make_policy("diffusion").eval()
    policy.start_finetuning(2)
    with torch.no_grad():
        for p in policy.finetuned_backbone.parameters():
            p.mul_(1.1)
    policy.save_pretrained(tmp_path / "p")
    loaded = ChunkPolicy.from_pretrained(tmp_path / "p")
    assert loaded.config.finetune_steps == 2
    obs = make_obs()
    assert torch.equal(loaded.sample(obs, generator=torch.Generator().manual_seed(3)),
                       policy.sample(obs, generator=torch.Generator().manual_seed(3)))


def test_bad_finetuning_requests_raise():
    policy = make_policy("diffusion")
    with pytest.raises(ConfigError, match=r"finetune_steps: expected an integer in \[1, inference_steps = 8\], got 9"):
        policy.start_finetuning(9)
    policy.start_finetuning(2)
    with pytest.raises(ConfigError, match="already fine-tunes its last 2 steps"):
        policy.start_finetuning(2)
    with pytest.raises(ConfigError, match="samples with exactly that many, got 4"):
        policy.sample(make_obs(), steps=4)
    with pytest.raises(ConfigError, match="config key 'finetune_steps': expected at most inference_steps = 8"):
        type(policy.config)(**{**policy.config.__dict__, "finetune_steps": 9})

"""`loss.token_times`: parsing, the levels each kind draws, the loss leaving clean tokens out,
learning with a mix, and old configs (without the key) loading as "shared"."""

import pytest
import torch
from policy_helpers import TP, B, make_batch, make_policy

from diffpolicy.core.losses import denoising_loss
from diffpolicy.policies import ConfigError, LossConfig, PolicyConfig
from diffpolicy.policies.config import token_time_mix
from diffpolicy.policies.token_times import draw_token_times, ladder_levels


def test_mix_parsing_and_errors():
    assert token_time_mix("shared") == {"shared": 1.0}
    assert token_time_mix("ladder:0.8, shared:0.2") == pytest.approx({"ladder": 0.8, "shared": 0.2})
    assert token_time_mix("prefix:3,shared") == pytest.approx({"prefix": 0.75, "shared": 0.25})
    for bad, part in [("", "a kind of"), ("stairs", "unknown kind 'stairs'"), ("shared:0", "> 0"),
                      ("ladder:x", "weight 'x'"), ("shared,shared", "given twice"), (3, "a kind of")]:
        with pytest.raises(ConfigError, match=part):
            LossConfig(token_times=bad)


def test_configs_without_token_times_load_as_shared():
    data = make_policy().config.to_dict()
    del data["loss"]["token_times"]
    assert PolicyConfig.from_dict(data).loss.token_times == "shared"


def test_shared_default_draws_exactly_what_it_always_drew():
    """The default path takes t (B,) by one torch.rand, then the noise: the documented order. (The
    loss is reduced by the policy's own `denoising_loss`: a mean over all elements at once may round
    differently from its mean of per-token means.)"""
    policy = make_policy("flow")
    batch = make_batch()
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.rand(B, generator=g)[:, None].expand(B, TP)
    noise = torch.randn(B, TP, 2, generator=g)
    x0 = policy.normalize_action(batch["action"])
    out = policy.backbone(policy.process.corrupt(x0, t, noise), t, policy.encode_obs(batch["obs"]))
    assert torch.equal(loss, denoising_loss(out, policy.process.target(x0, noise, t)))


def _draw(weights, batch=512, horizon=16, group=8, grid=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return draw_token_times(weights, batch, horizon, group, grid, lambda shape: torch.rand(shape, generator=g))


def test_prefix_kind_clean_prefix_then_one_level():
    t, clean = _draw({"prefix": 1.0})
    lengths = clean.sum(1)
    assert set(lengths.tolist()) == set(range(0, 9))  # P uniform in 0..Tp // 2
    for row, p in zip(t, lengths):
        assert torch.all(row[:p] == 0) and torch.all(row[p:] == row[-1]) and 0 < row[-1] <= 1
    assert torch.equal(clean, t == 0)


def test_ladder_kind_rises_by_rungs_as_the_streaming_buffer():
    t, clean = _draw({"ladder": 1.0}, grid=100)
    for row, p in zip(t, clean.sum(1).tolist()):
        rungs = -(-(16 - p) // 8)
        levels = row[p:]
        assert torch.all(levels > 0) and torch.all(levels <= 1)
        for g in range(rungs):  # rung g lies in (g / G, (g + 1) / G], on the grid
            rung = levels[8 * g: 8 * (g + 1)]
            assert torch.all(rung == rung[0]) and g / rungs < rung[0] <= (g + 1) / rungs + 1e-6
            assert torch.allclose(rung * 100, torch.round(rung * 100), atol=1e-4)
    # the buffer's levels before an inference are the ladder's tops
    before, rungs = ladder_levels(16, 3, 8)
    assert rungs == 2 and before[:3].tolist() == [0, 0, 0] and before[3:11].unique().tolist() == [0.5]


def test_mix_frequencies():
    t, clean = _draw({"shared": 0.5, "prefix": 0.5}, batch=4000)
    shared = (t == t[:, -1:]).all(1) & ~clean.any(1)
    assert 0.45 < shared.float().mean() < 0.62  # shared rows, plus prefix rows that drew P = 0


def test_loss_leaves_clean_tokens_out():
    policy = make_policy("diffusion", loss=LossConfig(token_times="prefix"))
    batch = make_batch()
    g = torch.Generator().manual_seed(0)
    loss = policy.compute_loss(batch, g)
    # changing the target actions on the clean prefix only changes the input there, not the loss terms
    assert torch.isfinite(loss)
    g2 = torch.Generator().manual_seed(0)
    t, clean = draw_token_times({"prefix": 1.0}, B, TP, policy.config.action_horizon, 20,
                                lambda shape: torch.rand(shape, generator=g2))
    noise = torch.randn(B, TP, 2, generator=g2)
    x0 = policy.normalize_action(batch["action"])
    out = policy.backbone(policy.process.corrupt(x0, t, noise), t, policy.encode_obs(batch["obs"]))
    err = (out - policy.process.target(x0, noise, t)).pow(2).mean(-1)
    keep = (~clean).float()
    assert torch.allclose(loss, (err * keep).sum() / keep.sum())


def test_a_mix_trained_policy_learns():
    """A small seeded run with the streaming mix lowers the loss (the per-token levels are learnable)."""
    policy = make_policy("diffusion", loss=LossConfig(token_times="ladder:0.5,prefix:0.3,shared:0.2"))
    batch = make_batch()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = [float(policy.compute_loss(batch, torch.Generator().manual_seed(s))) for s in range(8)]
    for _ in range(150):
        opt.zero_grad()
        policy.compute_loss(batch, g).backward()
        opt.step()
    with torch.no_grad():
        last = [float(policy.compute_loss(batch, torch.Generator().manual_seed(s))) for s in range(8)]
    assert sum(last) < 0.5 * sum(first)

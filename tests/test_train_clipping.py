"""`clip_gradients` leaves exactly the gradients torch's `clip_grad_norm_` leaves, above and below the limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffpolicy.train.clipping import clip_gradients


def _net_with_grads(scale: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 16), nn.SiLU(), nn.Linear(16, 3))
    net(torch.randn(32, 7)).pow(2).mean().mul(scale).backward()
    return net


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e4])
def test_clip_gradients_matches_torch_bit_for_bit(scale: float, max_norm: float) -> None:
    ours, theirs = _net_with_grads(scale), _net_with_grads(scale)
    norm = clip_gradients(ours.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert torch.equal(norm, expected)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_gradients_below_the_limit_are_not_touched_and_above_it_are_scaled_to_it() -> None:
    net = _net_with_grads(1e-4)
    before = [p.grad.clone() for p in net.parameters()]
    norm = clip_gradients(net.parameters(), 1.0)
    assert float(norm) < 1.0
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))

    net = _net_with_grads(1e3)
    norm = clip_gradients(net.parameters(), 1.0)
    assert float(norm) > 1.0
    after = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
    assert float(after) == pytest.approx(1.0, rel=1e-5)


def test_parameters_without_gradients_are_skipped() -> None:
    net = _net_with_grads(1.0)
    frozen = nn.Parameter(torch.ones(3))
    norm = clip_gradients([*net.parameters(), frozen], 1e4)
    assert frozen.grad is None and float(norm) > 0
    assert float(clip_gradients([frozen], 1.0)) == 0.0

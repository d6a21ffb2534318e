"""GAE over environment steps: a truncated episode is bootstrapped from V of its final state, a
terminated one is not; neither lets advantages leak across the episode boundary."""

import pytest
import torch

from diffpolicy.rl.gae import gae

G, LAM = 0.9, 0.8


def test_truncated_is_bootstrapped_and_terminated_is_not():
    # One environment, three steps; the episode ends at step 1 (then a new one starts at step 2).
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [0.25], [4.0]])
    next_values = torch.tensor([[0.25], [10.0], [6.0]])  # step 1's next state: the final observation
    ended = torch.tensor([[False], [True], [False]])
    none = torch.zeros_like(ended)
    adv_term, ret_term = gae(rewards, values, next_values, ended, none, G, LAM)
    adv_trunc, ret_trunc = gae(rewards, values, next_values, none, ended, G, LAM)
    # Step 2 is the last of the rollout: bootstrapped from V(next) in both cases.
    last = 3.0 + G * 6.0 - 4.0
    assert adv_term[2, 0] == pytest.approx(last) and adv_trunc[2, 0] == pytest.approx(last)
    # Step 1 ends the episode: terminated -> r - V; truncated -> r + gamma V(final) - V. No leak from step 2.
    assert adv_term[1, 0] == pytest.approx(2.0 - 0.25)
    assert adv_trunc[1, 0] == pytest.approx(2.0 + G * 10.0 - 0.25)
    # Step 0 continues into step 1.
    delta0 = 1.0 + G * 0.25 - 0.5
    assert adv_term[0, 0] == pytest.approx(delta0 + G * LAM * (2.0 - 0.25))
    assert adv_trunc[0, 0] == pytest.approx(delta0 + G * LAM * (2.0 + G * 10.0 - 0.25))
    torch.testing.assert_close(ret_term, adv_term + values)
    torch.testing.assert_close(ret_trunc, adv_trunc + values)


def test_environments_are_independent_and_shapes_are_checked():
    g = torch.Generator().manual_seed(0)
    rewards, values, next_values = (torch.randn(5, 3, generator=g) for _ in range(3))
    terminated = torch.rand(5, 3, generator=g) < 0.3
    truncated = (torch.rand(5, 3, generator=g) < 0.3) & ~terminated
    adv, _ = gae(rewards, values, next_values, terminated, truncated, G, LAM)
    for n in range(3):
        single, _ = gae(rewards[:, n:n + 1], values[:, n:n + 1], next_values[:, n:n + 1], terminated[:, n:n + 1],
                        truncated[:, n:n + 1], G, LAM)
        torch.testing.assert_close(adv[:, n:n + 1], single)
    with pytest.raises(ValueError, match=r"next_values must have the shape of rewards \(5, 3\), got \(5, 2\)"):
        gae(rewards, values, next_values[:, :2], terminated, truncated, G, LAM)

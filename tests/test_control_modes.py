"""The six controller modes on tiny policies: exact properties (bit-exact prefix, streaming emits
only clean actions, warm start at level 1 is cold sampling, rtc reproduces a consistent previous
chunk), chunk alignment, and bad inputs."""

import math

import pytest
import torch
from policy_helpers import DA, make_normalizer, make_obs
from torch import nn

from diffpolicy.control.chunking import ChunkLayout, align_previous
from diffpolicy.control.errors import ControlError
from diffpolicy.control.modes import MODES, Previous, StreamingMode, WarmStartMode, make_mode
from diffpolicy.policies import ChunkPolicy, PolicyConfig, diffusion_process, flow_process

TP, TA = 12, 4
PROCESSES = {"ddpm": dict(kind="diffusion", eta=1.0), "ddim": dict(kind="diffusion", eta=0.0), "flow": dict(kind="flow")}


def tiny_policy(process="ddpm", seed=0):
    spec = PROCESSES[process]
    proc = (diffusion_process(train_steps=20, eta=spec["eta"], prediction="sample") if spec["kind"] == "diffusion"
            else flow_process())
    config = PolicyConfig(obs_shapes={"state": (3,)}, action_dim=DA, obs_horizon=2, pred_horizon=TP,
                          action_horizon=TA, process=proc, backbone={"type": "mlp", "hidden_dim": 32},
                          inference_steps=6)
    torch.manual_seed(seed)
    return ChunkPolicy(config, make_normalizer()).eval()


def generate(mode, policy, previous=None, delay=1, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, TP, DA, generator=g)
    with torch.no_grad():
        return mode.generate(policy, ChunkLayout.of(policy), make_obs(batch), noise, delay, previous, g)


def test_layout_slices_and_alignment():
    layout = ChunkLayout(2, 16, 8)
    assert layout.executed(0) == slice(1, 9) and layout.executed(3) == slice(4, 12)
    assert layout.committed(3) == slice(0, 4)
    with pytest.raises(ControlError, match=r"delay 8 is larger than the chunk allows.*d <= 7"):
        layout.executed(8)
    for bad in (-1, 1.5, True):
        with pytest.raises(ControlError):
            layout.check(bad)
    previous = torch.arange(16.0).reshape(1, 16, 1)
    aligned, valid = align_previous(previous, 5)
    assert aligned[0, :, 0].tolist() == list(range(5, 16)) + [15] * 5
    assert valid.tolist() == [True] * 11 + [False] * 5
    with pytest.raises(ControlError, match="ended"):
        align_previous(previous, 16)


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("name", MODES)
def test_every_mode_runs_a_sequence_of_chunks(name, process):
    policy, mode = tiny_policy(process), make_mode(name)
    out = generate(mode, policy)
    assert out.actions.shape == (2, TP, DA) and torch.isfinite(out.actions).all()
    for step in range(3):
        previous = None if out.state is None else Previous(out.state, out.levels, TA)
        out = generate(mode, policy, previous, seed=step + 1)
        assert torch.isfinite(out.actions).all() and out.nfe >= 1
        executed = ChunkLayout.of(policy).executed(1)
        if out.levels is not None:
            assert torch.all(out.levels[:, executed] == 0)


@pytest.mark.parametrize("process", PROCESSES)
def test_prefix_keeps_the_committed_actions_bit_exactly(process):
    policy = tiny_policy(process)
    first = generate(make_mode("prefix"), policy)
    for delay in (0, 2, 3):
        out = generate(make_mode("prefix"), policy, Previous(first.state, first.levels, TA), delay=delay, seed=5)
        aligned, _ = align_previous(first.state, TA)
        committed = ChunkLayout.of(policy).committed(delay)
        assert torch.equal(out.state[:, committed], aligned[:, committed])
        assert not torch.equal(out.state[:, committed.stop:], aligned[:, committed.stop:])


@pytest.mark.parametrize("process", PROCESSES)
def test_streaming_emits_only_clean_actions_and_shifts_its_ladder(process):
    policy, mode = tiny_policy(process), StreamingMode()
    layout = ChunkLayout.of(policy)
    out = generate(mode, policy, delay=2)
    before, after = mode.targets(layout, 2, torch.float32, "cpu")
    assert torch.equal(out.levels[0], after)  # the first buffer lands on the ladder
    for step in range(4):
        previous = Previous(out.state, out.levels, TA)
        shifted_levels, valid = align_previous(out.levels.unsqueeze(-1), TA)
        shifted_levels = shifted_levels.squeeze(-1)
        # after the shift every kept token sits at the ladder's level before an inference; fresh
        # noise enters at 1 (in a partial top rung that is above its rung, and it moves further)
        assert torch.allclose(shifted_levels[0][valid], before[valid]) and torch.all(before[~valid] <= 1)
        out = generate(mode, policy, previous, delay=2, seed=step + 1)
        executed = layout.executed(2)
        assert torch.all(out.levels[:, executed] == 0) and torch.all(out.levels[:, executed.stop:] > 0)
        assert torch.equal(out.levels[0], after)
        assert torch.equal(out.levels[0], after)
        assert out.nfe == mode.calls_per_inference(policy, layout, 2, None) == math.ceil(6 / 3)  # 3 rungs of 4 over Tp - 3 = 9 tokens
    # the head that was already clean (the committed actions) comes back bit-exactly
    aligned, _ = align_previous(previous.state, TA)
    assert torch.equal(out.state[:, :layout.committed(2).stop], aligned[:, :layout.committed(2).stop])


@pytest.mark.parametrize("process", PROCESSES)
def test_warmstart_at_level_one_equals_cold_sampling(process):
    policy = tiny_policy(process)
    first = generate(make_mode("sync"), policy)
    previous = Previous(policy.normalize_action(first.actions), torch.zeros(2, TP), TA)
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(2, TP, DA, generator=g)
    obs = make_obs(2)
    with torch.no_grad():
        warm = WarmStartMode(level=1.0).generate(policy, ChunkLayout.of(policy), obs, noise, 1, previous,
                                                 torch.Generator().manual_seed(1))
        cold = policy.sample(obs, x_init=noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(warm.actions, cold) and warm.nfe == 6


def test_warmstart_runs_the_remaining_steps_and_binarises_grippers():
    policy = tiny_policy("ddim")
    previous = Previous(torch.full((2, TP, DA), 0.3), torch.zeros(2, TP), TA)
    mode = WarmStartMode(level=0.5, binary_dims=(1,))
    out = generate(mode, policy, previous)
    assert out.nfe == 3
    seen = {}
    original = policy.process.corrupt
    policy.process.corrupt = lambda x0, t, noise: seen.setdefault("guess", x0) * 0 + original(x0, t, noise)
    generate(mode, policy, previous)
    policy.process.corrupt = original
    assert torch.all(seen["guess"][..., 1] == 1.0) and torch.allclose(seen["guess"][..., 0], torch.tensor(0.3))


class GaussianOracle(nn.Module):
    """The exact x0 denoiser of data N(0, v I) under flow matching: x0_hat = c(t) x_t, as a velocity."""

    def __init__(self, variance=4.0):
        super().__init__()
        self.variance = variance

    def forward(self, x, t, cond):
        tt = t.unsqueeze(-1)
        gain = (1 - tt) * self.variance / ((1 - tt) ** 2 * self.variance + tt ** 2)
        return (x - gain * x) / tt.clamp(min=1e-6)  # v = (x_t - x0_hat) / t


def test_rtc_reproduces_a_consistent_previous_chunk_on_the_guided_part():
    policy = tiny_policy("flow")
    policy.backbone = GaussianOracle()
    policy.set_sampling(inference_steps=30)
    layout = ChunkLayout.of(policy)
    first = generate(make_mode("sync"), policy, seed=3)  # a chunk of the model: consistent by construction
    state = policy.normalize_action(first.actions)
    previous = Previous(state, torch.zeros(2, TP), TA)
    target, _ = align_previous(state, TA)
    delay = 2
    guided = generate(make_mode("rtc", max_weight=50.0), policy, previous, delay=delay, seed=11)
    cold = generate(make_mode("sync"), policy, seed=11)
    committed = layout.committed(delay)
    error = (policy.normalize_action(guided.actions)[:, committed] - target[:, committed]).abs().max()
    unguided = (policy.normalize_action(cold.actions)[:, committed] - target[:, committed]).abs().max()
    assert error < 0.05 < 0.5 < unguided


def test_ensemble_averages_with_act_weights():
    import numpy as np

    from diffpolicy.control.queue import ActionQueue

    queue = ActionQueue()
    queue.commit(np.array([[0.0], [0.0]]), 0, chunk_id=0, first_index=0, ensemble_decay=0.5)
    queue.commit(np.array([[1.0], [1.0]]), 1, chunk_id=1, first_index=0, ensemble_decay=0.5)
    queue.commit(np.array([[3.0]]), 1, chunk_id=2, first_index=0, ensemble_decay=0.5)
    assert queue.pop(0).action[0] == 0.0
    w = [1.0, math.exp(-0.5), math.exp(-1.0)]
    assert queue.pop(1).action[0] == pytest.approx((0 * w[0] + 1 * w[1] + 3 * w[2]) / sum(w))


def test_bad_mode_names_and_options():
    with pytest.raises(ControlError, match=r"unknown controller mode 'fast'; expected one of \['sync'"):
        make_mode("fast")
    with pytest.raises(ControlError, match="level must be in"):
        make_mode("warmstart", level=0.0)
    with pytest.raises(ControlError, match="calls must be"):
        make_mode("streaming", calls=0)
    with pytest.raises(ControlError, match="'rtc': .*unexpected keyword"):
        make_mode("rtc", level=0.5)
    policy = tiny_policy()
    with pytest.raises(ControlError, match="larger than the chunk"):
        generate(make_mode("prefix"), policy, delay=TP)
    with pytest.raises(ControlError, match="previous chunk has shape"):
        generate(make_mode("rtc"), policy, Previous(torch.zeros(2, TP - 1, DA), torch.zeros(2, TP - 1), TA))

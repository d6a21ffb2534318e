"""The sampling loop validates its inputs once per call: the steps run without value checks (no
host-device synchronisation) and give bit-identical samples to a loop that checks every step."""

import contextlib

import pytest
import torch

from diffpolicy.core import (
    ClassifierFreeGuidance,
    ComposedGuidance,
    CoreInputError,
    FlowMatching,
    GaussianDiffusion,
    GuidedInpainting,
    PrefixInpainting,
    make_schedule,
    rtc_prefix_weights,
    sample,
    samplers,
)
from diffpolicy.core.checking import must_check_values, values_checked

B, L, D = 3, 6, 2

PROCESSES = {
    "ddpm-eps": GaussianDiffusion(make_schedule("cosine"), "epsilon", eta=1.0),
    "ddim-sample-clip": GaussianDiffusion(make_schedule("linear", num_train_steps=100), "sample", eta=0.0,
                                          clip_x0=1.0),
    "ddim-v-eta0.5": GaussianDiffusion(make_schedule("sigmoid"), "v", eta=0.5),
    "flow": FlowMatching(),
    "flow-std": FlowMatching(std=0.1),
}


def denoiser(x, t, cond):
    """A smooth nonlinear stand-in network: depends on x, t and cond, so guidance's VJP is nontrivial."""
    return torch.tanh(x * (1.5 - t.unsqueeze(-1)) + cond.unsqueeze(1)) * 0.8


def guidances():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(B, L, D, generator=g)
    return {
        "none": None,
        "cfg": ClassifierFreeGuidance(2.0, torch.zeros(D)),
        "prefix": PrefixInpainting(torch.randn(B, 2, D, generator=g)),
        "rtc": GuidedInpainting(target, rtc_prefix_weights(L, 2, 1)),
        "composed": ComposedGuidance([ClassifierFreeGuidance(1.5, torch.zeros(D)),
                                      GuidedInpainting(target, rtc_prefix_weights(L, 1, 2))]),
    }


def run(process, guidance):
    g = torch.Generator().manual_seed(0)
    x_init = torch.randn(B, L, D, generator=g)
    cond = torch.randn(B, D, generator=g)
    t_start = torch.rand(B, L, generator=g) * 0.5 + 0.5  # per-token start levels
    return sample(denoiser, process, x_init, 7, cond=cond, t_start=t_start, guidance=guidance,
                  generator=torch.Generator().manual_seed(1), record=True)


@pytest.mark.parametrize("guidance_name", list(guidances()))
@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_bit_identical_to_a_loop_that_checks_every_step(process_name, guidance_name, monkeypatch):
    process = PROCESSES[process_name]
    lean = run(process, guidances()[guidance_name])
    monkeypatch.setattr(samplers, "values_checked", contextlib.nullcontext)
    checked = run(process, guidances()[guidance_name])
    assert torch.equal(lean.x0, checked.x0)
    assert lean.chain.steps == checked.chain.steps == 7
    for name in ("x", "levels", "mean", "std", "log_prob"):
        assert torch.equal(getattr(lean.chain, name), getattr(checked.chain, name)), name


def test_steps_run_without_value_checks_and_inputs_are_still_checked():
    seen = []

    def watching(x, t, cond):
        seen.append(must_check_values())
        return torch.zeros_like(x)

    x_init = torch.randn(1, L, D)
    sample(watching, FlowMatching(), x_init, 4)
    assert seen == [False] * 4
    assert must_check_values()  # restored after the call
    with pytest.raises(CoreInputError, match="t_start"):
        sample(watching, FlowMatching(), x_init, 4, t_start=1.5)
    with pytest.raises(CoreInputError, match=r"after PrefixInpainting.prepare|prefix"):
        sample(watching, FlowMatching(), x_init, 4, guidance=PrefixInpainting(torch.randn(2, 1, D)))


def test_value_checks_are_skipped_only_inside_the_scope():
    process = FlowMatching()
    x = torch.zeros(1, L, D)
    t, s = torch.full((1, L), 0.2), torch.full((1, L), 0.5)  # s > t: not a reverse step
    with pytest.raises(CoreInputError, match="s <= t"):
        process.step(x, t, s, x)
    with values_checked():
        assert not must_check_values()
        process.step(x, t, s, x)  # trusted: the caller vouched for its levels
    assert must_check_values()

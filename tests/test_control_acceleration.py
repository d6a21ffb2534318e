"""The GPU path's flags on CPU: bf16 autocast stays close to float32, torch.compile matches eager
(slow: compiling takes a while on CPU), CUDA graphs are refused without a CUDA device."""

import pytest
import torch
from policy_helpers import make_obs, make_policy

from diffpolicy.control.acceleration import accelerate
from diffpolicy.control.errors import ControlError


def _sample(policy):
    return policy.sample(make_obs(2), x_init=torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(0)),
                         generator=torch.Generator().manual_seed(1))


def test_bf16_autocast_is_close_and_keeps_the_original():
    policy = make_policy("flow").eval()
    fast = accelerate(policy, bf16=True)
    assert fast is not policy and type(policy.backbone).__name__ != "AcceleratedDenoiser"
    exact, approx = _sample(policy), _sample(fast)
    assert approx.dtype == exact.dtype and not torch.equal(exact, approx)
    assert torch.allclose(exact, approx, atol=2.0)  # data units in [100, 200]: bf16 keeps ~3 digits
    assert accelerate(policy) is policy


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(ControlError, match="CUDA graphs need the policy on a CUDA device; it is on cpu"):
        accelerate(make_policy(), cuda_graphs=True)


@pytest.mark.slow
def test_compiled_denoiser_matches_eager_on_cpu():
    policy = make_policy("flow").eval()
    compiled = accelerate(policy, compile=True)
    assert torch.allclose(_sample(policy), _sample(compiled), atol=1e-4)

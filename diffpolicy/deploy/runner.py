"""The policy side of the server: a decoded sample request -> one call of the local policy.

The request's arrays become tensors (floating arrays in the policy's parameter dtype), guidance
specs become core guidances, and the policy validates the rest (keys, shapes, dtypes) exactly as
it does for a local caller, so a remote caller gets the same error text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffpolicy.core.guidance import GuidedInpainting, PrefixInpainting
from diffpolicy.deploy.errors import WireError
from diffpolicy.deploy.wire import encode_array


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def metadata_of(policy: Any) -> dict[str, Any]:
    """What a `RemotePolicy` needs to act like the local policy: its config, its action normalizer's
    stats (normalize / unnormalize run locally) and the checkpoint's metadata."""
    stats = policy.normalizer.ranges["action"]
    return {"policy_config": policy.config.to_dict(), "metadata": dict(policy.metadata),
            "action_min": encode_array(stats.min.detach().cpu().numpy()),
            "action_max": encode_array(stats.max.detach().cpu().numpy())}


def run_sample(policy: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Run one decoded sample request (`wire.decode_sample`) -> the reply body {"chunk", "rng_state"}.

    With "rng_state" the call runs on a generator in that state (the client's), and the reply
    carries its state afterwards, so the client's generator advances exactly as with a local call."""
    dtype = next(policy.parameters()).dtype
    obs = {key: _tensor(value, dtype) for key, value in request["obs"].items()}
    x_init = None if request["x_init"] is None else _tensor(request["x_init"], dtype)
    t_start = request["t_start"]
    if isinstance(t_start, np.ndarray):
        t_start = _tensor(t_start, dtype)
    guidance = _guidance(request["guidance"], dtype)
    generator = None
    if request["rng_state"] is not None:
        generator = torch.Generator()
        try:
            generator.set_state(torch.from_numpy(request["rng_state"]))
        except RuntimeError as err:
            raise WireError(f"sample.rng_state: not a CPU torch.Generator state: {err}") from None
    with torch.no_grad():
        if request["normalized"]:
            cond = policy.encode_obs(obs, generator)
            chunk = policy.sample_normalized(cond, request["steps"], x_init, t_start, guidance, generator).x0
        else:
            chunk = policy.sample(obs, request["steps"], x_init, t_start, guidance, generator)
    state = None if generator is None else encode_array(generator.get_state().numpy())
    return {"chunk": encode_array(chunk.detach().cpu().numpy()), "rng_state": state}


def _guidance(spec: dict[str, Any] | None, dtype: torch.dtype):
    if spec is None:
        return None
    if spec["kind"] == "prefix":
        return PrefixInpainting(_tensor(spec["prefix"], dtype))
    return GuidedInpainting(_tensor(spec["target"], dtype), _tensor(spec["weights"], dtype), spec["max_weight"])

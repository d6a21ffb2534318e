"""Checks of the observation dicts and training batches a `ChunkPolicy` receives.

Every check raises `ObservationError` (or `ObservationDtypeError`) naming the key, what was
expected and what came; non-finite values are reported with the index of the first one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from diffpolicy.policies.config import PolicyConfig
from diffpolicy.policies.errors import ObservationDtypeError, ObservationError

BATCH_KEYS = ("obs", "action", "action_is_pad")


NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _first_non_finite(x: torch.Tensor) -> tuple[int, ...] | None:
    if x.device.type == "cpu" and x.dtype in NUMPY_FLOATS and x.layout == torch.strided and not x.is_neg():
        # numpy's check of a plain CPU tensor: a few us, where torch's two ops cost tens per call
        if np.isfinite(x.detach().numpy()).all():
            return None
    elif bool(torch.isfinite(x).all()):
        return None
    return tuple(int(i) for i in (~torch.isfinite(x)).nonzero()[0])


def check_observations(obs: Any, config: PolicyConfig, batch_size: int | None = None) -> int:
    """Validate `obs = {key: (B, To, *shape)}` against the config; returns B.

    Low-dim keys must be floating point and finite, image keys uint8. The key set must equal
    `config.obs_shapes` exactly. `batch_size`, if given, is the B every key must have.
    """
    if not isinstance(obs, Mapping):
        raise ObservationError(f"observations must be a dict {{key: tensor}}, got {type(obs).__name__}")
    expected_keys = set(config.obs_shapes)
    missing, extra = sorted(expected_keys - set(obs)), sorted(set(obs) - expected_keys)
    if missing or extra:
        raise ObservationError(
            f"observation keys do not match the policy: missing {missing}, unexpected {extra}; "
            f"expected exactly {sorted(expected_keys)}"
        )
    for key in config.obs_shapes:
        value = obs[key]
        if not isinstance(value, torch.Tensor):
            raise ObservationDtypeError(f"obs[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")
        is_image = key in config.image_keys
        if is_image and value.dtype != torch.uint8:
            raise ObservationDtypeError(
                f"obs[{key!r}]: image observations must be uint8 in [0, 255], got {value.dtype}")
        if not is_image and not value.is_floating_point():
            raise ObservationDtypeError(f"obs[{key!r}]: low-dim observations must be floating point, got {value.dtype}")
        shape = tuple(value.shape)
        b = shape[0] if shape else None
        expected = (batch_size if batch_size is not None else b, config.obs_horizon, *config.obs_shapes[key])
        if shape != expected:
            named = ("B" if batch_size is None else f"B={batch_size}", f"To={config.obs_horizon}",
                     *map(str, config.obs_shapes[key]))
            raise ObservationError(f"obs[{key!r}]: expected shape ({', '.join(named)}), got {shape}")
        batch_size = shape[0]
        if not is_image:
            index = _first_non_finite(value)
            if index is not None:
                raise ObservationError(f"obs[{key!r}] has a non-finite value {float(value[index])} at index {index}")
    return batch_size


def check_batch(batch: Any, config: PolicyConfig) -> int:
    """Validate a training batch `{"obs", "action" (B, Tp, Da), "action_is_pad" (B, Tp) optional}`; returns B."""
    if not isinstance(batch, Mapping):
        raise ObservationError(f"batch must be a dict with keys {list(BATCH_KEYS[:2])}, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    missing = [k for k in BATCH_KEYS[:2] if k not in batch]
    if unknown or missing:
        raise ObservationError(f"batch keys: missing {missing}, unexpected {unknown}; expected "
                               f"'obs', 'action' and optionally 'action_is_pad'")
    batch_size = check_observations(batch["obs"], config)
    action = batch["action"]
    expected = (batch_size, config.pred_horizon, config.action_dim)
    if not isinstance(action, torch.Tensor) or not action.is_floating_point():
        got = action.dtype if isinstance(action, torch.Tensor) else type(action).__name__
        raise ObservationDtypeError(f"batch['action']: expected a floating point tensor, got {got}")
    if tuple(action.shape) != expected:
        raise ObservationError(f"batch['action']: expected shape (B={batch_size}, Tp={config.pred_horizon}, "
                               f"Da={config.action_dim}), got {tuple(action.shape)}")
    index = _first_non_finite(action)
    if index is not None:
        raise ObservationError(f"batch['action'] has a non-finite value {float(action[index])} at index {index}")
    pad = batch.get("action_is_pad")
    if pad is not None:
        if not isinstance(pad, torch.Tensor) or pad.dtype != torch.bool:
            got = pad.dtype if isinstance(pad, torch.Tensor) else type(pad).__name__
            raise ObservationDtypeError(f"batch['action_is_pad']: expected a bool tensor, got {got}")
        if tuple(pad.shape) != expected[:2]:
            raise ObservationError(f"batch['action_is_pad']: expected shape (B={batch_size}, "
                                   f"Tp={config.pred_horizon}), got {tuple(pad.shape)}")
    return batch_size

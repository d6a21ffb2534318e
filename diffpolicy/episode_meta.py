"""Episode meta that the code recording episodes writes and the replay buffer's readers know, in a
module that imports nothing heavy: collection workers import it without zarr or torch.

`final_obs.<key>`: an episode's observation after its last action, which no step of `data/<key>`
holds (the target of the episode's last transition, e.g. the state a success or a fall ends in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

FINAL_OBS = "final_obs."
"""Prefix of the episode meta `final_obs.<key>`."""


def final_obs_meta(obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Episode meta `final_obs.<key>` for the low-dim `(d,)` entries of an observation (images are
    not kept: a frame per episode would not fit a meta chunk)."""
    return {FINAL_OBS + key: np.asarray(value) for key, value in obs.items() if np.ndim(value) == 1}

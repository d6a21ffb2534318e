"""Task cards and envs for the collection tests; importable by spawned worker processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from diffpolicy.envs.pusht import PushTEnv
from diffpolicy.envs.tasks import CARDS_DIR


class FaultyPushT(PushTEnv):
    """PushT whose episode of `fault_seed` fails at its first step: it raises (`fault="raise"`),
    its process exits at once (`fault="exit"`, as a worker killed from outside), or its reward is
    NaN (`fault="nan"`, data the store refuses)."""

    def __init__(self, fault_seed: int, fault: str = "raise", **kwargs):
        super().__init__(**kwargs)
        self.fault_seed, self.fault = fault_seed, fault
        self._seed = None

    def reset(self, *, seed=None, options=None):
        self._seed = seed
        return super().reset(seed=seed, options=options)

    def step(self, action):
        if self._seed == self.fault_seed:
            if self.fault == "exit":
                os._exit(3)
            if self.fault == "raise":
                raise RuntimeError(f"simulated fault in the episode of seed {self._seed}")
            obs, _, terminated, truncated, info = super().step(action)
            return obs, float("nan"), terminated, truncated, info
        return super().step(action)


def pusht_card(tmp_path: Path, name: str, **fields) -> str:
    """The pusht card with `fields` replaced, written under `tmp_path`; returns its path."""
    raw = yaml.safe_load((CARDS_DIR / "pusht.yaml").read_text())
    raw.update(name=name, **fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def faulty_card(tmp_path: Path, fault_seed: int, fault: str) -> str:
    return pusht_card(tmp_path, f"pusht_faulty_{fault}",
                      env={"entry_point": "collect_helpers:FaultyPushT",
                           "kwargs": {"obs_type": "state", "fault_seed": fault_seed, "fault": fault}})


def modules_loaded(names: list[str]) -> dict[str, bool]:
    """Which of `names` this process has imported (run in a worker)."""
    return {name: name in sys.modules for name in names}

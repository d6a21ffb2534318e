"""The resumable state of a stable-baselines3 learner (DSRL), committed atomically.

Layout of `<run>/sb3/`:

    state.json              {"config", "counters", "number", "rng"}: the commit point
    model_<n>.zip           SB3's `save` (parameters, optimizers, num_timesteps, ...)
    replay_buffer_<n>.pkl   SB3's `save_replay_buffer` (off-policy algorithms)
    rng_<n>.safetensors     torch's global RNG state and numpy's global key array

SB3 saves neither the global RNGs it draws from (torch: actions and SAC's updates; numpy:
replay-buffer minibatches; python) nor its action space's generator (random actions before
`learning_starts`), and `load` reseeds all of them from the model's seed; `load` here sets them
back to what they were at `save`. A checkpoint writes its files under a new number, then replaces
state.json, then deletes the previous number's files, so a run killed at any moment resumes from
one consistent checkpoint. (The environments' state is not saved: DSRL starts new episodes from
seeds after every checkpoint; see `dsrl.finetune`.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from diffpolicy.fsutil import atomic_write_text, fsync_file
from diffpolicy.rl.errors import FinetuneError
from diffpolicy.train.checkpoints import capture_rng_state, restore_rng_state

STATE_JSON = "state.json"


class SB3State:
    """The checkpoint files of one SB3 run under `directory` (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.state_path = self.directory / STATE_JSON

    def exists(self) -> bool:
        return self.state_path.is_file()

    def read(self) -> dict[str, Any]:
        """state.json: `{"config": {...}, "counters": {...}, "number": n, "rng": {...}}`."""
        state = json.loads(self.state_path.read_text())
        if "number" not in state:
            raise FinetuneError(f"{self.state_path}: written before DSRL checkpoints were resumable (no 'number'); "
                                "start a new run in another --out")
        return state

    def _paths(self, number: int) -> dict[str, Path]:
        return {"model": self.directory / f"model_{number}.zip",
                "replay_buffer": self.directory / f"replay_buffer_{number}.pkl",
                "rng": self.directory / f"rng_{number}.safetensors"}

    def save(self, model: Any, number: int, config: dict[str, Any], counters: dict[str, Any]) -> None:
        """Write checkpoint `number` of `model` (SAC or PPO) with the run's config and counters."""
        from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

        self.directory.mkdir(parents=True, exist_ok=True)
        paths = self._paths(number)
        model.save(paths["model"])
        if isinstance(model, OffPolicyAlgorithm):
            model.save_replay_buffer(paths["replay_buffer"])
        tensors, rng_meta = capture_rng_state({"action_space": model.action_space.np_random})
        save_file(tensors, str(paths["rng"]))
        for path in paths.values():
            if path.exists():
                fsync_file(path)
        previous = self.read()["number"] if self.exists() else None
        atomic_write_text(self.state_path, json.dumps({"config": config, "counters": counters, "number": number,
                                                       "rng": rng_meta}))
        if previous is not None and previous != number:
            for path in self._paths(previous).values():
                path.unlink(missing_ok=True)

    def load(self, model_cls: type, env: Any) -> tuple[Any, dict[str, Any]]:
        """The model of the committed checkpoint on `env` (CPU), its replay buffer and RNG states
        restored; returns `(model, state)` with state as `read` gives it."""
        from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

        state = self.read()
        paths = self._paths(state["number"])
        model = model_cls.load(paths["model"], env=env, device="cpu")  # reseeds every RNG from model.seed
        if isinstance(model, OffPolicyAlgorithm):
            model.load_replay_buffer(paths["replay_buffer"])
        restore_rng_state(load_file(str(paths["rng"])), state["rng"], {"action_space": model.action_space.np_random})
        return model, state

"""Training checkpoints: atomic writes, top-k retention by evaluation score, exact resume.

Layout of a run's `checkpoints/` folder:

    index.json                  {"latest": "step_00001000", "checkpoints": [{name, step, score}]}
    step_00001000/
        policy/                 the EMA policy, `save_pretrained` (what `diffpolicy eval` loads)
        state/<group>.safetensors   model, ema, optimizer, rng tensors (one file per group)
        state/state.json        step, data-loader position, scheduler, optimizer hyper-parameters,
                                python/numpy RNG states, score

Nothing is pickled. A checkpoint directory is written under a temporary name and renamed into
place, and `index.json` is replaced atomically after it, so a crash at any moment leaves the
previous checkpoints and index intact. `CheckpointManager.save` keeps the `keep_top_k` best
scored checkpoints plus the latest one and deletes the rest; the evaluations `diffpolicy eval` wrote
into a deleted checkpoint (`eval_*/`) move to `evaluations/<checkpoint name>/` first.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffpolicy.errors import InvalidTypeError, InvalidValueError
from diffpolicy.fsutil import atomic_write_text, fsync_dir, fsync_tree
from diffpolicy.policies.errors import CheckpointError, CheckpointNotFoundError
from diffpolicy.policies.locate import (
    INDEX_FILE,
    POLICY_DIR,
    best_checkpoint,
    latest_checkpoint,
    read_index,
    resolve_policy_dir,
    score_rank,
)

__all__ = ["CheckpointManager", "capture_rng_state", "checkpoint_name", "resolve_policy_dir", "restore_rng_state"]

STATE_FORMAT_VERSION = 1
STATE_DIR = "state"
EVALUATIONS_DIR = "evaluations"  # under the checkpoints folder: the evaluations of pruned checkpoints
STATE_JSON = "state.json"


# ----------------------------------------------------------------------------- RNG states


def capture_rng_state(generators: dict[str, torch.Generator | np.random.Generator] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Snapshot python, numpy (global), torch (CPU and CUDA) RNGs and the given explicit generators.

    Returns `(tensors, meta)`: byte/int tensors for safetensors and a JSON-able dict.
    """
    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy_global.keys"] = torch.from_numpy(np_keys.astype(np.int64))
    meta: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy_global": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        if isinstance(gen, torch.Generator):
            tensors[f"generator.{name}"] = gen.get_state()
            meta["generators"][name] = {"kind": "torch"}
        elif isinstance(gen, np.random.Generator):
            meta["generators"][name] = {"kind": "numpy", "state": gen.bit_generator.state}
        else:
            raise InvalidTypeError(f"generator {name!r}: expected torch.Generator or numpy Generator, got {type(gen).__name__}")
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                      generators: dict[str, torch.Generator | np.random.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`: set every RNG back to the captured state, in place."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, mt_state, gauss = meta["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy_global"]
    np.random.set_state((np_name, tensors["numpy_global.keys"].numpy().astype(np.uint32),
                         np_pos, np_has_gauss, np_gauss))
    for name, gen in (generators or {}).items():
        saved = meta["generators"].get(name)
        if saved is None:
            raise CheckpointError(f"RNG state has no generator {name!r}; saved: {sorted(meta['generators'])}")
        if isinstance(gen, torch.Generator):
            gen.set_state(tensors[f"generator.{name}"])
        else:
            gen.bit_generator.state = saved["state"]


# ----------------------------------------------------------------------------- optimizer state


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into safetensors-able tensors and JSON meta (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def state_dict_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as independent contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- the manager


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Writes checkpoints under `root` atomically and keeps the top-k by score plus the latest
    (or, with `keep_all`, every checkpoint: a learning curve evaluated after training)."""

    def __init__(self, root: str | os.PathLike, keep_top_k: int = 3, keep_all: bool = False,
                 export_dir: str = POLICY_DIR) -> None:
        if keep_top_k < 0:
            raise InvalidValueError(f"keep_top_k must be >= 0, got {keep_top_k}")
        self.root = Path(root)
        self.keep_top_k = keep_top_k
        self.keep_all = keep_all
        self.export_dir = export_dir  # the deployable model's folder in each checkpoint (a world model's: "model")
        for partial in self.root.glob(".tmp-*"):  # left by a run killed mid-write
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink()

    # --------------------------------------------------------------- index (policies.locate)
    def read_index(self) -> dict[str, Any]:
        return read_index(self.root)

    def latest(self) -> Path | None:
        """Directory of the latest checkpoint, or None when there is none."""
        return latest_checkpoint(self.root)

    def best(self) -> Path | None:
        """Directory of the best-scored checkpoint (later step wins ties), else the latest."""
        return best_checkpoint(self.root)

    # --------------------------------------------------------------- writing
    def save(self, step: int, *, export: Callable[[Path], None], groups: dict[str, dict[str, torch.Tensor]],
             meta: dict[str, Any], score: float | list[float] | None = None) -> Path:
        """Write checkpoint `step` and prune.

        Args:
            export: writes the deployable policy into the directory it is given (the trainer
                passes the EMA policy's `save_pretrained`), `<checkpoint>/<export_dir>`.
            groups: `{group: {name: tensor}}`, one safetensors file per group.
            meta: JSON-able training state (step, data position, RNG, scheduler, ...).
            score: evaluation score (higher is better; a list is compared lexicographically, e.g.
                success rate then coverage) used for top-k retention; None if not evaluated
                (then the checkpoint survives only while it is the latest).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        name = checkpoint_name(step)
        final = self.root / name
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        export(tmp / self.export_dir)
        (tmp / STATE_DIR).mkdir(parents=True)
        for group, tensors in groups.items():
            save_file(tensors, str(tmp / STATE_DIR / f"{group}.safetensors"))
        state_meta = {"format_version": STATE_FORMAT_VERSION, "step": step, "score": score,
                      "groups": sorted(groups), **meta}
        (tmp / STATE_DIR / STATE_JSON).write_text(json.dumps(state_meta))
        fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume that repeats it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)

        index = self.read_index()
        entries = [c for c in index["checkpoints"] if c["name"] != name]
        entries.append({"name": name, "step": step, "score": score})
        entries.sort(key=lambda c: c["step"])
        scored = sorted((c for c in entries if c["score"] is not None), key=score_rank, reverse=True)
        keep = {c["name"] for c in (entries if self.keep_all else scored[: self.keep_top_k])} | {name}
        kept = [c for c in entries if c["name"] in keep]
        atomic_write_text(self.root / INDEX_FILE, json.dumps({"latest": name, "checkpoints": kept}, indent=1))
        for entry in entries:
            if entry["name"] not in keep:
                self._keep_evaluations(entry["name"])
                shutil.rmtree(self.root / entry["name"], ignore_errors=True)
        return final

    def _keep_evaluations(self, name: str) -> None:
        """Move the `eval_*` folders of checkpoint `name` (what `diffpolicy eval` wrote into it) to
        `evaluations/<name>/`, so pruning the checkpoint never deletes a finished evaluation."""
        for evaluation in sorted((self.root / name).glob("eval_*")):
            destination = self.root / EVALUATIONS_DIR / name
            destination.mkdir(parents=True, exist_ok=True)
            target, copy = destination / evaluation.name, 1
            while target.exists():  # the same step saved and pruned again (a resumed run), evaluated again
                target, copy = destination / f"{evaluation.name}_{copy}", copy + 1
            os.replace(evaluation, target)

    # --------------------------------------------------------------- reading
    @staticmethod
    def load_state(checkpoint: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Read `(groups, meta)` written by `save` from a checkpoint directory."""
        state_dir = Path(checkpoint) / STATE_DIR
        meta_path = state_dir / STATE_JSON
        if not meta_path.is_file():
            raise CheckpointNotFoundError(f"no training state at {meta_path}: not a checkpoint directory")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
        if meta.get("format_version") != STATE_FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                                  f"expected {STATE_FORMAT_VERSION}")
        groups = {}
        for group in meta["groups"]:
            path = state_dir / f"{group}.safetensors"
            if not path.is_file():
                raise CheckpointNotFoundError(f"checkpoint state file missing: {path}")
            groups[group] = load_file(str(path))
        return groups, meta

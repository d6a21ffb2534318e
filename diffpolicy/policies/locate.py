"""Finding the policy a path names: a `save_pretrained` directory, a training checkpoint, or a run.

A training run keeps its checkpoints under `checkpoints/` with an `index.json`
(`{"latest": "step_00001000", "checkpoints": [{"name", "step", "score"}]}`), each checkpoint's
deployable policy in `<checkpoint>/policy/`. `train.checkpoints.CheckpointManager` writes that
layout; everything that loads a trained policy (evaluation, the controller, RL fine-tuning, the
policy server) reads it through this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffpolicy.policies.errors import CheckpointError, CheckpointNotFoundError

INDEX_FILE = "index.json"
POLICY_DIR = "policy"


def read_index(root: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint index of `root` (a `checkpoints/` folder); empty when there is none yet."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        return {"latest": None, "checkpoints": []}
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or "checkpoints" not in index or "latest" not in index:
        raise CheckpointError(f"{path}: expected keys 'latest' and 'checkpoints', got {index!r:.200}")
    return index


def score_rank(entry: dict[str, Any]) -> tuple[list[float], int]:
    """Sort key of an index entry: its score as a list (lexicographic), then its step."""
    score = entry["score"]
    return (list(score) if isinstance(score, list) else [score]), entry["step"]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """Directory of the latest checkpoint under `root`, or None when there is none."""
    name = read_index(root)["latest"]
    return None if name is None else Path(root) / name


def best_checkpoint(root: str | os.PathLike) -> Path | None:
    """Directory of the best-scored checkpoint under `root` (later step wins ties), else the latest."""
    scored = [c for c in read_index(root)["checkpoints"] if c["score"] is not None]
    if not scored:
        return latest_checkpoint(root)
    return Path(root) / max(scored, key=score_rank)["name"]


def resolve_policy_dir(path: str | os.PathLike) -> Path:
    """The `save_pretrained` directory that `path` names.

    `path` may be a policy directory (`config.json` + `model.safetensors`), a checkpoint
    directory (its `policy/`), a run directory (the best-scored checkpoint under `checkpoints/`,
    else the latest) or a `checkpoints/` folder itself.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if (path / POLICY_DIR / "config.json").is_file():
        return path / POLICY_DIR
    for root in (path / "checkpoints", path):
        if (root / INDEX_FILE).is_file():
            best = best_checkpoint(root)
            if best is None:
                raise CheckpointNotFoundError(f"{root / INDEX_FILE} lists no checkpoint yet")
            return best / POLICY_DIR
    raise CheckpointNotFoundError(
        f"no checkpoint at {path}: expected a policy directory (config.json + model.safetensors), a "
        f"checkpoint directory (policy/), or a run directory (checkpoints/{INDEX_FILE})"
    )

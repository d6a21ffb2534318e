"""Saving and loading a module with a JSON config (the generative image and text models, the world
model): a directory with `model.safetensors` and `config.json`.

Safetensors never unpickles. The weights are written first (to a temporary file, then renamed),
`config.json` last, atomically, holding the weights' sha256, the model's config and
`metadata["kind"]` (which model class wrote it, so an image model is never loaded as a text model
or a world model); loading checks both files, the kind and the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffpolicy.errors import InvalidValueError, MissingFileError
from diffpolicy.fsutil import atomic_write_text, fsync_file

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_model(directory: str | os.PathLike, module: nn.Module, config: dict[str, Any], kind: str,
               metadata: dict[str, Any] | None = None) -> None:
    """Write `module`'s tensors and its JSON `config` into `directory` (created if needed)."""
    from safetensors.torch import save_file

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    weights = target / WEIGHTS_FILE
    tmp = target / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, weights)
    header = {"kind": kind, "config": config, "metadata": dict(metadata or {}), "sha256": _sha256(weights)}
    atomic_write_text(target / CONFIG_FILE, json.dumps(header, indent=2, allow_nan=False) + "\n")


def load_model_files(directory: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                                      dict[str, Any]]:
    """Read a directory written by `save_model` for a model of `kind` -> (config, tensors, metadata)."""
    from safetensors.torch import load_file

    root = Path(directory)
    config_path, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    for path in (config_path, weights):
        if not path.is_file():
            raise MissingFileError(f"{root}: no {path.name}; save a {kind} there first")
    try:
        header = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("kind") != kind:
        found = header.get("kind") if isinstance(header, dict) else None
        raise InvalidValueError(f"{root}: holds a {found or 'different'} checkpoint, expected a {kind} "
                                f"(config.json 'kind' = {found!r})")
    if header.get("sha256") != _sha256(weights):
        raise InvalidValueError(f"{weights}: sha256 differs from the one {config_path} records (torn or replaced)")
    return header["config"], load_file(str(weights)), header.get("metadata", {})


def load_model(directory: str | os.PathLike, kind: str, build: Callable[[dict[str, Any]], nn.Module]) -> nn.Module:
    """A model of `kind` from a directory written by `save_model`: `build(config)` makes the module,
    the verified weights load strictly, `metadata` is set; in eval mode, on the CPU."""
    config, tensors, metadata = load_model_files(directory, kind)
    model = build(config)
    model.load_state_dict(tensors, strict=True)
    model.metadata = dict(metadata)
    return model.eval()

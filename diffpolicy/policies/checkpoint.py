"""The on-disk checkpoint format: a directory with `model.safetensors` and `config.json`.

    <dir>/model.safetensors   all tensors (weights and normalizer statistics), safetensors format
    <dir>/config.json         {"format_version": 1,
                               "policy_config": {...},            # PolicyConfig.to_dict()
                               "weights": {"file": "model.safetensors", "sha256": "<hex>"},
                               "metadata": {...}}                 # caller's JSON values, may be {}

Writing is atomic: both files are written and fsynced in a temporary sibling directory, which is
then renamed into place. An existing checkpoint at the target is first renamed aside and deleted
only after the new one is in place, so a crash leaves either the old or the new checkpoint whole
(at worst the old one under `<dir>.old-*`), never a mix. A target directory that holds other
files is refused rather than replaced.

Reading never unpickles: weights load through safetensors only, and a pickle or `torch.save`
archive (recognized by its leading bytes or a `.pt/.pth/.bin/.ckpt/.pkl` name) is refused with
`PickleRefusedError`. Every other problem raises `CheckpointError` (or
`CheckpointNotFoundError`) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffpolicy.fsutil import fsync_dir, fsync_file
from diffpolicy.policies.errors import CheckpointError, CheckpointNotFoundError, PickleRefusedError

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclass
class Checkpoint:
    """A checkpoint's contents as read from disk."""

    tensors: dict[str, torch.Tensor]
    policy_config: dict[str, Any]
    metadata: dict[str, Any]


# ---------------------------------------------------------------------------- writing
def write_checkpoint(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    policy_config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `tensors` and the config atomically into `directory`; returns its path.

    Args:
        tensors: name -> tensor (copied to contiguous CPU tensors; shared storage is fine).
        policy_config: JSON-serializable `PolicyConfig.to_dict()`.
        metadata: extra JSON-serializable values (task name, training step, ...).
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {target}: it exists and is not a directory")
    if target.is_dir():
        others = sorted(p.name for p in target.iterdir() if p.name not in (WEIGHTS_FILE, CONFIG_FILE))
        if others:
            raise CheckpointError(
                f"refusing to overwrite {target}: it holds files that are not part of a checkpoint ({others[:5]})"
            )
    header = {"format_version": FORMAT_VERSION, "policy_config": policy_config, "metadata": dict(metadata or {})}
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint config/metadata must be JSON-serializable: {err}") from None

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights_path = staging / WEIGHTS_FILE
        save_file({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()},
                  str(weights_path))
        fsync_file(weights_path)
        header["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_of(weights_path)}
        config_path = staging / CONFIG_FILE
        config_path.write_text(json.dumps(header, indent=2, allow_nan=False) + "\n")
        fsync_file(config_path)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        for path in (weights_path, config_path):
            os.chmod(path, 0o644)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`, moving an existing checkpoint aside first and deleting it after."""
    if not target.exists():
        os.rename(staging, target)
        fsync_dir(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- reading
def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint directory (see the module docstring for the checks)."""
    root = Path(directory)
    if not root.is_dir() and (root.suffix.lower() in PICKLE_SUFFIXES or (root.is_file() and _looks_like_pickle(root))):
        raise PickleRefusedError(
            f"{root} looks like a pickle / torch.save file; diffpolicy never unpickles (it can run "
            f"arbitrary code). Expected a checkpoint directory with {WEIGHTS_FILE} and {CONFIG_FILE}."
        )
    if not root.exists():
        raise CheckpointNotFoundError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {root} is a file; expected a directory with "
                              f"{WEIGHTS_FILE} and {CONFIG_FILE}")
    weights_path, config_path = root / WEIGHTS_FILE, root / CONFIG_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            hint = f"; found {pickles}, pickle-based files that diffpolicy refuses to load" if pickles else ""
            raise CheckpointNotFoundError(f"checkpoint file {path} is missing{hint}")

    header = _read_config(config_path)
    if _looks_like_pickle(weights_path):
        raise PickleRefusedError(
            f"{weights_path} is a pickle / torch.save archive, not safetensors; diffpolicy never unpickles"
        )
    expected_sha = header["weights"]["sha256"]
    actual_sha = sha256_of(weights_path)
    if actual_sha != expected_sha:
        raise CheckpointError(
            f"{weights_path} does not match the sha256 recorded in {config_path} "
            f"(expected {expected_sha}, got {actual_sha}): the weights were modified or corrupted"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is not a valid safetensors file: {err}") from None
    return Checkpoint(tensors, header["policy_config"], header["metadata"])


def _read_config(path: Path) -> dict[str, Any]:
    """Parse and check the fields of `config.json`."""
    try:
        header = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(header).__name__}")
    version = header.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported; this diffpolicy reads "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}"
        )
    weights = header.get("weights")
    if not (isinstance(weights, dict) and weights.get("file") == WEIGHTS_FILE
            and isinstance(weights.get("sha256"), str)):
        raise CheckpointError(f"{path}: key 'weights' must be {{'file': '{WEIGHTS_FILE}', 'sha256': <hex>}}, "
                              f"got {weights!r}")
    if not isinstance(header.get("policy_config"), dict):
        raise CheckpointError(f"{path}: key 'policy_config' must be an object, got {header.get('policy_config')!r}")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: key 'metadata' must be an object, got {metadata!r}")
    header["metadata"] = metadata
    return header


def _looks_like_pickle(path: Path) -> bool:
    """True for a raw pickle (protocol 2+: 0x80 then the protocol byte) or a torch.save zip archive.

    A well-formed safetensors prefix (u64 little-endian header length that fits the file, then
    "{") is never taken for a pickle, whatever its first byte.
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return False
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"

"""Saving and loading generative models in the package's verified checkpoint format.

A model directory is the policies' format (`model.safetensors` + `config.json`, written atomically,
read without unpickling): the model's config sits where a policy keeps its config, and
`metadata["kind"]` names the model class, so an image model is never loaded as a text model.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from diffpolicy.errors import InvalidValueError
from diffpolicy.policies.checkpoint import read_checkpoint, write_checkpoint


def save_model(directory: str | os.PathLike, module: nn.Module, config: dict[str, Any], kind: str,
               metadata: dict[str, Any] | None = None) -> None:
    """Write `module`'s tensors and its JSON `config` into `directory` (atomically)."""
    write_checkpoint(directory, dict(module.state_dict()), config, {**(metadata or {}), "kind": kind})


def load_model_files(directory: str | os.PathLike, kind: str):
    """Read a model directory written by `save_model` for a model of `kind`: -> (config dict, tensors,
    metadata). Raises `CheckpointError` (missing / corrupt files) or `InvalidValueError` (other kind)."""
    checkpoint = read_checkpoint(directory)
    found = checkpoint.metadata.get("kind")
    if found != kind:
        raise InvalidValueError(f"{os.fspath(directory)}: holds a {found or 'policy'!s} checkpoint, expected a "
                                f"{kind} (metadata 'kind' = {found!r})")
    return checkpoint.policy_config, checkpoint.tensors, checkpoint.metadata

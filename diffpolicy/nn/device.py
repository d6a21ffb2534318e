"""Choosing the torch device from a name: `"auto"`, `"cpu"`, `"cuda"`, `"cuda:1"`, ..."""

from __future__ import annotations

import torch

from diffpolicy.errors import InvalidValueError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`"auto"` -> `cuda:<local_rank>` when a GPU is there, else CPU; otherwise `torch.device(name)`."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidValueError(f"device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device

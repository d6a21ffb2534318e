"""The GPU path behind flags: `torch.compile` of the denoiser call, CUDA-graph capture, bf16 autocast.

CPU and eager float32 stay the default. `accelerate(policy, ...)` returns a copy of the policy whose
`backbone` runs through the chosen path (the copy's state dict gains a wrapper prefix: save the
original policy, not the copy). CUDA graphs come from `torch.compile(mode="reduce-overhead")`,
which captures the denoiser call on a CUDA device; they need static shapes (one batch size) and a
CUDA device, and are refused elsewhere.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffpolicy.control.errors import ControlError


class AcceleratedDenoiser(nn.Module):
    """`forward(x_t (B, L, D), t (B, L), cond) -> (B, L, D)` of `backbone`, compiled and/or in bf16
    autocast; the output comes back in x_t's dtype."""

    def __init__(self, backbone: nn.Module, compile: bool = False, cuda_graphs: bool = False, bf16: bool = False):
        super().__init__()
        self.backbone, self.bf16 = backbone, bf16
        self._call = backbone
        if compile or cuda_graphs:
            self._call = torch.compile(backbone, mode="reduce-overhead" if cuda_graphs else "default", dynamic=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if not self.bf16:
            return self._call(x, t, cond)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = self._call(x, t, cond)
        return out.to(x.dtype)


def accelerate(policy, *, compile: bool = False, cuda_graphs: bool = False, bf16: bool = False):
    """A copy of `policy` whose denoiser runs compiled / CUDA-graph captured / in bf16 (module docstring)."""
    device = next(policy.parameters()).device
    if cuda_graphs and device.type != "cuda":
        raise ControlError(f"CUDA graphs need the policy on a CUDA device; it is on {device}")
    if not (compile or cuda_graphs or bf16):
        return policy
    fast = copy.deepcopy(policy)
    fast.backbone = AcceleratedDenoiser(fast.backbone, compile=compile, cuda_graphs=cuda_graphs, bf16=bf16)
    return fast.eval()

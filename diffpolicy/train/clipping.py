"""Gradient-norm clipping that skips the rescale when it would multiply by one.

`torch.nn.utils.clip_grad_norm_` always multiplies every gradient by
`min(1, max_norm / (norm + 1e-6))`, a full pass over the gradients even when the factor is exactly
1 (most steps of a converging run: the main job's gradient norm is 0.02-0.05 against a limit of 1).
On a CPU skipping that pass saves about 0.5 ms of the main job's 20 ms step (docs/RESULTS.md, "Two
exact savings in the step"). `clip_gradients` computes the same total norm
and rescales only when the factor is below one, so the gradients are bit-identical to
`clip_grad_norm_`'s (multiplying by 1.0 is exact). Reading the norm to decide is a device sync,
so on a GPU it keeps torch's branch-free call.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

EPS = 1e-6  # torch's: factor = max_norm / (norm + EPS)


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of `parameters` to total 2-norm `max_norm` in place; returns the norm before."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters or parameters[0].grad.device.type != "cpu":
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters]
    norm = torch.nn.utils.get_total_norm(grads)
    if float(norm) + EPS > max_norm:  # the factor max_norm / (norm + EPS) is below one
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm

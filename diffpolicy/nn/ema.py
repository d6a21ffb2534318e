"""Exponential moving average of a model's weights with Diffusion Policy's warm-up.

Decay at optimization step k (counting from 0; `update` advances one step or several), as DP's `EMAModel`:

    s = max(0, k - update_after_step - 1)
    decay = 0                                                  if s == 0
          = clamp(1 - (1 + s / inv_gamma) ** -power, min_decay, max_decay)   otherwise

so the first updates copy the weights and the average lengthens as training goes on
(power 0.75: decay 0.99 after about 460 steps, 0.999 after about 10k, capped at max_decay).
Floating-point parameters that require grad and floating-point buffers are averaged;
parameters that do not require grad and non-float buffers (counters, indices) are copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffpolicy.nn.errors import NNConfigError, NNInputError


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


class EMA:
    """EMA of `model`'s parameters and buffers, kept as detached shadow tensors.

    `update(model)` after each optimizer step; `copy_to(model)` writes the averages into a model of
    the same architecture (e.g. an evaluation copy); `state_dict()` / `load_state_dict()` save and
    restore the step counter, the hyperparameters and the shadow tensors, so a resumed run continues
    bit-exactly. The state dict holds only tensors, ints and floats (`torch.load(weights_only=True)`
    reads it back).
    """

    def __init__(
        self,
        model: nn.Module,
        power: float = 0.75,
        max_decay: float = 0.9999,
        min_decay: float = 0.0,
        inv_gamma: float = 1.0,
        update_after_step: int = 0,
    ):
        if not (0.0 <= min_decay <= max_decay <= 1.0) or power <= 0 or inv_gamma <= 0 or update_after_step < 0:
            raise NNConfigError(
                f"EMA: need 0 <= min_decay <= max_decay <= 1, power > 0, inv_gamma > 0, update_after_step >= 0; "
                f"got min_decay={min_decay}, max_decay={max_decay}, power={power}, inv_gamma={inv_gamma}, "
                f"update_after_step={update_after_step}"
            )
        self.hyperparameters = {
            "power": float(power), "max_decay": float(max_decay), "min_decay": float(min_decay),
            "inv_gamma": float(inv_gamma), "update_after_step": int(update_after_step),
        }
        self.shadow = {name: tensor.detach().clone() for name, tensor in _named_tensors(model).items()}
        self.step = 0
        self.decay = 0.0

    def decay_at(self, step: int) -> float:
        """Decay used by the update at optimization step `step` (0-based)."""
        hp = self.hyperparameters
        s = max(0, step - hp["update_after_step"] - 1)
        if s == 0:
            return 0.0
        value = 1.0 - (1.0 + s / hp["inv_gamma"]) ** -hp["power"]
        return max(hp["min_decay"], min(value, hp["max_decay"]))

    def _matching_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = _named_tensors(model)
        if tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - tensors.keys())
            extra = sorted(tensors.keys() - self.shadow.keys())
            raise NNInputError(f"EMA: model does not match the averaged one; missing {missing}, unexpected {extra}")
        for name, tensor in tensors.items():
            if tensor.shape != self.shadow[name].shape:
                raise NNInputError(
                    f"EMA: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(self.shadow[name].shape)}"
                )
        return tensors

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int = 1) -> None:
        """Fold the current weights of `model` into the average and advance `steps` optimization steps.

        `steps` > 1 stands for that many updates with the same weights, folded into one pass: the decay
        is the product of theirs (updating every k steps with `steps=k` costs a k-th of the passes over
        the weights and averages the weights seen every k-th step).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise NNInputError(f"EMA.update: steps must be an integer >= 1, got {steps!r}")
        tensors = self._matching_tensors(model)
        self.decay = math.prod(self.decay_at(step) for step in range(self.step, self.step + steps))
        averaged, targets = [], []
        for name, tensor in tensors.items():
            shadow = self.shadow[name]
            trainable = tensor.requires_grad if isinstance(tensor, nn.Parameter) else True
            if tensor.is_floating_point() and trainable:
                averaged.append(shadow)
                targets.append(tensor.detach().to(shadow.dtype))
            else:
                shadow.copy_(tensor)
        if averaged:
            torch._foreach_lerp_(averaged, targets, 1.0 - self.decay)
        self.step += steps

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters and buffers into `model`."""
        for name, tensor in self._matching_tensors(model).items():
            tensor.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "decay": self.decay,
            "hyperparameters": dict(self.hyperparameters),
            "shadow": {name: tensor.clone() for name, tensor in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the tensor names, shapes and hyperparameters must match."""
        missing = sorted({"step", "decay", "hyperparameters", "shadow"} - state.keys())
        if missing:
            raise NNInputError(f"EMA.load_state_dict: state is missing entries {missing}")
        if state["hyperparameters"] != self.hyperparameters:
            raise NNConfigError(
                f"EMA.load_state_dict: saved hyperparameters {state['hyperparameters']} differ from this EMA's "
                f"{self.hyperparameters}"
            )
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise NNInputError(
                f"EMA.load_state_dict: tensor names differ; missing {sorted(self.shadow.keys() - shadow.keys())}, "
                f"unexpected {sorted(shadow.keys() - self.shadow.keys())}"
            )
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise NNInputError(
                    f"EMA.load_state_dict: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(self.shadow[name].shape)}"
                )
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.step = int(state["step"])
        self.decay = float(state["decay"])

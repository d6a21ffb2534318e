"""`TextModel`: masked (absorbing-state) diffusion over characters on the shared core.

The process is `core.MaskedDiffusion` over the 95 printable ASCII characters (`corpus.VOCAB`); the
denoiser is `nn.DiT` over one-hot tokens `(B, L, V + 1)` -> logits `(B, L, V + 1)`, by default
without time input (`time_input=False`: the MASK tokens tell the level). Sampling is the one
`core.sample` loop with confidence-ordered unmasking; a prompt is held fixed by
`core.PrefixInpainting`. The likelihood bound gives bits per character.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffpolicy.config import check_bool, check_float, check_int, from_dict, to_dict
from diffpolicy.core import MaskedDiffusion, PrefixInpainting, sample
from diffpolicy.errors import ConfigError, InvalidTypeError, InvalidValueError
from diffpolicy.generative import corpus
from diffpolicy.nn import make_backbone
from diffpolicy.nn.checkpoint import load_model, save_model

KIND = "text_model"


@dataclass(frozen=True)
class TextModelConfig:
    """Attributes: seq_len: L characters per sequence; time_input: give the DiT the level t;
    temperature: the process's unmasking temperature (0 = argmax); backbone: DiT arguments (give
    `"position": "rotary"`: with the DiT's default learned embedding the model hardly learns context,
    docs/RESULTS.md "Text"; a saved backbone without the key is a learned-position model)."""

    seq_len: int = 64
    time_input: bool = False
    temperature: float = 0.0
    backbone: dict[str, Any] = field(default_factory=lambda: {"hidden_dim": 128, "depth": 4, "num_heads": 4,
                                                              "time_embed_dim": 128, "position": "rotary"})

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len, 2)
        check_bool("time_input", self.time_input)
        check_float("temperature", self.temperature, 0.0)
        if not isinstance(self.backbone, dict) or {"type", "time_input"} & set(self.backbone):
            raise ConfigError(f"config key 'backbone': expected a dict of DiT arguments (without 'type' and "
                              f"'time_input'), got {self.backbone!r}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TextModelConfig:
        return from_dict(cls, data)


class TextModel(nn.Module):
    """Character-level masked diffusion (module docstring). Submodules: `denoiser` (`nn.DiT`); `process`."""

    def __init__(self, config: TextModelConfig):
        super().__init__()
        if not isinstance(config, TextModelConfig):
            raise InvalidTypeError(f"TextModel: config must be a TextModelConfig, got {type(config).__name__}")
        self.config = config
        self.process = MaskedDiffusion(len(corpus.VOCAB), temperature=config.temperature)
        self.denoiser = make_backbone({"type": "dit", **config.backbone, "time_input": config.time_input},
                                      self.process.token_dim, config.seq_len, 0)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dim() != 2 \
                or tokens.shape[1] != self.config.seq_len:
            raise InvalidValueError(f"TextModel: tokens must be integer ids (B, L = {self.config.seq_len}), got "
                                    f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                                    f"{tuple(getattr(tokens, 'shape', ()))}")

    def loss(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The negative ELBO in nats per character (a scalar) of ids `(B, L)`: the continuous-time
        bound in its low-variance count form (`MaskedDiffusion.log_likelihood_bound`), draws from
        `generator`."""
        self._check_tokens(tokens)
        nats = self.process.log_likelihood_bound(self.denoiser, self.process.encode(tokens), generator=generator)
        return nats.mean() / tokens.shape[1]

    @torch.no_grad()
    def bits_per_character(self, tokens: torch.Tensor, steps: int | None = None,
                           generator: torch.Generator | None = None) -> float:
        """The likelihood bound (`MaskedDiffusion.log_likelihood_bound`) of ids `(B, L)` in bits per
        character: continuous time (steps None) or the bound of a K-step random-order unmasking."""
        self._check_tokens(tokens)
        nats = self.process.log_likelihood_bound(self.denoiser, self.process.encode(tokens), steps=steps,
                                                 generator=generator)
        return float(nats.mean()) / (tokens.shape[1] * math.log(2.0))

    @torch.no_grad()
    def generate(self, count: int, steps: int, prompt: str = "", generator: torch.Generator | None = None,
                 temperature: float | None = None) -> list[str]:
        """`count` texts of `seq_len` characters, each starting with `prompt`, unmasked in `steps` steps
        (temperature: None = the config's; 0 = argmax tokens, 1 = draws from the model)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidValueError(f"TextModel.generate: count must be an int >= 1, got {count!r}")
        if len(prompt) >= self.config.seq_len:
            raise InvalidValueError(f"TextModel.generate: the prompt ({len(prompt)} characters) must be shorter "
                                    f"than seq_len = {self.config.seq_len}")
        x_init = self.process.all_masked(count, self.config.seq_len)
        guidance = None
        if prompt:
            prefix = self.process.encode(corpus.encode(prompt).unsqueeze(0).expand(count, -1))
            guidance = PrefixInpainting(prefix)
        process = self.process if temperature is None else MaskedDiffusion(len(corpus.VOCAB), temperature)
        x0 = sample(self.denoiser, process, x_init, steps, guidance=guidance, generator=generator).x0
        return [corpus.decode(ids) for ids in self.process.decode(x0)]

    def save_pretrained(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
        """Write `model.safetensors` and `config.json` (`nn.checkpoint`)."""
        save_model(directory, self, self.config.to_dict(), KIND, metadata)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> TextModel:
        """Load a directory written by `save_pretrained` (eval mode, CPU)."""
        return load_model(directory, KIND, lambda config: cls(TextModelConfig.from_dict(config)))

"""`ImageModel`: a class-conditional diffusion / flow model of images, a DiT over patches.

Everything generative comes from the shared core and nn, exactly as the policies use them: the
denoiser is `nn.DiT` (built by `nn.make_backbone`) over the image's patch tokens
`(B, L = (H/p)(W/p), D = C p p)`, the process is `core.GaussianDiffusion` or `core.FlowMatching`,
training uses
`core.denoising_loss`, sampling the one `core.sample` loop, and classifier-free guidance is
`core.ClassifierFreeGuidance` (the condition is a one-hot class vector; the null condition is the
zero vector, on which the model is trained with probability `cond_dropout`).

Pixels are floats in [-1, 1], images `(B, C, H, W)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffpolicy.config import check_choice, check_float, check_int, from_dict, to_dict
from diffpolicy.core import (
    ClassifierFreeGuidance,
    FlowMatching,
    GaussianDiffusion,
    Process,
    denoising_loss,
    make_schedule,
    sample,
)
from diffpolicy.errors import ConfigError, InvalidTypeError, InvalidValueError
from diffpolicy.generative.patches import check_patch_size, patchify, unpatchify
from diffpolicy.nn import make_backbone
from diffpolicy.nn.checkpoint import load_model, save_model
from diffpolicy.nn.dit import square_patch_grid

KIND = "image_model"
PROCESSES = ("diffusion", "flow")
PREDICTIONS = ("epsilon", "sample", "v")


@dataclass(frozen=True)
class ImageModelConfig:
    """Shapes, process and network of an `ImageModel`.

    Attributes:
        image_size: H = W. channels: C. patch_size: p, dividing image_size.
        num_classes: K >= 0; 0 = unconditional (no guidance).
        process: "diffusion" (cosine schedule, x0 clipped to [-1, 1]) or "flow" (Euler steps).
        prediction, eta: diffusion only: the network's output ("v" default) and the DDIM
            stochasticity of its steps (0 = deterministic DDIM, good at few steps; 1 = DDPM).
        backbone: DiT keyword arguments for `nn.make_backbone({"type": "dit", ...})`; with
            `"position": "rotary"` or `"both"` the rotary positions are axial over the (H/p) x (W/p) patch grid
            (the DiT's `grid`, set from the shapes unless given).
        cond_dropout: probability of training on the null condition (classifier-free guidance).
    """

    image_size: int = 16
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10
    process: str = "flow"
    prediction: str = "v"
    eta: float = 0.0
    backbone: dict[str, Any] = field(default_factory=lambda: {"hidden_dim": 128, "depth": 4, "num_heads": 4,
                                                              "time_embed_dim": 128})
    cond_dropout: float = 0.1

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, 1)
        check_int("channels", self.channels, 1)
        check_int("num_classes", self.num_classes, 0)
        try:
            check_patch_size(self.image_size, self.image_size, self.patch_size, "ImageModelConfig")
        except InvalidValueError as err:
            raise ConfigError(f"config key 'patch_size': {err}") from None
        check_choice("process", self.process, PROCESSES)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_float("eta", self.eta, 0.0, maximum=1.0)
        if not isinstance(self.backbone, dict) or "type" in self.backbone:
            raise ConfigError(f"config key 'backbone': expected a dict of DiT arguments (no 'type'), "
                              f"got {self.backbone!r}")
        check_float("cond_dropout", self.cond_dropout, 0.0, maximum=0.99)
        self._check_output_rank()

    def _check_output_rank(self) -> None:
        """The DiT's last layer maps `hidden_dim` features to each token's C p p values, so its output
        lies in a subspace of rank <= hidden_dim. Predicting the clean image fits (images are far from
        full rank); flow's velocity and diffusion's epsilon / v carry the noise, which is full rank, so
        a DiT narrower than its tokens leaves most of the noise in every sample."""
        hidden = self.backbone.get("hidden_dim")
        if isinstance(hidden, int) and hidden < self.token_dim and (self.process == "flow" or self.prediction != "sample"):
            output = "velocity" if self.process == "flow" else f"{self.prediction!r} prediction"
            raise ConfigError(f"config key 'backbone.hidden_dim': {hidden} is below the token size {self.token_dim} "
                              f"({self.channels} x {self.patch_size} x {self.patch_size}); the DiT's output then has rank "
                              f"<= {hidden} and cannot hold the noise that {output} needs, so samples stay noisy. Use "
                              f"process 'diffusion' with prediction 'sample', or hidden_dim >= {self.token_dim}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size ** 2

    def make_process(self) -> Process:
        """The core process this config names."""
        if self.process == "flow":
            return FlowMatching()
        return GaussianDiffusion(make_schedule("cosine"), prediction=self.prediction, eta=self.eta, clip_x0=1.0)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ImageModelConfig:
        return from_dict(cls, data)


class ImageModel(nn.Module):
    """Class-conditional image generator (module docstring).

    Submodules: `denoiser` (`nn.DiT`, `(B, L, C p p), (B, L), (B, K) -> (B, L, C p p)`); `process`.
    """

    def __init__(self, config: ImageModelConfig):
        super().__init__()
        if not isinstance(config, ImageModelConfig):
            raise InvalidTypeError(f"ImageModel: config must be an ImageModelConfig, got {type(config).__name__}")
        self.config = config
        backbone = {"type": "dit", **config.backbone}
        grid = square_patch_grid(backbone.get("position", "learned"), config.image_size // config.patch_size)
        if grid is not None:  # axial over the patch grid unless the config says otherwise
            backbone.setdefault("grid", grid)
        self.denoiser = make_backbone(backbone, config.token_dim, config.num_tokens, config.num_classes)
        self.process = config.make_process()

    # ------------------------------------------------------------------ conditions
    def condition(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Class ids `(B,)` -> one-hot condition `(B, K)` (None for an unconditional model)."""
        if self.config.num_classes == 0:
            if labels is not None:
                raise InvalidValueError("ImageModel: this model is unconditional (num_classes = 0); pass labels=None")
            return None
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32) \
                or tuple(labels.shape) != (batch,):
            raise InvalidValueError(f"ImageModel: labels must be an integer tensor of shape ({batch},), got "
                                    f"{getattr(labels, 'dtype', type(labels).__name__)} "
                                    f"{tuple(getattr(labels, 'shape', ()))}")
        if bool(((labels < 0) | (labels >= self.config.num_classes)).any()):
            raise InvalidValueError(f"ImageModel: labels must be class ids in 0..{self.config.num_classes - 1}, "
                                    f"got {labels.tolist()}")
        return F.one_hot(labels.long(), self.config.num_classes).float()

    def _check_images(self, images: torch.Tensor) -> None:
        c, s = self.config.channels, self.config.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4 \
                or tuple(images.shape[1:]) != (c, s, s):
            raise InvalidValueError(f"ImageModel: images must be float (B, C, H, W) = (B, {c}, {s}, {s}) in "
                                    f"[-1, 1], got {getattr(images, 'dtype', type(images).__name__)} "
                                    f"{tuple(getattr(images, 'shape', ()))}")

    # ------------------------------------------------------------------ training
    def loss(self, images: torch.Tensor, labels: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoising loss (a scalar) of images `(B, C, H, W)` in [-1, 1] with class ids `(B,)`.

        Random draws from `generator` (a CPU generator, whatever device the images are on), in order:
        t `(B,)` (one level per image), the noise, and the condition dropout `(B,)`.
        """
        self._check_images(images)
        batch = images.shape[0]
        cond = self.condition(labels, batch)
        x0 = patchify(images, self.config.patch_size)
        device = x0.device  # draws come from the CPU generator on every device, then move
        t = torch.rand(batch, generator=generator).to(device).unsqueeze(1).expand(batch, x0.shape[1]).contiguous()
        noise = torch.randn(x0.shape, generator=generator).to(device)
        if cond is not None:
            keep = torch.rand(batch, generator=generator) >= self.config.cond_dropout
            cond = cond.to(device) * keep.to(device).unsqueeze(1).to(cond.dtype)
        x_t = self.process.corrupt(x0, t, noise)
        return denoising_loss(self.denoiser(x_t, t, cond), self.process.target(x0, noise, t))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None = None, steps: int = 10, guidance_scale: float = 1.0,
                 count: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images `(B, C, H, W)` in [-1, 1] through `core.sample`.

        Args:
            labels: class ids `(B,)` (conditional models), or None with `count` (unconditional).
            steps: sampler steps from t = 1 to 0.
            guidance_scale: classifier-free guidance w (1 = the conditional model alone, 0 = the
                unconditional one); conditional models only.
            generator: the initial noise and every step's noise.
        """
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
                raise InvalidValueError(f"ImageModel.generate: labels must be a 1-D tensor of class ids (B,), got "
                                        f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
            batch = labels.shape[0]
        elif isinstance(count, int) and not isinstance(count, bool) and count >= 1:
            batch = count
        else:
            raise InvalidValueError(f"ImageModel.generate: give labels (B,) or count >= 1, got labels=None, "
                                    f"count={count!r}")
        cond = self.condition(labels, batch)
        guidance = None
        if guidance_scale != 1.0:
            if cond is None:
                raise InvalidValueError("ImageModel.generate: guidance needs a class-conditional model")
            guidance = ClassifierFreeGuidance(guidance_scale, torch.zeros(self.config.num_classes))
        x_init = torch.randn(batch, self.config.num_tokens, self.config.token_dim, generator=generator)
        tokens = sample(self.denoiser, self.process, x_init, steps, cond=cond, guidance=guidance,
                        generator=generator).x0
        s = self.config.image_size
        return unpatchify(tokens, self.config.patch_size, self.config.channels, s, s).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
        """Write `model.safetensors` and `config.json` (`nn.checkpoint`)."""
        save_model(directory, self, self.config.to_dict(), KIND, metadata)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageModel:
        """Load a directory written by `save_pretrained` (eval mode, CPU)."""
        return load_model(directory, KIND, lambda config: cls(ImageModelConfig.from_dict(config)))

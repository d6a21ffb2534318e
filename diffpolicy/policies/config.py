"""Typed configuration of a chunk policy, with a JSON-friendly `to_dict` / `from_dict`.

`PolicyConfig` holds everything needed to rebuild a `ChunkPolicy` (shapes, horizons, the
generative process, backbone and encoder specs, inference and loss settings); it is stored in a
checkpoint's `config.json`. It is read with the package's one config reader
(`diffpolicy.config.from_dict`): unknown keys, missing keys, and values of the wrong type or range
fail with a `ConfigError` naming the key path (e.g. `process.prediction`), the expected type or
values, and what came.

Defaults follow Diffusion Policy: To = 2, Tp = 16, Ta = 8; DDPM with 100 training steps, the
squared-cosine schedule, epsilon prediction, clipping to [-1, 1]; 100 inference steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from diffpolicy.config import check_bool, check_choice, check_float, check_int, check_spec, fail, from_dict, to_dict
from diffpolicy.core.losses import WEIGHTINGS
from diffpolicy.core.processes import PREDICTIONS
from diffpolicy.core.schedules import SCHEDULES

PROCESS_TYPES = ("diffusion", "flow")
TOKEN_TIME_KINDS = ("shared", "ladder", "prefix")


# ---------------------------------------------------------------------------- process
@dataclass(frozen=True)
class ProcessConfig:
    """The generative process.

    Attributes:
        type: "diffusion" (Gaussian, DDPM/DDIM) or "flow" (linear-path flow matching).
        schedule: diffusion only: `{"name": <schedule kind>, **kwargs}` for `core.make_schedule`.
        prediction: diffusion only: what the network predicts, "epsilon" | "sample" | "v".
        train_steps: discrete training grid (t = k / train_steps, k = 1..train_steps, DDPM style);
            None trains on continuous t ~ U(0, 1).
        eta: diffusion only, in [0, 1]: 1 = DDPM ancestral steps, 0 = deterministic DDIM.
        clip: clip the x0 prediction (diffusion) or the final sample (flow) to [-clip, clip] in
            normalized units; None disables clipping.
        step_std: flow only: explicit Gaussian std of each Euler step (ReinFlow-style); None = ODE.
    """

    type: str = "diffusion"
    schedule: dict[str, Any] | None = None
    prediction: str | None = None
    train_steps: int | None = None
    eta: float | None = None
    clip: float | None = 1.0
    step_std: float | None = None

    def __post_init__(self) -> None:
        check_choice("process.type", self.type, PROCESS_TYPES)
        if self.type == "diffusion":
            defaults = {"schedule": {"name": "cosine"}, "prediction": "epsilon", "eta": 1.0}
            for name, value in defaults.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
            check_spec("process.schedule", self.schedule, "name")
            check_choice("process.schedule.name", self.schedule["name"], tuple(sorted(SCHEDULES)))
            check_choice("process.prediction", self.prediction, PREDICTIONS)
            check_float("process.eta", self.eta, 0, maximum=1)
            if self.step_std is not None:
                raise fail("process.step_std", "null for type 'diffusion' (eta sets the step noise)", self.step_std)
        else:
            for name in ("schedule", "prediction", "eta"):
                if getattr(self, name) is not None:
                    raise fail(f"process.{name}", "null for type 'flow' (diffusion-only setting)", getattr(self, name))
            if self.step_std is not None:
                check_float("process.step_std", self.step_std, 0)
        if self.train_steps is not None:
            check_int("process.train_steps", self.train_steps, 1)
        if self.clip is not None:
            check_float("process.clip", self.clip, 0, strictly=True)

    @classmethod
    def from_dict(cls, data: Any, path: str = "process") -> ProcessConfig:
        return from_dict(cls, data, path)


def diffusion_process(**overrides: Any) -> ProcessConfig:
    """Diffusion Policy's process: DDPM, 100 training steps, squared cosine, epsilon, clip 1."""
    return ProcessConfig(**{"type": "diffusion", "train_steps": 100, **overrides})


def flow_process(**overrides: Any) -> ProcessConfig:
    """Flow matching on continuous t, deterministic Euler steps, final sample clipped to [-1, 1]."""
    return ProcessConfig(**{"type": "flow", **overrides})


# ---------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class LossConfig:
    """Training loss settings.

    Attributes:
        weighting: "uniform" (plain MSE on the process target) or "min_snr" (Min-SNR-gamma).
        min_snr_gamma: gamma of Min-SNR weighting.
        mask_padding: if True, tokens marked in `action_is_pad` are left out of the loss. The
            default (False) follows Diffusion Policy, which trains on edge-padded actions too:
            the padding repeats the last action, a valid "hold still" target.
        token_times: the per-token noise levels seen in training, one kind or a weighted mix
            "kind:weight,kind:weight" (each example draws its kind with these weights):
            "shared" (one level for the whole chunk; the default, Diffusion Policy's training),
            "ladder" (a clean prefix, then levels rising group by group of Ta tokens, as the
            streaming controller's buffer holds them; SDP mixes "ladder:0.8,shared:0.2"),
            "prefix" (a random number of leading tokens clean at t = 0, the rest at one shared
            level: training-time real-time chunking). Clean tokens are left out of the loss.
            See `token_time_mix`.
    """

    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    mask_padding: bool = False
    token_times: str = "shared"

    def __post_init__(self) -> None:
        check_choice("loss.weighting", self.weighting, WEIGHTINGS)
        check_float("loss.min_snr_gamma", self.min_snr_gamma, 0, strictly=True)
        check_bool("loss.mask_padding", self.mask_padding)
        token_time_mix(self.token_times)

    @property
    def token_time_weights(self) -> dict[str, float]:
        """`token_times` as `{kind: probability}` (weights normalized to sum 1)."""
        return token_time_mix(self.token_times)

    @classmethod
    def from_dict(cls, data: Any, path: str = "loss") -> LossConfig:
        return from_dict(cls, data, path)


def token_time_mix(text: Any, path: str = "loss.token_times") -> dict[str, float]:
    """Parse a token-time spec: "shared", "prefix", or "ladder:0.8,shared:0.2" -> `{kind: probability}`.

    Kinds are `TOKEN_TIME_KINDS`; weights are finite numbers > 0 (a bare kind weighs 1), normalized
    to sum 1; a kind may appear once. Raises `ConfigError` naming the key and the bad part.
    """
    expected = f"a kind of {list(TOKEN_TIME_KINDS)} or a mix 'kind:weight,kind:weight'"
    if not isinstance(text, str) or not text.strip():
        raise fail(path, expected, text)
    weights: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.strip().partition(":")
        kind = kind.strip()
        if kind not in TOKEN_TIME_KINDS:
            raise fail(path, f"{expected}; unknown kind {kind!r} in", text)
        if kind in weights:
            raise fail(path, f"{expected}; kind {kind!r} given twice in", text)
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise fail(path, f"{expected}; weight {weight.strip()!r} of {kind!r} is not a number in", text) from None
        if not (math.isfinite(value) and value > 0):
            raise fail(path, f"{expected}; weights must be finite and > 0 in", text)
        weights[kind] = value
    total = sum(weights.values())
    return {kind: value / total for kind, value in weights.items()}


# ---------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class PolicyConfig:
    """Everything that defines a chunk policy's architecture and behaviour.

    Attributes:
        obs_shapes: per-step shape of each observation key: `(d,)` for low-dim keys,
            `(H, W, 3)` for image keys. Batches carry `(B, To, *shape)`.
        action_dim: Da.
        image_keys: which keys of `obs_shapes` are uint8 images.
        obs_horizon, pred_horizon, action_horizon: To, Tp, Ta (Ta <= Tp).
        process: the generative process (`ProcessConfig`).
        backbone: spec for `nn.make_backbone` (`{"type": "unet" | "dit" | "mlp", ...}`).
        encoder: spec for `nn.make_observation_encoder`.
        inference_steps: default number of denoising steps of `sample`.
        loss: `LossConfig`.
        finetune_steps: K', how many of the last `inference_steps` denoising steps run through
            the policy's fine-tuned copy of the backbone (RL fine-tuning; 0: none). A policy with
            K' > 0 samples with exactly `inference_steps` steps.
    """

    obs_shapes: dict[str, tuple[int, ...]]
    action_dim: int
    image_keys: tuple[str, ...] = ()
    obs_horizon: int = 2
    pred_horizon: int = 16
    action_horizon: int = 8
    process: ProcessConfig = field(default_factory=lambda: diffusion_process())
    backbone: dict[str, Any] = field(default_factory=lambda: {"type": "unet"})
    encoder: dict[str, Any] = field(default_factory=dict)
    inference_steps: int = 100
    loss: LossConfig = field(default_factory=LossConfig)
    finetune_steps: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.obs_shapes, dict) or not self.obs_shapes:
            raise fail("obs_shapes", "a non-empty dict {key: per-step shape}", self.obs_shapes)
        shapes = {}
        for key, shape in self.obs_shapes.items():
            if not isinstance(key, str) or not key or "." in key or key == "action":
                raise fail("obs_shapes", "keys that are non-empty strings without '.' and not 'action'", key)
            if not isinstance(shape, (list, tuple)) or not shape:
                raise fail(f"obs_shapes.{key}", "a non-empty list of positive integers", shape)
            shapes[key] = tuple(check_int(f"obs_shapes.{key}[{i}]", s, 1) for i, s in enumerate(shape))
        object.__setattr__(self, "obs_shapes", shapes)
        if not isinstance(self.image_keys, (list, tuple)) or not all(isinstance(k, str) for k in self.image_keys):
            raise fail("image_keys", "a list of strings", self.image_keys)
        object.__setattr__(self, "image_keys", tuple(self.image_keys))
        for key in self.image_keys:
            if key not in shapes:
                raise fail("image_keys", f"keys of obs_shapes {sorted(shapes)}", key)
            if len(shapes[key]) != 3 or shapes[key][2] != 3:
                raise fail(f"obs_shapes.{key}", "an image shape [H, W, 3]", list(shapes[key]))
        for key in self.low_dim_keys:
            if len(shapes[key]) != 1:
                raise fail(f"obs_shapes.{key}", "a low-dim shape [d] (or list the key in image_keys)",
                            list(shapes[key]))
        check_int("action_dim", self.action_dim, 1)
        check_int("obs_horizon", self.obs_horizon, 1)
        check_int("pred_horizon", self.pred_horizon, 1)
        check_int("action_horizon", self.action_horizon, 1)
        if self.action_horizon > self.pred_horizon:
            raise fail("action_horizon", f"at most pred_horizon = {self.pred_horizon}", self.action_horizon)
        if not isinstance(self.process, ProcessConfig):
            raise fail("process", "a ProcessConfig", self.process)
        object.__setattr__(self, "backbone", check_spec("backbone", self.backbone, "type"))
        if not isinstance(self.encoder, dict) or not all(isinstance(k, str) for k in self.encoder):
            raise fail("encoder", "a dict with string keys", self.encoder)
        for derived in ("image_keys", "obs_shapes", "obs_horizon"):
            if derived in self.encoder:
                raise fail(f"encoder.{derived}", f"no such key (it comes from the top-level '{derived}')",
                            self.encoder[derived])
        check_int("inference_steps", self.inference_steps, 1)
        if not isinstance(self.loss, LossConfig):
            raise fail("loss", "a LossConfig", self.loss)
        check_int("finetune_steps", self.finetune_steps, 0)
        if self.finetune_steps > self.inference_steps:
            raise fail("finetune_steps", f"at most inference_steps = {self.inference_steps}", self.finetune_steps)

    @property
    def low_dim_keys(self) -> tuple[str, ...]:
        """Observation keys that are not images, in `obs_shapes` order."""
        return tuple(k for k in self.obs_shapes if k not in self.image_keys)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; `PolicyConfig.from_dict(c.to_dict()) == c`."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PolicyConfig:
        """Build and validate a config from `to_dict` output (e.g. parsed `config.json`)."""
        return from_dict(cls, data)

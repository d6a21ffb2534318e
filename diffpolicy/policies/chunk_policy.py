"""`ChunkPolicy`: observation encoder + denoiser backbone + generative process + normalizer.

One class serves diffusion and flow matching alike: the process comes from the config. The
policy works in normalized units inside (actions and low-dim observations min-max scaled to
[-1, 1]; images go to the encoder as uint8, which scales them itself) and in data units at its
public boundary (`compute_loss` batches, `sample` inputs and outputs).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffpolicy.core.guidance import Guidance
from diffpolicy.core.losses import denoising_loss, loss_weight
from diffpolicy.core.processes import FlowMatching, GaussianDiffusion, Process
from diffpolicy.core.samplers import Chain, Denoiser, SampleResult, StepNoise, start_levels
from diffpolicy.core.samplers import chain_log_prob as score_chain
from diffpolicy.core.samplers import sample as run_sampler
from diffpolicy.core.schedules import make_schedule
from diffpolicy.errors import InvalidTypeError, InvalidValueError
from diffpolicy.nn.dit_image_encoder import skipping_init
from diffpolicy.nn.factory import make_backbone, make_observation_encoder
from diffpolicy.policies.checkpoint import read_checkpoint, write_checkpoint
from diffpolicy.policies.config import PolicyConfig, ProcessConfig
from diffpolicy.policies.errors import (
    CheckpointError,
    ConfigError,
    NormalizerError,
    ObservationError,
)
from diffpolicy.policies.normalizer import Normalizer
from diffpolicy.policies.token_times import draw_token_times
from diffpolicy.policies.validation import check_batch, check_observations

ACTION_KEY = "action"


def make_process(config: ProcessConfig) -> Process:
    """The core process a `ProcessConfig` describes."""
    if config.type == "flow":
        return FlowMatching(std=config.step_std)
    schedule_kwargs = {k: v for k, v in config.schedule.items() if k != "name"}
    return GaussianDiffusion(make_schedule(config.schedule["name"], **schedule_kwargs),
                             prediction=config.prediction, eta=config.eta, clip_x0=config.clip)


def check_normalizer(config: PolicyConfig, normalizer: Normalizer) -> None:
    """Raise `NormalizerError` unless the normalizer has exactly the stats the config needs."""
    if not isinstance(normalizer, Normalizer):
        raise InvalidTypeError(f"normalizer must be a Normalizer, got {type(normalizer).__name__}")
    expected = {ACTION_KEY: config.action_dim, **{k: config.obs_shapes[k][0] for k in config.low_dim_keys}}
    have = normalizer.dims
    for key, dim in expected.items():
        if key not in have:
            raise NormalizerError(f"normalizer has no statistics for key {key!r} (expected shape ({dim},)); "
                                  f"it has {sorted(have)}")
        if have[key] != dim:
            raise NormalizerError(f"normalizer statistics for key {key!r} have shape ({have[key]},), "
                                  f"the policy config needs ({dim},)")
    extra = sorted(set(have) - set(expected))
    if extra:
        raise NormalizerError(f"normalizer has statistics for keys {extra} that the policy config does not use "
                              f"(expected {sorted(expected)})")
    if set(normalizer.image_keys) != set(config.image_keys):
        raise NormalizerError(f"normalizer image keys {sorted(normalizer.image_keys)} differ from the config's "
                              f"{sorted(config.image_keys)}")


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal of `shape` on like's device and dtype, drawn from `generator` on its own device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class ChunkPolicy(nn.Module):
    """An action-chunk policy: observations `{key: (B, To, ...)}` -> actions `(B, Tp, Da)`.

    Args:
        config: the `PolicyConfig` (shapes, horizons, process, backbone, encoder, loss).
        normalizer: a `Normalizer` with stats for "action" and every low-dim observation key, and
            the config's image keys.

    Submodules: `normalizer`, `obs_encoder` (`(obs) -> (B, C)`), `backbone`
    (`(x_t (B, Tp, Da), t (B, Tp), cond (B, C)) -> (B, Tp, Da)`); `process` is the core process.
    With `config.finetune_steps` = K' > 0 also `finetuned_backbone`, the copy that runs the last K'
    of the `inference_steps` denoising steps (see `start_finetuning`).
    """

    def __init__(self, config: PolicyConfig, normalizer: Normalizer) -> None:
        super().__init__()
        if not isinstance(config, PolicyConfig):
            raise InvalidTypeError(f"config must be a PolicyConfig, got {type(config).__name__}")
        check_normalizer(config, normalizer)
        self.config = config
        self.normalizer = normalizer
        self.obs_encoder = make_observation_encoder(
            {**config.encoder, "image_keys": list(config.image_keys)}, config.obs_shapes, config.obs_horizon)
        self.backbone = make_backbone(config.backbone, config.action_dim, config.pred_horizon,
                                      self.obs_encoder.output_dim)
        self.process = make_process(config.process)
        self.metadata: dict[str, Any] = {}
        if config.finetune_steps > 0:
            self.finetuned_backbone = copy.deepcopy(self.backbone)

    # ------------------------------------------------------------------ units
    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """Data units -> normalized units, `(..., Da)`."""
        return self.normalizer.normalize(ACTION_KEY, action)

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """Normalized units -> data units, `(..., Da)`."""
        return self.normalizer.unnormalize(ACTION_KEY, action)

    # ------------------------------------------------------------------ conditioning
    def encode_obs(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Validate, normalize and encode observations `{key: (B, To, ...)}` -> condition `(B, C)`.

        `generator` drives the encoder's random image crops in train mode.
        """
        check_observations(obs, self.config)
        normalized = {key: obs[key] if key in self.config.image_keys else self.normalizer.normalize(key, obs[key])
                      for key in self.config.obs_shapes}
        return self.obs_encoder(normalized, generator)

    # ------------------------------------------------------------------ training
    def _training_times(self, batch: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-example level `(B,)`: U(0, 1), or k / N with k uniform in 1..N on a discrete grid."""
        steps = self.config.process.train_steps
        u = _rand((batch,), like, generator)
        if steps is None:
            return u
        return (torch.floor(u * steps).clamp(max=steps - 1) + 1) / steps

    def _token_times(self, x0: torch.Tensor, generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Levels `(B, Tp)` of `config.loss.token_times` and the clean-token mask `(B, Tp)` (None
        for "shared", which draws exactly what it always drew: one `torch.rand` of `(B,)`)."""
        batch, horizon = x0.shape[:2]
        weights = self.config.loss.token_time_weights
        if weights == {"shared": 1.0}:
            return self._training_times(batch, x0, generator).unsqueeze(1).expand(-1, horizon), None
        return draw_token_times(weights, batch, horizon, self.config.action_horizon,
                                self.config.process.train_steps, lambda shape: _rand(shape, x0, generator))

    def compute_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                     finetuned: bool = False) -> torch.Tensor:
        """Denoising loss of one batch (a scalar).

        Args:
            batch: `{"obs": {key: (B, To, ...)}, "action": (B, Tp, Da), "action_is_pad": (B, Tp)
                bool (optional)}` in data units.
            generator: source of every random draw, in this order: the encoder's random crops
                (image keys, train mode), t `(B,)` by `torch.rand`, the noise `(B, Tp, Da)`.
            finetuned: run the fine-tuned copy (`start_finetuning`) instead of the backbone: the
                same loss for the copy (RL fine-tuning's behaviour-cloning regulariser).

        Each example gets one level t for its whole chunk (continuous, or on the training grid of
        `config.process.train_steps`), or per-token levels as `config.loss.token_times` says
        (`policies.token_times`; their draws replace t's). Padded actions count unless
        `config.loss.mask_padding`; tokens held clean by the token times never count.
        """
        check_batch(batch, self.config)
        if finetuned and self.config.finetune_steps == 0:
            raise ConfigError("compute_loss(finetuned=True): this policy has no fine-tuned copy; call "
                              "start_finetuning(last_steps) first")
        x0 = self.normalize_action(batch["action"])
        cond = self.encode_obs(batch["obs"], generator)
        t, clean = self._token_times(x0, generator)
        noise = _randn(tuple(x0.shape), x0, generator)
        x_t = self.process.corrupt(x0, t, noise)
        out = (self.finetuned_backbone if finetuned else self.backbone)(x_t, t, cond)
        weight = loss_weight(self.process, t, self.config.loss.weighting, self.config.loss.min_snr_gamma)
        pad = batch.get("action_is_pad")
        mask = ~pad if (pad is not None and self.config.loss.mask_padding) else None
        if clean is not None:
            mask = ~clean if mask is None else mask & ~clean
        return denoising_loss(out, self.process.target(x0, noise, t), mask=mask, weight=weight)

    # ------------------------------------------------------------------ sampling
    def sample_normalized(
        self,
        cond: torch.Tensor,
        steps: int | None = None,
        x_init: torch.Tensor | None = None,
        t_start: float | torch.Tensor | None = None,
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        record: bool = False,
    ) -> SampleResult:
        """Sample chunks in normalized units from a condition `cond (B, C)` (see `encode_obs`).

        Runs under the caller's grad mode (`sample` wraps it in `no_grad`). `x_init (B, Tp, Da)` is
        the normalized chunk at level `t_start` (default: standard normal noise at t = 1);
        `t_start` is a float, `(B,)` or `(B, Tp)`. For flow processes with `clip`, the result is
        clipped on the tokens that moved (t_start > 0). Returns the core `SampleResult`
        (x0 `(B, Tp, Da)` and, with `record`, the chain for log-probabilities).
        """
        steps = self.config.inference_steps if steps is None else steps
        shape = (cond.shape[0], self.config.pred_horizon, self.config.action_dim)
        if x_init is None:
            if t_start is not None and bool((torch.as_tensor(t_start) < 1).any()):
                raise InvalidValueError("sample: t_start < 1 needs x_init (the chunk at that level); got x_init=None")
            x_init = _randn(shape, cond, generator)
        elif tuple(x_init.shape) != shape:
            raise ObservationError(f"sample: x_init must have shape (B={shape[0]}, Tp={shape[1]}, Da={shape[2]}), "
                                   f"got {tuple(x_init.shape)}")
        levels = start_levels(1.0 if t_start is None else t_start, x_init)
        result = run_sampler(self.step_denoisers(steps), self.process, x_init, steps, cond=cond, t_start=levels,
                             guidance=guidance, generator=generator, record=record)
        clip = self.config.process.clip
        if self.config.process.type == "flow" and clip is not None:
            if guidance is not None:  # prepare is pure; it may pin tokens (a hard prefix) at t = 0
                _, levels = guidance.prepare(x_init, levels)
            moved = (levels > 0).unsqueeze(-1)
            result.x0 = torch.where(moved, result.x0.clamp(-clip, clip), result.x0)
        return result

    @torch.no_grad()
    def sample(
        self,
        obs: Mapping[str, torch.Tensor],
        steps: int | None = None,
        x_init: torch.Tensor | None = None,
        t_start: float | torch.Tensor | None = None,
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample action chunks `(B, Tp, Da)` in data units for observations `{key: (B, To, ...)}`.

        Args:
            steps: denoising steps (default `config.inference_steps`).
            x_init: `(B, Tp, Da)` the sampler's state at level t_start, in normalized units as the
                core sampler takes it: standard normal noise where t_start = 1, a renoised guess
                (`process.corrupt(normalize_action(guess), t, noise)`) for a warm start, clean
                `normalize_action(actions)` where t_start = 0. Default: noise drawn from `generator`.
            t_start: float, `(B,)` or `(B, Tp)` per-token start levels (default 1); tokens at 0
                come back as `unnormalize_action(x_init)` there.
            guidance: a core `Guidance` (works in normalized units); gradient-based guidance can
                enable grad inside (this runs under `no_grad`, not `inference_mode`).
            generator: source of the initial noise and every step's noise.
        """
        cond = self.encode_obs(obs, generator)
        result = self.sample_normalized(cond, steps, x_init, t_start, guidance, generator)
        return self.unnormalize_action(result.x0)

    def set_sampling(self, inference_steps: int | None = None, eta: float | None = None) -> None:
        """Change how `sample` draws chunks, keeping the weights: the default number of denoising
        steps, and (diffusion only) the DDIM stochasticity eta in [0, 1] (1 = DDPM ancestral steps,
        0 = deterministic). None keeps a setting. Invalid values raise `ConfigError` naming the key;
        `save_pretrained` then writes the new settings.
        """
        process = self.config.process
        if eta is not None:
            if process.type != "diffusion":
                raise ConfigError(f"process.eta: only diffusion processes have eta; this policy's process is "
                                  f"{process.type!r}, got eta={eta!r}")
            process = dataclasses.replace(process, eta=eta)
        steps = self.config.inference_steps if inference_steps is None else inference_steps
        self.config = dataclasses.replace(self.config, process=process, inference_steps=steps)
        self.process = make_process(process)

    # ------------------------------------------------------------------ RL fine-tuning
    def start_finetuning(self, last_steps: int) -> list[nn.Parameter]:
        """Fine-tune only the last K' = `last_steps` of the `inference_steps` denoising steps.

        Adds `finetuned_backbone`, a trainable copy of the backbone that runs those steps; the
        base (backbone, observation encoder) is frozen (requires_grad False) and keeps running the
        first K - K' steps. `save_pretrained` then writes both, and `from_pretrained` rebuilds the
        combined sampler. Returns the copy's parameters (the ones to optimize).
        """
        steps = self.config.inference_steps
        if isinstance(last_steps, bool) or not isinstance(last_steps, int) or not 1 <= last_steps <= steps:
            raise ConfigError(f"finetune_steps: expected an integer in [1, inference_steps = {steps}], "
                              f"got {last_steps!r}")
        if self.config.finetune_steps > 0:
            raise ConfigError(f"finetune_steps: this policy already fine-tunes its last {self.config.finetune_steps} "
                              "steps; load it and continue, or start from the base policy")
        self.config = dataclasses.replace(self.config, finetune_steps=last_steps)
        self.finetuned_backbone = copy.deepcopy(self.backbone)
        for module in (self.backbone, self.obs_encoder):
            module.requires_grad_(False)
        self.finetuned_backbone.requires_grad_(True)
        return list(self.finetuned_backbone.parameters())

    @property
    def finetuned_step_indices(self) -> list[int]:
        """Indices k of the denoising steps run by `finetuned_backbone` (empty without one)."""
        steps, tuned = self.config.inference_steps, self.config.finetune_steps
        return list(range(steps - tuned, steps)) if tuned else []

    def step_denoisers(self, steps: int) -> Denoiser | list[Denoiser]:
        """What the core sampler runs for `steps` steps: the backbone, or with fine-tuning the
        backbone for the first K - K' steps and the fine-tuned copy for the last K'."""
        if self.config.finetune_steps == 0:
            return self.backbone
        if steps != self.config.inference_steps:
            raise ConfigError(f"inference_steps: this policy fine-tuned its last {self.config.finetune_steps} of "
                              f"{self.config.inference_steps} steps and samples with exactly that many, got {steps}")
        tuned = set(self.finetuned_step_indices)
        return [self.finetuned_backbone if k in tuned else self.backbone for k in range(steps)]

    def sample_chain(self, cond: torch.Tensor, noise: StepNoise = StepNoise(),
                     generator: torch.Generator | None = None) -> SampleResult:
        """Sample chunks from noise with `inference_steps` steps under the noise control `noise`,
        recording the stacked `Chain` (normalized units). cond `(B, C)` -> x0 `(B, Tp, Da)`, chain
        with x `(B, K+1, Tp, Da)`. Runs under the caller's grad mode."""
        shape = (cond.shape[0], self.config.pred_horizon, self.config.action_dim)
        x_init = _randn(shape, cond, generator)
        steps = self.config.inference_steps
        return run_sampler(self.step_denoisers(steps), self.process, x_init, steps, cond=cond,
                           generator=generator, record=True, noise=noise)

    def chain_log_prob(self, cond: torch.Tensor, chain: Chain, noise: StepNoise = StepNoise(),
                       steps: list[int] | None = None, tokens: slice | None = None) -> torch.Tensor:
        """Log-probabilities `(B, len(steps))` of a recorded chain's transitions under this policy,
        each group of steps that shares a network in one batched pass.

        Args:
            cond: `(B, C)` from `encode_obs`; chain: from `sample_chain` (the same `noise`).
            steps: the steps to score (default: the fine-tuned ones if any, else all K).
            tokens: count only these chunk positions (e.g. the executed actions); default all Tp.
        For the policy and noise that recorded it, this equals `chain.log_prob[:, steps]`.
        """
        if steps is None:
            steps = self.finetuned_step_indices or list(range(chain.steps))
        denoisers = self.step_denoisers(chain.steps)
        if callable(denoisers):
            return score_chain(denoisers, self.process, chain, cond, steps, noise, tokens)
        groups: dict[int, list[int]] = {}
        for k in steps:
            groups.setdefault(id(denoisers[k]), []).append(k)
        parts = {}
        for ks in groups.values():
            for k, column in zip(ks, score_chain(denoisers[ks[0]], self.process, chain, cond, ks, noise, tokens).unbind(1)):
                parts[k] = column
        return torch.stack([parts[k] for k in steps], 1)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        """Write `model.safetensors` (this module's tensors, normalizer included) and `config.json`
        atomically into `directory`. `metadata`: extra JSON values (task name, step, ...)."""
        write_checkpoint(directory, dict(self.state_dict()), self.config.to_dict(), dict(metadata or {}))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ChunkPolicy:
        """Load a checkpoint written by `save_pretrained` (verified, never unpickled) on the CPU.

        The returned policy is in eval mode; its `metadata` holds what `save_pretrained` got.
        Raises `CheckpointError` (subclasses for missing files and pickles) naming the file or tensor.
        """
        checkpoint = read_checkpoint(directory)
        config_path = os.path.join(os.fspath(directory), "config.json")
        try:
            config = PolicyConfig.from_dict(checkpoint.policy_config)
        except ConfigError as err:
            raise CheckpointError(f"{config_path}: invalid policy_config: {err}") from None
        dims = {ACTION_KEY: config.action_dim, **{k: config.obs_shapes[k][0] for k in config.low_dim_keys}}
        with skipping_init():  # every weight, a pretrained image backbone's included, comes from the checkpoint
            policy = cls(config, Normalizer.placeholder(dims, config.image_keys))
        _check_tensors(policy.state_dict(), checkpoint.tensors, os.path.join(os.fspath(directory), "model.safetensors"))
        policy.load_state_dict(checkpoint.tensors, strict=True)
        policy.metadata = dict(checkpoint.metadata)
        return policy.eval()


def _check_tensors(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], path: str) -> None:
    """Raise `CheckpointError` naming the first tensor whose name, shape or dtype differs."""
    for name in sorted(set(expected) | set(loaded)):
        if name not in loaded:
            raise CheckpointError(f"{path}: tensor {name!r} (shape {tuple(expected[name].shape)}) required by the "
                                  f"config is missing")
        if name not in expected:
            raise CheckpointError(f"{path}: tensor {name!r} (shape {tuple(loaded[name].shape)}) is not part of the "
                                  f"policy the config describes")
        want, got = expected[name], loaded[name]
        if want.shape != got.shape or want.dtype != got.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(got.shape)} {got.dtype}, the config "
                                  f"needs {tuple(want.shape)} {want.dtype}")

"""A latent world model with an ensemble: E members, each an encoder, a latent transition
conditioned on the executed action, a decoder for the observation, and reward / success heads.

The latent of member e is s = (x, h): x the normalized observation itself, h `latent_dim` learned
features that the encoder infers from the last H observations (what one observation does not
show, such as velocities). All E members run as one batched pass (every weight has a leading
member dimension):

    s_0     = (x_t, enc_e(x_t, D^-1 (x_t - x_{t-1}), ..., D^-1 (x_{t-H+2} - x_{t-H+1})))
                                                   x = normalized o; D below
    s_{k+1} = s_k + D f_e(s_k, a_{t+k})            residual transition, one per executed action
    o_{t+k+1} = dec(s_{k+1}) = the x part, unnormalized
    r_{t+k}, success logit = head_e(s_k, a_{t+k}, s_{k+1}) + b

With `ModelConfig.quaternions`, x is the normalized observation's features instead: each
sign-ambiguous quaternion replaced by its rotation matrix (`rotations.QuaternionFeatures`; `D` then
counts features, and predictions come back as observations with w >= 0 quaternions).

Carrying the observation in the latent makes the decoder exact (a read-out): what does not move
(PushT's block while nothing touches it) stays put instead of jittering through a learned
reconstruction, and the transition learns changes, not states: D scales the observation part of
f_e by the data's per-dimension std of one-step changes, and the encoder reads the history as the
last observation and its recent changes in the same units (so inputs, outputs and the observation
loss are of order 1 however slowly an observation moves: a velocity is not left to the difference
of two nearly equal inputs). b, `success_logit_offset`, is 0 unless training oversampled the rare
windows that hold a success (`TrainConfig.success_fraction`): then it is the log-odds shift
from the training windows' success rate back to the data's (`training.success_rates`), so the
success probability the model reports is calibrated to the data, not to the oversampled batches.
The latent is carried from step to
step in imagination. Uncertainty is the ensemble's disagreement: members trained from different
initializations on different minibatches agree where the data pins the dynamics down and drift
apart elsewhere. `disagreement` is the largest over observation dimensions of the members'
standard deviation of the predicted observation (normalized units);
`reference_uncertainty` `(R,)` is its calibration on held-out data (`training.calibrate`): a high
quantile of the disagreement k = 1..R steps into an open-loop rollout of real windows, what a
dream compares the disagreement k steps into an imagined episode against.

Units: the public methods take and return data units (raw observations, actions, rewards); the
per-dimension mean / std normalization fitted on the training data lives in buffers, saved with
the weights (`save` / `load`: `model.safetensors` + `config.json` through `nn.checkpoint`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffpolicy.config import check_float, check_int, from_dict, to_dict
from diffpolicy.nn.checkpoint import load_model, save_model
from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.errors import WorldModelError
from diffpolicy.worldmodel.rotations import QuaternionFeatures

KIND = "world_model"


@dataclass(frozen=True)
class ModelConfig:
    """members: ensemble size E (>= 2 for a disagreement); latent_dim Z: learned latent features
    besides the observation; hidden_dim and layers of every MLP; history H: observations the
    encoder reads; quaternions: where the observation's sign-ambiguous quaternions start in the
    flat observation (the model reads and predicts their rotation matrices, `rotations`; `diffpolicy
    worldmodel train` takes them from the environment's `canonical_quaternions`); min_change_std:
    the floor of each feature's one-step change std `delta_std`, in units of the feature's std over
    the data (a feature that is nearly constant within episodes but differs between them, Can's
    yaw while the can stands on the table, would otherwise weigh its errors by thousands and drown
    the other features' gradients; docs/RESULTS.md, Can)."""

    members: int = 5
    latent_dim: int = 64
    hidden_dim: int = 256
    layers: int = 2
    history: int = 2
    quaternions: tuple[int, ...] = ()
    min_change_std: float = 0.01

    def __post_init__(self) -> None:
        check_int("model.members", self.members, 2)
        check_float("model.min_change_std", self.min_change_std, 0, maximum=1)
        for name in ("latent_dim", "hidden_dim", "layers", "history"):
            check_int(f"model.{name}", getattr(self, name), 1)
        for start in self.quaternions:
            check_int("model.quaternions[]", start, 0)


class EnsembleLinear(nn.Module):
    """E independent linear maps: x `(E, B, in)` -> `(E, B, out)` (nn.Linear's initialization each)."""

    def __init__(self, members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def ensemble_mlp(members: int, in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [EnsembleLinear(members, in_dim, hidden_dim), nn.SiLU()]
        in_dim = hidden_dim
    return nn.Sequential(*modules, EnsembleLinear(members, in_dim, out_dim))


@dataclass
class Prediction:
    """One imagined step of every member: latent `(E, N, D + Z)`, observation `(E, N, D)`
    (normalized), reward `(E, N)` (data units) and success logit `(E, N)`."""

    latent: torch.Tensor
    obs: torch.Tensor
    reward: torch.Tensor
    success_logit: torch.Tensor


class LatentWorldModel(nn.Module):
    """See the module docstring. obs_keys / obs_dims: the low-dim observation keys (in this order
    along D) and their sizes; action_dim Da; action_low / action_high `(Da,)`: the action space;
    reference_horizon R: the length of `reference_uncertainty` (NaN until calibrated);
    success_logit_offset: b of the module docstring."""

    def __init__(self, config: ModelConfig, obs_keys: tuple[str, ...], obs_dims: tuple[int, ...], action_dim: int,
                 action_low: np.ndarray, action_high: np.ndarray, reference_horizon: int = 1,
                 success_logit_offset: float = 0.0) -> None:
        super().__init__()
        self.config, self.obs_keys, self.obs_dims = config, tuple(obs_keys), tuple(int(d) for d in obs_dims)
        self.action_dim = int(action_dim)
        self.features = QuaternionFeatures(config.quaternions, sum(self.obs_dims))
        obs_dim, members, hidden, layers = self.features.feature_dim, config.members, config.hidden_dim, config.layers
        self.obs_dim, self.state_dim = obs_dim, obs_dim + config.latent_dim
        self.encoder = ensemble_mlp(members, config.history * obs_dim, hidden, config.latent_dim, layers)
        self.transition = ensemble_mlp(members, self.state_dim + action_dim, hidden, self.state_dim, layers)
        self.heads = ensemble_mlp(members, 2 * self.state_dim + action_dim, hidden, 2, layers)
        for name, size in (("obs_mean", obs_dim), ("obs_std", obs_dim), ("action_mean", action_dim),
                           ("action_std", action_dim)):
            self.register_buffer(name, torch.zeros(size) if "mean" in name else torch.ones(size))
        self.register_buffer("delta_std", torch.ones(obs_dim))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))
        self.register_buffer("action_low", torch.as_tensor(np.asarray(action_low, np.float32).reshape(action_dim)))
        self.register_buffer("action_high", torch.as_tensor(np.asarray(action_high, np.float32).reshape(action_dim)))
        self.register_buffer("reference_uncertainty", torch.full((int(reference_horizon),), float("nan")))
        self.success_logit_offset = float(success_logit_offset)
        self.metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------ units
    def fit_normalization(self, data: Transitions) -> None:
        """Per-dimension mean / std of observations, actions and rewards, and the std of one-step
        changes of the normalized observations within episodes (each std floored at 1e-3 of its
        largest, so constant dimensions do not blow up; the changes' std also at
        `config.min_change_std`)."""
        def stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            mean, std = x.mean(0), x.std(0)
            floor = max(float(np.max(std)) * 1e-3, 1e-6) if std.size else 1e-6
            return torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(np.maximum(std, floor), dtype=torch.float32)

        with torch.no_grad():
            features = self.features.encode(torch.as_tensor(data.obs, dtype=torch.float64)).numpy()
            for name, array in (("obs", features), ("action", data.action), ("reward", data.reward)):
                mean, std = stats(array.astype(np.float64))
                getattr(self, f"{name}_mean").copy_(mean)
                getattr(self, f"{name}_std").copy_(std)
            within = np.setdiff1d(np.arange(data.n_steps - 1), data.episode_ends - 1)
            normalized = self.normalize_obs(torch.as_tensor(data.obs, dtype=torch.float32)).numpy().astype(np.float64)
            if len(within):
                change_std = stats(normalized[within + 1] - normalized[within])[1]
                self.delta_std.copy_(change_std.clamp_min(self.config.min_change_std))

    @property
    def obs_slices(self) -> dict[str, slice]:
        """Where each observation key lies in the flat observation `(..., sum(obs_dims))` (data units)."""
        offsets = np.cumsum([0, *self.obs_dims]).tolist()
        return {key: slice(lo, hi) for key, lo, hi in zip(self.obs_keys, offsets[:-1], offsets[1:])}

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations `(..., sum(obs_dims))` (data units) -> the model's normalized features `(..., obs_dim)`."""
        return (self.features.encode(obs) - self.obs_mean) / self.obs_std

    def unnormalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Normalized features `(..., obs_dim)` -> observations `(..., sum(obs_dims))` (data units)."""
        return self.features.decode(obs * self.obs_std + self.obs_mean)

    def _members(self, x: torch.Tensor, shared_dims: int) -> torch.Tensor:
        """`x` with `shared_dims` dimensions is shared by every member -> `(E, *x.shape)`; one more
        dimension means it already has one entry per member."""
        if x.dim() == shared_dims + 1:
            return x
        return x.unsqueeze(0).expand(self.config.members, *x.shape)

    # ------------------------------------------------------------------ dynamics
    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Observations `(N, H, D)` (or `(E, N, H, D)`, one set per member), data units ->
        latents `(E, N, D + Z)`: the last observation (normalized) and the encoder's features."""
        normalized = self._members(self.normalize_obs(history), 3)
        changes = (normalized[..., 1:, :] - normalized[..., :-1, :]) / self.delta_std
        features = self.encoder(torch.cat([normalized[..., -1, :], changes.flatten(-2)], -1))
        return torch.cat([normalized[..., -1, :], features], -1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents `(..., D + Z)` -> normalized observations `(..., D)` (the observation part)."""
        return latent[..., :self.obs_dim]

    def step(self, latent: torch.Tensor, action: torch.Tensor) -> Prediction:
        """One executed action `(N, Da)` or `(E, N, Da)` (data units) from latents `(E, N, D + Z)`."""
        a = self._members((action - self.action_mean) / self.action_std, 2)
        change = self.transition(torch.cat([latent, a], -1))
        next_latent = latent + torch.cat([change[..., :self.obs_dim] * self.delta_std, change[..., self.obs_dim:]], -1)
        out = self.heads(torch.cat([latent, a, next_latent], -1))
        reward = out[..., 0] * self.reward_std + self.reward_mean
        return Prediction(next_latent, self.decode(next_latent), reward, out[..., 1] + self.success_logit_offset)

    def cut_thresholds(self, scale: float) -> np.ndarray:
        """`(R,)` scale x the reference disagreement at horizons 1..R (a horizon without held-out
        data takes the one before it); raises `WorldModelError` when the model was never calibrated."""
        reference = self.reference_uncertainty.numpy().astype(np.float64)
        if not np.isfinite(reference).any():
            raise WorldModelError("the world model has no reference uncertainty (it was never calibrated on held-out "
                                  "data); train it with `diffpolicy worldmodel train`")
        for k in range(len(reference)):
            if not np.isfinite(reference[k]):
                earlier = reference[:k][np.isfinite(reference[:k])]
                reference[k] = earlier[-1] if len(earlier) else np.nanmin(reference)
        return scale * reference

    @staticmethod
    def disagreement(obs: torch.Tensor) -> torch.Tensor:
        """Members' predictions `(E, N, D)` (normalized) -> `(N,)` the largest over D of the std
        over E (one dimension going astray is enough: an agent's position among many static ones)."""
        return obs.std(0, unbiased=False).amax(-1)

    # ------------------------------------------------------------------ training
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Multi-step prediction loss of a batch of windows, one minibatch per member.

        batch (from `Transitions.windows`, stacked per member): obs_history `(E, B, H, D)`, action
        `(E, B, K, Da)`, next_obs `(E, B, K, D)`, reward, success, step_mask, obs_mask `(E, B, K)`.
        Terms: observation MSE over the K predicted steps (where stored; in units of the one-step
        change std `delta_std`), reward MSE (normalized),
        success cross-entropy of the head's own logit (without b: it fits the windows as sampled; where
        the action exists). Returns (sum, {term: value}).
        """
        latent = self.encode(batch["obs_history"])
        target = self.normalize_obs(batch["next_obs"])
        obs_err, reward_err, success_err = [], [], []
        for k in range(batch["action"].shape[2]):
            pred = self.step(latent, batch["action"][:, :, k])
            obs_err.append(((pred.obs - target[:, :, k]) / self.delta_std).pow(2).mean(-1))
            reward_err.append(((pred.reward - batch["reward"][:, :, k]) / self.reward_std).pow(2))
            success_err.append(F.binary_cross_entropy_with_logits(pred.success_logit - self.success_logit_offset,
                                                                  batch["success"][:, :, k].float(), reduction="none"))
            latent = pred.latent
        obs_mask, step_mask = batch["obs_mask"].float(), batch["step_mask"].float()

        def masked(errors: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
            return (torch.stack(errors, -1) * mask).sum() / mask.sum().clamp_min(1.0)

        terms = {"obs": masked(obs_err, obs_mask), "reward": masked(reward_err, step_mask),
                 "success": masked(success_err, step_mask)}
        return sum(terms.values()), {name: float(value.detach()) for name, value in terms.items()}

    # ------------------------------------------------------------------ checkpoints
    def describe(self) -> dict[str, Any]:
        """The JSON config `load` rebuilds the model from."""
        return {"model": to_dict(self.config), "obs_keys": list(self.obs_keys), "obs_dims": list(self.obs_dims),
                "action_dim": self.action_dim, "action_low": self.action_low.tolist(),
                "action_high": self.action_high.tolist(), "reference_horizon": len(self.reference_uncertainty),
                "success_logit_offset": self.success_logit_offset}

    def save(self, directory: str | os.PathLike) -> None:
        """`model.safetensors` + `config.json` (kind "world_model"), atomically; `metadata` included."""
        save_model(directory, self, self.describe(), KIND, self.metadata)

    @classmethod
    def build(cls, described: dict[str, Any]) -> LatentWorldModel:
        try:
            return cls(from_dict(ModelConfig, described["model"], "model"), tuple(described["obs_keys"]),
                       tuple(described["obs_dims"]), int(described["action_dim"]),
                       np.asarray(described["action_low"]), np.asarray(described["action_high"]),
                       int(described["reference_horizon"]), float(described.get("success_logit_offset", 0.0)))
        except KeyError as err:
            raise WorldModelError(f"world model config.json: key {err} missing; expected model, obs_keys, obs_dims, "
                                  "action_dim, action_low, action_high, reference_horizon") from None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LatentWorldModel:
        """A model written by `save` (verified weights, never unpickled), in eval mode."""
        return load_model(directory, KIND, cls.build)

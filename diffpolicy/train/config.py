"""Typed training configuration: task card + method defaults + `key=value` overrides.

A `TrainConfig` is a tree of dataclasses. It is built in three layers:

1. method defaults (`--policy diffusion|flow`): process, inference steps, network size;
2. the task card: horizons, observation keys, action dimension, dataset path, episode length,
   and the card's optional `train:` mapping of dotted overrides (task-specific tuning), with
   optional `diffusion:` / `flow:` sub-mappings that apply to that method only;
3. command-line overrides `section.key=value` with dotted keys, e.g. `optim.lr=3e-4`,
   `policy.backbone.hidden_dim=256`.

Every layer goes through the package's one config reader (`diffpolicy.config`): an unknown key
fails with the closest known keys, a value of the wrong type or range fails naming the key, what
was expected and the value that came.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffpolicy.config import (
    ConfigError,
    apply_overrides,
    check_float,
    check_int,
    fail,
    from_dict,
    parse_override,
    to_dict,
)
from diffpolicy.envs.tasks import TaskCard, load_task
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.policies.config import PolicyConfig, diffusion_process, flow_process

# ----------------------------------------------------------------------------- the training config


@dataclass(frozen=True)
class DataConfig:
    """Where the demonstrations come from and how they are split.

    path: the zarr ReplayBuffer (default: the card's `dataset.path`).
    val_fraction: share of episodes held out for the validation loss (split by episode).
    max_episodes: use only the first N episodes (None: all).
    split_seed: seed of the train / validation split.
    num_workers: DataLoader worker processes (0: load in the training process).
    image_cache_gb: read the image arrays into memory at the start when all of them together
        (decompressed) fit in this many GiB; else every batch decompresses its frames from the
        store, one zarr chunk per frame (about 1000 PushT-image windows / s per process, which held
        GPU training to ~10 steps / s: docs/RESULTS.md). 0: never.
    """

    path: str = ""
    val_fraction: float = 0.02
    max_episodes: int | None = None
    split_seed: int = 0
    num_workers: int = 0
    image_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise fail("data.val_fraction", "a number in [0, 1)", self.val_fraction)
        if self.max_episodes is not None:
            check_int("data.max_episodes", self.max_episodes, 1)
        check_int("data.num_workers", self.num_workers, 0)
        check_float("data.image_cache_gb", self.image_cache_gb, 0)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up into a cosine decay to 0 (Diffusion Policy's recipe).

    fused: torch's fused AdamW kernel (one pass over all parameters; the same update as the
        per-tensor one up to rounding): 1.6 ms vs 5.3 ms per step for PushT's 1.9M-parameter MLP
        on one CPU core (`python benchmarks/train_speed.py`).
    """

    lr: float = 1e-4
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    fused: bool = True

    def __post_init__(self) -> None:
        check_float("optim.lr", self.lr, 0, strictly=True)
        check_float("optim.weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2:
            raise fail("optim.betas", "two numbers [beta1, beta2]", self.betas)
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        if self.grad_clip is not None:
            check_float("optim.grad_clip", self.grad_clip, 0, strictly=True)


@dataclass(frozen=True)
class LoopConfig:
    """The training loop.

    steps: optimizer steps in total. batch_size: the global batch (split over DDP processes).
    loss_shards: the global batch is cut into this many interleaved shards, each drawing its noise
        from its own generator seeded by (seed, step, shard); a DDP process computes the shards
        of its own samples, so with loss_shards a multiple of the world size the result does not
        depend on the number of processes. 0: one shard per process.
    device: "auto" (GPU when present), "cpu", "cuda", "cuda:1", ...
    bf16: bf16 autocast for the forward pass on a GPU (ignored on CPU).
    cpu_bf16: bf16 autocast for the forward pass on the CPU (off by default; refused on a CPU without
        native bf16 matrix multiplies, `train.precision`, where it would run slower than float32).
    ema_power, ema_max_decay: EMA warm-up (DP: 0.75, 0.9999).
    ema_every: fold the weights into the EMA every this many steps (and at every checkpoint), with
        the skipped steps' decays multiplied in (`nn.ema.EMA.update`): each update is a pass over all
        weights (1.7 ms of the main job's 26 ms step on two CPU threads).
    log_every: steps between loss logs (and one at every checkpoint). checkpoint_every: steps between
        checkpoints (each one evaluated when eval.episodes > 0). keep_top_k: best checkpoints kept
        besides the latest.
    keep_all: keep every checkpoint (for a learning curve evaluated after training).
    num_threads: torch CPU threads (0: torch's default).
    """

    steps: int = 3000
    batch_size: int = 256
    seed: int = 0
    loss_shards: int = 0
    device: str = "auto"
    bf16: bool = True
    cpu_bf16: bool = False
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    ema_every: int = 1
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_top_k: int = 3
    keep_all: bool = False
    num_threads: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("loss_shards", 0), ("ema_every", 1),
                              ("log_every", 1), ("checkpoint_every", 1), ("keep_top_k", 0), ("num_threads", 0)):
            check_int(f"train.{name}", getattr(self, name), minimum)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation at each checkpoint during training (checkpoint selection).

    episodes: episodes per evaluation (0: no evaluation while training).
    seed_start: first seed; kept apart from the demonstration seeds and from the held-out seeds
        of the final evaluation (the card's `eval.seed_start`).
    n_envs: environments stepped together. inference_steps: None = the policy's default.
    """

    episodes: int = 20
    seed_start: int = 200_000
    n_envs: int = 10
    inference_steps: int | None = None

    def __post_init__(self) -> None:
        check_int("eval.episodes", self.episodes, 0)
        check_int("eval.n_envs", self.n_envs, 1)
        if self.inference_steps is not None:
            check_int("eval.inference_steps", self.inference_steps, 1)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved as `config.json` in the run directory."""

    task: str
    method: Literal["diffusion", "flow"]
    policy: PolicyConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.policy.process.type != self.method:
            raise ConfigError(f"config key 'policy.process.type' is {self.policy.process.type!r} but the method "
                              f"(--policy) is {self.method!r}; choose the process with --policy")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        """Inverse of `to_dict`, strict about unknown keys; errors name `where` (e.g. the file)."""
        try:
            return from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), where=str(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- building a config

METHODS = ("diffusion", "flow")
FIXED_KEYS = ("task", "method")  # chosen by --task / --policy, not by overrides

# Small and fast on a 2-core CPU (the README's main job): a residual MLP denoiser, 1.9M parameters,
# about 70 ms per training step of 256 windows and 17 ms per 10-step chunk on one core. Diffusion
# Policy's temporal U-Net (`{type: unet, down_dims: [256, 512, 1024]}`) is the choice on a GPU; its
# smallest useful size is 5-15x slower per step on this CPU.
DEFAULT_BACKBONE: dict[str, Any] = {"type": "mlp", "hidden_dim": 512, "num_blocks": 3, "time_embed_dim": 32,
                                    "activation": "mish"}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # Diffusion Policy: 100-step squared-cosine DDPM training grid, epsilon prediction, clip to
    # [-1, 1]; sampled with 10 strided DDPM steps (eta = 1) instead of 100. Stochastic steps beat
    # deterministic DDIM (eta = 0) on validation seeds: Can 36/40 vs 28/40, PushT 11/50 vs 4/50.
    "diffusion": {"process": diffusion_process(), "inference_steps": 10},
    # Flow matching on continuous t with 20 Euler steps: on PushT (validation seeds) 5 steps gave
    # 31/50 successes, 10 gave 39/50, 20 gave 45/50 with the same checkpoint (README, Imitation).
    "flow": {"process": flow_process(), "inference_steps": 20},
}


def default_policy_config(card: TaskCard, method: str) -> PolicyConfig:
    """The policy for `card` with the defaults of `method` ("diffusion" or "flow")."""
    if method not in METHODS:
        raise ConfigError(f"--policy must be one of {list(METHODS)}, got {method!r}")
    image_keys = [k for k, spec in card.observation.items() if spec.get("dtype") == "uint8"]
    encoder: dict[str, Any] = {}
    if image_keys:  # Diffusion Policy crops 84 of 96 (PushT) / 76 of 84 (robomimic) pixels
        height, width = card.obs_shapes[image_keys[0]][:2]
        encoder["crop_shape"] = [round(height * 0.875), round(width * 0.875)]
    return PolicyConfig(
        obs_shapes=card.obs_shapes,
        action_dim=card.action_dim,
        image_keys=tuple(image_keys),
        obs_horizon=int(card.horizons["obs"]),
        pred_horizon=int(card.horizons["pred"]),
        action_horizon=int(card.horizons["exec"]),
        backbone=dict(DEFAULT_BACKBONE),
        encoder=encoder,
        **METHOD_DEFAULTS[method],
    )


def build_config(task: str | TaskCard, method: str = "diffusion",
                 overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Method defaults, then the task card (and its optional `train:` overrides), then `overrides`."""
    card = task if isinstance(task, TaskCard) else load_task(task)
    config = TrainConfig(task=card.name, method=method, policy=default_policy_config(card, method),
                         data=DataConfig(path=str(card.dataset["path"])))
    card_overrides = card_train_overrides(card, method)
    try:
        config = apply_overrides(config, card_overrides)
    except ConfigError as exc:
        raise ConfigError(f"{card.source}: train: {exc}") from None
    return apply_cli_overrides(config, overrides)


def card_train_overrides(card: TaskCard, method: str) -> dict[str, Any]:
    """The card's `train:` overrides for `method`: its dotted keys, then those of its `<method>:`
    sub-mapping (settings of one method only, e.g. `diffusion: {policy.process.prediction: sample}`)."""
    section = card.extra.get("train") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{card.source}: 'train' must be a mapping of dotted keys to values, "
                          f"got {type(section).__name__}")
    for name in METHODS:
        if name in section and not isinstance(section[name], dict):
            raise ConfigError(f"{card.source}: train: {name!r} must be a mapping of dotted keys to values "
                              f"for --policy {name}, got {type(section[name]).__name__}")
    own = section.get(method, {})
    common = {key: value for key, value in section.items() if key not in METHODS and key not in own}
    return {**common, **own}  # the method's own keys last, also those the common part names too


def apply_cli_overrides(config: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Apply `key=value` command-line overrides; `task` and `method` are refused (use the flags)."""
    for item in overrides:
        key = parse_override(item)[0]
        if key in FIXED_KEYS:
            raise ConfigError(f"config key {key!r} cannot be overridden; use --{'policy' if key == 'method' else key}")
    return apply_overrides(config, list(overrides))


def config_for_run(task: str | TaskCard, method: str, overrides: list[str] | tuple[str, ...], run_dir: str | Path,
                   resume: bool, base_overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config of a run: when resuming a run that saved `config.json`, that config (the task and
    method must agree); otherwise card + method defaults + `base_overrides`. Then `overrides`."""
    saved = Path(run_dir) / "config.json"
    fresh = build_config(task, method, list(base_overrides))
    if not (resume and saved.is_file()):
        return apply_cli_overrides(fresh, overrides)
    config = TrainConfig.load(saved)
    if (fresh.task, fresh.method) != (config.task, config.method):
        raise ConfigError(f"{saved}: the run in {run_dir} trains task {config.task!r} with --policy "
                          f"{config.method}, not {fresh.task!r} with {fresh.method}; resume it with those flags")
    return apply_cli_overrides(config, overrides)

"""Typed training configuration: task card + method defaults + `key=value` overrides.

A `TrainConfig` is a tree of dataclasses. It is built in three layers:

1. method defaults (`--policy diffusion|flow`): process, inference steps, network size;
2. the task card: horizons, observation keys, action dimension, dataset path, episode length,
   and the card's optional `train:` mapping of dotted overrides (task-specific tuning), with
   optional `diffusion:` / `flow:` sub-mappings that apply to that method only;
3. command-line overrides `section.key=value` with dotted keys, e.g. `optim.lr=3e-4`,
   `policy.backbone.hidden_dim=256`.

Every override is validated: an unknown key fails with the closest known keys, a value of the
wrong type fails naming the key, the expected type and the value that came.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffpolicy.envs.tasks import TaskCard, load_task
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.policies.config import PolicyConfig, diffusion_process, flow_process
from diffpolicy.policies.errors import ConfigError

# ----------------------------------------------------------------------------- generic machinery


def flat_keys(obj: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass / dict tree, e.g. `["optim.lr", "train.steps", ...]`."""
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    else:
        return [prefix]
    keys: list[str] = []
    for name, value in items:
        keys.extend(flat_keys(value, f"{prefix}.{name}" if prefix else name))
    return keys


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _fail_type(key: str, tp: Any, text: str) -> ConfigError:
    return ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {text!r}")


def coerce(text: str, tp: Any, key: str) -> Any:
    """Convert the command-line text `text` to the annotated type `tp` of `key`, or fail clearly.

    Supported: bool, int, float, str, `Literal[...]`, `list[X]`, `X | None`, `dict[str, Any]`.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null", "~"):
            return None
        others = [a for a in args if a is not type(None)]
        for option in others:
            try:
                return coerce(text, option, key)
            except ConfigError:
                continue
        raise _fail_type(key, tp, text)
    if origin is Literal:
        for option in args:
            if str(option) == text:
                return option
        raise _fail_type(key, tp, text)
    if tp is bool:
        parsed = yaml.safe_load(text) if text else None
        if isinstance(parsed, bool):
            return parsed
        raise _fail_type(key, tp, text)
    if tp is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)  # scientific notation of a whole number: "1e4"
        except ValueError:
            raise _fail_type(key, tp, text) from None
        if number.is_integer() and "." not in text:
            return int(number)
        raise _fail_type(key, tp, text)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise _fail_type(key, tp, text) from None
    if tp is str:
        return text
    if origin in (list, tuple):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            raise _fail_type(key, tp, text) from None
        if not isinstance(parsed, list):
            raise _fail_type(key, tp, text)
        item_tp = args[0] if args else Any
        return [coerce(json.dumps(v) if not isinstance(v, str) else v, item_tp, key) for v in parsed]
    if origin is dict or tp is Any:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise _fail_type(key, tp, text) from None
    raise ConfigError(f"config key {key!r} has an annotation {tp!r} that overrides do not support")


def _type_of_value(value: Any) -> Any:
    """The type an override must have to replace `value` inside a free-form dict."""
    if value is None:
        return Any
    if isinstance(value, list):
        return list[_type_of_value(value[0])] if value else list
    if isinstance(value, float):
        return float
    return type(value)


def _unknown_key(key: str, root: Any) -> ConfigError:
    known = flat_keys(root)
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    if not close:  # match on the last part, e.g. "lr" -> "optim.lr"
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] in
                 difflib.get_close_matches(last, [q.rsplit(".", 1)[-1] for q in known], n=5, cutoff=0.6)]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _set(obj: Any, parts: list[str], text: str, key: str, root: Any) -> Any:
    """Return a copy of `obj` with the leaf at `parts` set from `text`."""
    name, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(obj):
        names = {f.name for f in dataclasses.fields(obj)}
        if name not in names:
            raise _unknown_key(key, root)
        current = getattr(obj, name)
        hint = typing.get_type_hints(type(obj))[name]
        if rest:
            if not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
                raise _unknown_key(key, root)
            return dataclasses.replace(obj, **{name: _set(current, rest, text, key, root)})
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys: "
                              f"{', '.join(flat_keys(current, key))}")
        return dataclasses.replace(obj, **{name: coerce(text, hint, key)})
    if isinstance(obj, dict):
        if name not in obj:
            raise _unknown_key(key, root)
        current = obj[name]
        if rest:
            if not isinstance(current, dict):
                raise _unknown_key(key, root)
            return {**obj, name: _set(current, rest, text, key, root)}
        return {**obj, name: coerce(text, _type_of_value(current), key)}
    raise _unknown_key(key, root)


def parse_override(item: str) -> tuple[str, str]:
    """Split `"a.b=value"` into `("a.b", "value")`."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    return key.strip(), value.strip()


def apply_overrides(config: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """Return a copy of the dataclass tree `config` with `overrides` applied in order.

    `overrides` is a list of `"dotted.key=value"` strings (values as text, coerced to the
    annotated type) or a mapping `{dotted.key: value}` (values are written back to text first,
    so they are validated the same way).
    """
    items = (list(overrides.items()) if isinstance(overrides, dict)
             else [parse_override(item) for item in overrides])
    for key, value in items:
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            config = _set(config, key.split("."), text, key, config)
        except ConfigError as exc:
            if repr(key) in str(exc):
                raise
            raise ConfigError(f"override {key}={text}: {exc}") from None  # a section's own check
    return config


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build the dataclass `cls` from a nested dict (e.g. a saved `config.json`), strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if hasattr(tp, "from_dict"):  # a section with its own strict reader (PolicyConfig)
            kwargs[name] = tp.from_dict(value)
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------- the training config


@dataclass(frozen=True)
class DataConfig:
    """Where the demonstrations come from and how they are split.

    path: the zarr ReplayBuffer (default: the card's `dataset.path`).
    val_fraction: share of episodes held out for the validation loss (split by episode).
    max_episodes: use only the first N episodes (None: all).
    split_seed: seed of the train / validation split.
    num_workers: DataLoader worker processes (0: load in the training process).
    """

    path: str = ""
    val_fraction: float = 0.02
    max_episodes: int | None = None
    split_seed: int = 0
    num_workers: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up into a cosine decay to 0 (Diffusion Policy's recipe)."""

    lr: float = 1e-4
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    warmup_steps: int = 500
    grad_clip: float | None = 1.0


@dataclass(frozen=True)
class LoopConfig:
    """The training loop.

    steps: optimizer steps in total. batch_size: the global batch (split over DDP processes).
    loss_shards: the global batch is cut into this many interleaved shards, each drawing its noise
        from its own generator seeded by (seed, step, shard); a DDP process computes the shards
        of its own samples, so with loss_shards a multiple of the world size the result does not
        depend on the number of processes. 0: one shard per process.
    device: "auto" (GPU when present), "cpu", "cuda", "cuda:1", ...
    bf16: bf16 autocast for the forward pass (GPU only; ignored on CPU).
    ema_power, ema_max_decay: EMA warm-up (DP: 0.75, 0.9999).
    log_every: steps between loss logs. checkpoint_every: steps between checkpoints (each one
        evaluated when eval.episodes > 0). keep_top_k: best checkpoints kept besides the latest.
    num_threads: torch CPU threads (0: torch's default).
    """

    steps: int = 3000
    batch_size: int = 256
    seed: int = 0
    loss_shards: int = 0
    device: str = "auto"
    bf16: bool = True
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_top_k: int = 3
    num_threads: int = 0


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
        checks = [
            ("train.steps", self.train.steps >= 1), ("train.batch_size", self.train.batch_size >= 1),
            ("train.loss_shards", self.train.loss_shards >= 0), ("train.log_every", self.train.log_every >= 1),
            ("train.checkpoint_every", self.train.checkpoint_every >= 1),
            ("train.keep_top_k", self.train.keep_top_k >= 0), ("optim.lr", self.optim.lr > 0),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0), ("optim.betas", len(self.optim.betas) == 2),
            ("data.val_fraction", 0 <= self.data.val_fraction < 1), ("eval.episodes", self.eval.episodes >= 0),
            ("eval.n_envs", self.eval.n_envs >= 1),
        ]
        if self.policy.process.type != self.method:
            raise ConfigError(f"config key 'policy.process.type' is {self.policy.process.type!r} but the method "
                              f"(--policy) is {self.method!r}; choose the process with --policy")
        for key, ok in checks:
            if not ok:
                section, name = key.split(".")
                raise ConfigError(f"config key {key!r} has an invalid value "
                                  f"{getattr(getattr(self, section), name)!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["policy"] = self.policy.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        """Inverse of `to_dict`, strict about unknown keys."""
        return from_dict(cls, data, where)

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
DEFAULT_BACKBONE: dict[str, Any] = {"type": "mlp", "hidden_dim": 512, "num_blocks": 3, "time_embed_dim": 32}
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

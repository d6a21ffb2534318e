"""Task cards: one YAML file per benchmark task in the top-level `envs/` folder.

A card names the environment and the expert by entry point ("module:Class"), so adding a task is
adding a card; nothing here needs to change. `load_task("pusht")` reads `envs/pusht.yaml`;
`load_task("path/to/card.yaml")` reads that file.

Card fields (see `envs/*.yaml`):
    name, description
    env:         {entry_point: "module:Class", kwargs: {...}}
    observation: {key: {shape: [...], dtype: float32|uint8}, ...}
    action:      {shape: [Da], low: float | [..], high: float | [..]}
    horizons:    {obs: To, pred: Tp, exec: Ta}
    control_hz, max_episode_steps
    success:     {metric: info key, threshold: float | null}
    expert:      {entry_point: "module:Class", kwargs: {...}}
    dataset:     {episodes: N, path: datasets/<name>.zarr, only_success: bool, seed_start: 0,
                  action_noise: 0 (optional; DART noise, see `collection.collect`)}
    eval:        {episodes: N, seed_start: 100000}
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffpolicy.errors import InvalidValueError

CARDS_DIR = Path(os.environ.get("DIFFPOLICY_TASK_CARDS", Path(__file__).resolve().parents[2] / "envs"))
REQUIRED_FIELDS = ("name", "env", "observation", "action", "horizons", "control_hz",
                   "max_episode_steps", "success", "expert", "dataset", "eval")


class TaskCardError(InvalidValueError):
    """A task card is missing, unknown or malformed."""


@dataclass(frozen=True)
class TaskCard:
    """A benchmark task as its YAML card describes it."""

    name: str
    env: dict[str, Any]
    observation: dict[str, dict[str, Any]]
    action: dict[str, Any]
    horizons: dict[str, int]
    control_hz: float
    max_episode_steps: int
    success: dict[str, Any]
    expert: dict[str, Any]
    dataset: dict[str, Any]
    eval: dict[str, Any]
    description: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def action_dim(self) -> int:
        return int(self.action["shape"][0])

    @property
    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(spec["shape"]) for key, spec in self.observation.items()}

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in REQUIRED_FIELDS}
        out["description"] = self.description
        out.update(self.extra)
        return out


def available_tasks() -> list[str]:
    """Names of the task cards in `CARDS_DIR`."""
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_task(name_or_path: str | os.PathLike) -> TaskCard:
    """Read a task card by task name (`envs/<name>.yaml`) or by path to a YAML file."""
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) else CARDS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise TaskCardError(
            f"unknown task {text!r}: no task card at {path}; known tasks: {', '.join(available_tasks())}"
        )
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise TaskCardError(f"{path}: expected a YAML mapping of card fields, got {type(raw).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    if missing:
        raise TaskCardError(f"{path}: task card is missing field(s) {missing}")
    for section in ("env", "expert"):
        if "entry_point" not in raw[section]:
            raise TaskCardError(f"{path}: '{section}' needs an 'entry_point' of the form 'module:Class'")
    known = set(REQUIRED_FIELDS) | {"description"}
    return TaskCard(
        **{f: raw[f] for f in REQUIRED_FIELDS},
        description=raw.get("description", ""),
        source=str(path),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def resolve_entry_point(entry_point: str, where: str) -> Any:
    """Import `module:attr`; `where` names the card field for the error message."""
    module_name, _, attr = entry_point.partition(":")
    if not attr:
        raise TaskCardError(f"{where}: entry point {entry_point!r} is not of the form 'module:Class'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskCardError(f"{where}: cannot import {entry_point!r}: {exc}") from exc


def make_env(card: TaskCard, **overrides: Any):
    """Build the card's environment, wrapped in a TimeLimit of `max_episode_steps`.

    `overrides` update the card's env kwargs (e.g. `obs_type="image"`, `render_mode="rgb_array"`).
    """
    from gymnasium.wrappers import TimeLimit

    env_cls = resolve_entry_point(card.env["entry_point"], f"{card.source}: env.entry_point")
    kwargs = {**card.env.get("kwargs", {}), **overrides}
    return TimeLimit(env_cls(**kwargs), max_episode_steps=int(card.max_episode_steps))


def make_expert(card: TaskCard, env):
    """Build the card's expert for `env`: an object with `reset(seed)` and `act(obs) -> action`."""
    expert_cls = resolve_entry_point(card.expert["entry_point"], f"{card.source}: expert.entry_point")
    return expert_cls(env, **card.expert.get("kwargs", {}))

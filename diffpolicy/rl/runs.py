"""Read back a fine-tuning run directory for plotting: its curves and the settings it ran with.

    run = read_run("runs/finetune_pusht_dppo")
    run.column("eval_success")   # (env_steps, values) where the column is filled
    run.column("eval_return", x="dream_steps")   # a dream's curve against imagined steps
    run.algo, run.config["eval_seed_start"], run.config["eval_episodes"]

The settings come from the run's latest checkpoint (`checkpoints/step_*/state/state.json`, DPPO and
flow PPO) or `sb3/state.json` (DSRL); a directory holding only `curves.csv` (e.g. a baseline that
logs through `rl.curves.Curves`) reads with `algo` None and an empty config.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffpolicy.errors import InvalidValueError, MissingFileError
from diffpolicy.rl.curves import COLUMNS
from diffpolicy.train.checkpoints import STATE_DIR, STATE_JSON, latest_checkpoint


@dataclass
class FinetuneRun:
    """One run: `rows` of `curves.csv` (values as floats, None where empty), its algorithm and
    config as saved (None / {} when the directory records none)."""

    path: Path
    rows: list[dict[str, float | None]]
    algo: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def column(self, name: str, x: str = "env_steps") -> tuple[np.ndarray, np.ndarray]:
        """`(x (n,), values (n,))` over the rows where `name` is filled; x: the steps column, e.g.
        "dream_steps" for a run in a world model (its env_steps count real steps only)."""
        for column in (name, x):
            if column not in COLUMNS:
                raise InvalidValueError(f"FinetuneRun.column: unknown column {column!r}; expected one of {COLUMNS}")
        points = [(r[x], r[name]) for r in self.rows if r[name] is not None]
        steps, values = zip(*points) if points else ((), ())
        return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def read_run(run_dir: str | Path) -> FinetuneRun:
    """Read `run_dir/curves.csv` and the run's saved settings."""
    path = Path(run_dir)
    csv_path = path / "curves.csv"
    if not csv_path.is_file():
        raise MissingFileError(f"{csv_path}: no curves; expected the --out directory of a `diffpolicy finetune` run")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"iteration", "env_steps"} - set(reader.fieldnames or ())
        if missing:
            raise InvalidValueError(f"{csv_path}: columns {sorted(missing)} missing; expected a header with {COLUMNS}")
        rows = [{name: (float(row[name]) if row.get(name) not in ("", None) else None) for name in COLUMNS}
                for row in reader]
    algo, config = _settings(path)
    return FinetuneRun(path, rows, algo, config)


def _settings(path: Path) -> tuple[str | None, dict[str, Any]]:
    latest = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if latest is not None and (latest / STATE_DIR / STATE_JSON).is_file():
        meta = json.loads((latest / STATE_DIR / STATE_JSON).read_text())
        return meta.get("algo"), dict(meta.get("config", {}))
    if (path / "sb3" / "state.json").is_file():
        return "dsrl", dict(json.loads((path / "sb3" / "state.json").read_text()).get("config", {}))
    return None, {}

"""Learning curves of a fine-tuning run: `curves.csv` (rewritten atomically), `curves.png`
(success and return vs environment steps, or vs imagined steps for a run in a world model) and
TensorBoard scalars under `tensorboard/`."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from diffpolicy.errors import MissingKeyError
from diffpolicy.fsutil import atomic_write_text

COLUMNS = ("iteration", "env_steps", "cpu_s", "train_return", "train_success", "train_episodes",
           "eval_return", "eval_success", "eval_steps", "eval_env_steps",
           "policy_loss", "value_loss", "ratio", "clip_fraction", "approx_kl", "updates", "first_ratio_error", "noise_std", "bc_loss",
           "dream_steps", "cut_fraction", "disagreement", "world_model_loss")


class Curves:
    """Rows of `COLUMNS` (missing values empty), one per iteration; on resume the rows after the
    restored iteration are dropped (they are recomputed bit-exactly). `x`: the column plotted along
    the x axis and used as TensorBoard's step."""

    def __init__(self, run_dir: str | Path, resume_iteration: int = 0, x: str = "env_steps") -> None:
        if x not in COLUMNS:
            raise MissingKeyError(f"Curves: x axis {x!r} is not a column; expected one of {COLUMNS}")
        self.run_dir, self.x = Path(run_dir), x
        self.csv_path, self.png_path = self.run_dir / "curves.csv", self.run_dir / "curves.png"
        self.rows: list[dict[str, Any]] = []
        if resume_iteration > 0 and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_iteration]
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_iteration + 1)

    def log(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise MissingKeyError(f"Curves.log: unknown columns {sorted(unknown)}; expected {COLUMNS}")
        self.rows.append({c: row.get(c, "") for c in COLUMNS})
        for name, value in row.items():
            if name not in ("iteration", self.x) and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(name, value, global_step=int(row[self.x]))
        self.writer.flush()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, out.getvalue())
        self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, metric in zip(axes, ("success", "return")):
            for source in ("train", "eval"):
                points = [(float(r[self.x]), float(r[f"{source}_{metric}"])) for r in self.rows
                          if r[f"{source}_{metric}"] not in ("", None)]
                if points:
                    ax.plot(*zip(*points), marker="o" if source == "eval" else None, label=source)
            ax.set_xlabel("imagined steps" if self.x == "dream_steps" else "environment steps")
            ax.set_ylabel(metric)
            ax.legend()
        fig.tight_layout()
        tmp = self.png_path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        tmp.replace(self.png_path)

    def close(self) -> None:
        self.writer.close()

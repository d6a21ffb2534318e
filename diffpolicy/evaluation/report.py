"""A short Markdown report of a run: metrics table, learning-curve plot, links to rollout videos.

The learning curve is read from the trainer's `log.jsonl` (one JSON object per line: training
rows `{"step", "loss", "lr"}` and evaluation rows `{"step", "eval/success_rate", ...}`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffpolicy.fsutil import atomic_write_text


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a `log.jsonl`; a torn last line (killed writer) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_learning_curve(rows: list[dict[str, Any]], png_path: str | os.PathLike) -> Path | None:
    """Training loss (log scale) and, when present, evaluation success/score against step.

    Returns the PNG path, or None when the log has no training rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval/success_rate"], r.get("eval/mean_coverage")) for r in rows
             if "eval/success_rate" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(*zip(*train), color="tab:blue", lw=1.0, label="training loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        steps, rates, coverage = zip(*evals)
        ax2.plot(steps, rates, "o-", color="tab:green", label="eval success rate")
        if all(c is not None for c in coverage):
            ax2.plot(steps, coverage, "s--", color="tab:orange", label="eval mean coverage")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("evaluation")
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(out_dir: str | os.PathLike, *, title: str, summary: dict[str, Any],
                 log_path: str | os.PathLike | None = None, videos: Sequence[str | os.PathLike] = (),
                 notes: Sequence[str] = ()) -> Path:
    """Write `out_dir/report.md` (and `learning_curve.png` when a log is given); return its path.

    Args:
        summary: the evaluation summary (`evaluation.rollout.summarize` output) plus any extra
            `{name: value}` rows to show in the metrics table.
        videos: mp4 paths, linked relative to `out_dir`.
        notes: free lines (e.g. the exact commands) listed under the table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    sr = summary.get("success_rate")
    if isinstance(sr, dict):
        lines.append(f"| success rate (95 % Wilson CI) | {sr['rate']:.3f} "
                     f"[{sr['ci95_low']:.3f}, {sr['ci95_high']:.3f}] ({sr['successes']}/{sr['n']}) |")
    for key, value in summary.items():
        if key != "success_rate" and not isinstance(value, (dict, list)):
            lines.append(f"| {key} | {_fmt(value)} |")
    lines.append("")
    if log_path is not None and Path(log_path).is_file():
        png = plot_learning_curve(read_log(log_path), out_dir / "learning_curve.png")
        if png is not None:
            lines += ["## Learning curve", "", f"![learning curve]({png.name})", ""]
    if videos:
        lines += ["## Rollout videos", ""]
        lines += [f"- [{Path(v).name}]({os.path.relpath(v, out_dir)})" for v in videos]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path

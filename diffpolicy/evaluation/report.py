"""A short Markdown report of a run: metrics table, learning-curve plot, links to rollout videos.

The learning curve is read from the trainer's `log.jsonl` (one JSON object per line: training
rows `{"step", "loss", "lr"}` and evaluation rows `{"step", "eval/success_rate", ...}`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffpolicy.fsutil import atomic_write_text, read_jsonl


def plot_learning_curve(rows: list[dict[str, Any]], png_path: str | os.PathLike) -> Path | None:
    """Training loss (log scale) and, when present, evaluation success/score against step.

    Returns the PNG path, or None when the log has no training rows.
    """
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval/success_rate"], r.get("eval/mean_coverage")) for r in rows
             if "eval/success_rate" in r]
    if not train:
        return None
    fig, ax = _figure()
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
    return _save(fig, png_path)


def plot_success_curve(points: Sequence[tuple[float, dict[str, Any]]], png_path: str | os.PathLike,
                       xlabel: str = "training CPU-minutes", target: float | None = None) -> Path:
    """Success rate with its 95 % Wilson interval against `x`: `points` are `(x, success_rate)` with
    `success_rate` as `summarize` gives it (`rate`, `ci95_low`, `ci95_high`); `target` draws a line."""
    return plot_success_curves([("success (95 % CI)", points)], png_path, xlabel, target)


def plot_success_curves(series: Sequence[tuple[str, Sequence[tuple[float, dict[str, Any]]]]],
                        png_path: str | os.PathLike, xlabel: str = "training CPU-minutes",
                        target: float | None = None) -> Path:
    """Several labelled success curves on one plot: `series` are `(label, points)`, each point as in
    `plot_success_curve`."""
    fig, ax = _figure()
    for label, points in series:
        xs = [x for x, _ in points]
        rates = [r["rate"] for _, r in points]
        errors = [[r["rate"] - r["ci95_low"] for _, r in points], [r["ci95_high"] - r["rate"] for _, r in points]]
        color = "tab:green" if len(series) == 1 else None
        ax.errorbar(xs, rates, yerr=errors, fmt="o-", color=color, capsize=3, label=label)
    if target is not None:
        ax.axhline(target, color="tab:red", ls="--", lw=1.0, label=f"target {target:.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, png_path)


def _figure(figsize: tuple[float, float] = (6.4, 3.6)):
    """A new matplotlib figure and axes on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=100)


def _save(fig, png_path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG (parents created) and close it."""
    import matplotlib.pyplot as plt

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
                 notes: Sequence[str] = (), figures: Sequence[tuple[str, str | os.PathLike]] = ()) -> Path:
    """Write `out_dir/report.md` (and `learning_curve.png` when a log is given); return its path.

    Args:
        summary: the evaluation summary (`evaluation.rollout.summarize` output) plus any extra
            `{name: value}` rows to show in the metrics table.
        videos: mp4 paths, linked relative to `out_dir`.
        notes: free lines (e.g. the exact commands) listed under the table.
        figures: `(title, png path)` sections shown after the learning curve.
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
        png = plot_learning_curve(read_jsonl(log_path), out_dir / "learning_curve.png")
        if png is not None:
            lines += ["## Learning curve", "", f"![learning curve]({png.name})", ""]
    for title, png_path in figures:
        lines += [f"## {title}", "", f"![{title}]({os.path.relpath(png_path, out_dir)})", ""]
    if videos:
        lines += ["## Rollout videos", ""]
        lines += [f"- [{Path(v).name}]({os.path.relpath(v, out_dir)})" for v in videos]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path

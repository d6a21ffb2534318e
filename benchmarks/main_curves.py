"""Held-out success vs training CPU-minutes of several `diffpolicy main` runs, on one plot.

Each run directory holds the main job's `summary.json` (its `curve`: every kept checkpoint's success
on the held-out seeds and the training CPU-minutes spent to reach it). Prints one table row per run
(method, steps, the first checkpoint at or above the target and its CPU-minutes, the final one) and
writes the curves with their 95 % Wilson intervals to `--out`:

    python benchmarks/main_curves.py runs/main runs/main_flow --labels "diffusion 32k" "flow 32k" \
        --out docs/images/main_job_cpu_minutes.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_curve(run: Path) -> dict:
    """The main job's summary of `run` (`summary.json`), with its `curve` sorted by step."""
    path = run / "summary.json"
    if not path.is_file():
        raise SystemExit(f"main_curves: {path} not found (expected a `diffpolicy main --out {run}` run)")
    summary = json.loads(path.read_text())
    summary["curve"] = sorted(summary["curve"], key=lambda point: point["step"])
    return summary


def first_at_target(curve: list[dict], target: float) -> dict | None:
    """The first checkpoint whose held-out success rate is at least `target`, or None."""
    return next((point for point in curve if point["success_rate"]["rate"] >= target), None)


def table(runs: list[tuple[str, dict]], target: float) -> list[str]:
    rows = [f"| run | method | steps | first checkpoint >= {target:.0%} (training CPU-min) | final success | "
            f"final training CPU-min |", "|---|---|---|---|---|---|"]
    for label, summary in runs:
        curve = summary["curve"]
        hit = first_at_target(curve, target)
        final = curve[-1]
        reached = (f"{hit['step'] // 1000}k steps ({hit['cpu_minutes']:.1f})" if hit
                   else "not reached")
        rate = final["success_rate"]
        rows.append(f"| {label} | {summary['method']} | {final['step']} | {reached} | "
                    f"{rate['successes']}/{rate['n']} | {final['cpu_minutes']:.1f} |")
    return rows


def plot(runs: list[tuple[str, dict]], target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for label, summary in runs:
        curve = summary["curve"]
        xs = [point["cpu_minutes"] for point in curve]
        rates = [point["success_rate"] for point in curve]
        errors = [[r["rate"] - r["ci95_low"] for r in rates], [r["ci95_high"] - r["rate"] for r in rates]]
        ax.errorbar(xs, [r["rate"] for r in rates], yerr=errors, fmt="o-", capsize=3, label=label)
    ax.axhline(target, color="tab:red", ls="--", lw=1.0, label=f"target {target:.2f}")
    ax.set_xlabel("training CPU-minutes")
    ax.set_ylabel("held-out success rate (100 seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`diffpolicy main --out` directories")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the paths)")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("runs/main_curves.png"))
    args = parser.parse_args()
    labels = args.labels or [str(run) for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"main_curves: {len(args.runs)} runs but {len(labels)} labels")
    runs = [(label, load_curve(run)) for label, run in zip(labels, args.runs)]
    print("\n".join(table(runs, args.target)))
    plot(runs, args.target, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()

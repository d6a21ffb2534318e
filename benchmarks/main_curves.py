"""Held-out success vs training CPU-minutes of several `diffpolicy main` runs, on one plot.

Each run directory holds the main job's `summary.json` (its `curve`: every kept checkpoint's success
on the held-out seeds and the training CPU-minutes spent to reach it). Prints one table row per run
(method, steps, the first checkpoint at or above the target and its CPU-minutes, the final one) and
writes the curves with their 95 % Wilson intervals to `--out` (`evaluation.report.plot_success_curves`):

    python benchmarks/main_curves.py runs/main runs/main_flow --labels "diffusion 32k" "flow 32k" \
        --out docs/images/main_job_cpu_minutes.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffpolicy.evaluation.report import plot_success_curves


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
    plot_success_curves([(label, [(point["cpu_minutes"], point["success_rate"]) for point in summary["curve"]])
                         for label, summary in runs], args.out, target=args.target)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()

"""One plot of several dream runs' in-run held-out return (or success) against imagined steps, with
reference levels (e.g. the imitation start and the model-free run's final) as dashed lines.

    python benchmarks/dream_curves.py runs/s22/k20_p0 runs/s22/k20_bc --labels "k20" "k20 + BC" \
        --reference "BC start=1001" --reference "model-free final=2000" --out docs/images/hopper_dreams.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffpolicy.rl.runs import read_run  # noqa: E402


def reference(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--reference: expected NAME=VALUE, got {text!r}")
    return name, float(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="`diffpolicy finetune --algo dream` output directories")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    parser.add_argument("--metric", choices=["return", "success"], default="return")
    parser.add_argument("--reference", type=reference, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args()
    labels = args.labels or [Path(run).name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run_dir, label in zip(args.runs, labels):
        steps, values = read_run(run_dir).column(f"eval_{args.metric}", x="dream_steps")
        ax.plot(steps / 1e6, values, marker="o", ms=3, label=label)
    for name, value in args.reference:
        ax.axhline(value, color="gray", ls="--", lw=1)
        ax.annotate(name, (0, value), xytext=(2, 2), textcoords="offset points", fontsize=8, color="gray")
    ax.set(xlabel="imagined steps (millions)", ylabel=f"held-out {args.metric} (in-run validation)", title=args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

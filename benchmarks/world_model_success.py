"""The success classifiers of world models on fresh episodes: precision and recall vs horizon.

    python benchmarks/world_model_success.py --data runs/wm_success/fresh.zarr \
        --models runs/wm_success/f0 runs/wm_success/f0.25 --horizons 1 8 32

Every window of the fresh store (none of them trained on) is rolled open loop with its executed
actions (`worldmodel.heldout.heldout_errors`, pooled over horizons 1..K); a step counts as predicted
successful where the members' mean success probability exceeds 0.5, as in imagination. Prints one
Markdown table: per model and K, the positives, precision, recall and accuracy. `--uncorrected` adds
rows with the model's success logit offset set to 0: the oversampled head as trained, before its
prior-shift correction back to the data's success rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.heldout import heldout_errors
from diffpolicy.worldmodel.model import LatentWorldModel
from diffpolicy.worldmodel.training import resolve_world_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="fresh replay buffers (not trained on)")
    parser.add_argument("--models", nargs="+", required=True, help="world-model runs or model directories")
    parser.add_argument("--horizons", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--uncorrected", action="store_true", help="also score every model without its logit offset")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | success_fraction | success logit offset | K | positives | precision | recall | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.models:
        model = LatentWorldModel.load(resolve_world_model_dir(run))
        data = Transitions.load(args.data, model.obs_keys)
        fraction = model.metadata.get("train", {}).get("success_fraction", 0.0)
        offsets = [model.success_logit_offset] + ([0.0] if args.uncorrected and model.success_logit_offset else [])
        for offset in offsets:
            model.success_logit_offset = offset
            for horizon in args.horizons:
                with torch.no_grad():
                    report = heldout_errors(model, data, horizon, max_windows=data.n_steps)
                print(f"| {Path(run).name} | {fraction} | {offset:.2f} | {horizon} | {report['success_positives']} | "
                      f"{report['success_precision']:.2f} | {report['success_recall']:.2f} | "
                      f"{report['success_accuracy']:.4f} |", flush=True)
    print(f"\n{json.dumps({'data': args.data, 'steps': data.n_steps, 'successes': int(data.success.sum())})}")


if __name__ == "__main__":
    main()

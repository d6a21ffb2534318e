"""The BC regulariser of DPPO and flow PPO (`bc_coef`), measured on the tests' tiny task.

`tests/rl_tasks.py`'s PointReach: the demonstrations aim at a biased goal, so the behaviour-cloned
policy never succeeds and RL must move the fine-tuned copy away from the demonstrations to reach
the true goal. For every algorithm, `--coefs` value of `bc_coef` and `--seeds` run seed, one
fine-tuning run of `--env-steps` environment steps (the tests' settings), then:
  - the copy's imitation loss on every demonstration window (mean of 20 fixed noise / level draws),
  - held-out success and mean return on `--eval-episodes` seeds from 100000 (the saved sampler),
  - the run's process CPU time.
Writes `<out>/finetune_bc.json` and `<out>/finetune_bc.md` (means over seeds, per algorithm and coefficient).

    python benchmarks/finetune_bc.py --out runs/finetune_bc --env-steps 2400 --seeds 0 1 2 --coefs 0 0.3 1 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np
import torch
from rl_tasks import make_bc_policy, make_env, write_demonstrations

from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.evaluation.rollout import rollout
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.rl import dppo, flow_ppo
from diffpolicy.train.trainer import to_device, window_dataset

SMALL = {"n_envs": 8, "n_steps": 6, "batch_size": 16, "epochs": 4, "eval_episodes": 2, "eval_every": 0}
ALGOS = {  # the settings of tests/test_rl_finetune.py
    "dppo": (dppo, "diffusion", 5, dppo.DPPOConfig(lr=3e-4, finetune_steps=3, clip_start=0.05, clip_end=0.2, **SMALL)),
    "flowppo": (flow_ppo, "flow", 4, flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.2, std_min=0.05, std_max=0.3,
                                                            log_prob_per_dim=False, **SMALL)),
}


def imitation_loss(policy, store: str) -> float:
    """The fine-tuned copy's denoising loss on every demonstration window (20 fixed draws)."""
    windows = window_dataset(ReplayBuffer.open(store, cache_low_dim=True), None, policy.config)
    batch = to_device(windows.batch(np.arange(len(windows))), torch.device("cpu"))
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(np.mean([float(policy.compute_loss(batch, generator, finetuned=True)) for _ in range(20)]))


def held_out(policy, episodes: int) -> tuple[float, float]:
    results, _ = rollout(policy, make_env, list(range(100000, 100000 + episodes)), n_envs=8)
    return float(np.mean([e.success for e in results])), float(np.mean([e.episode_return for e in results]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--algos", nargs="*", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--coefs", nargs="*", type=float, default=[0.0, 0.3, 1.0, 3.0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=2400)
    parser.add_argument("--eval-episodes", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "demos.zarr")
    if not Path(store).exists():
        write_demonstrations(store)
    rows = []
    for algo in args.algos:
        module, kind, steps, config = ALGOS[algo]
        start = make_bc_policy(kind, inference_steps=steps)
        start.start_finetuning(config.finetune_steps or steps)
        if kind == "diffusion":
            start.set_sampling(eta=config.eval_eta)
        success, ret = held_out(start, args.eval_episodes)
        rows.append({"algo": algo, "bc_coef": None, "seed": None, "imitation_loss": imitation_loss(start, store),
                     "success": success, "return": ret, "cpu_s": 0.0})
        print(rows[-1], flush=True)
        for coef in args.coefs:
            for seed in args.seeds:
                run = dataclasses.replace(config, env_steps=args.env_steps, seed=seed, bc_coef=coef,
                                          bc_data=store if coef else None)
                run_dir = out / f"{algo}_bc{coef:g}_seed{seed}"
                cpu = time.process_time()
                result = module.finetune(make_bc_policy(kind, inference_steps=steps), make_env, run, run_dir,
                                         progress=False)
                cpu = time.process_time() - cpu
                success, ret = held_out(result.policy, args.eval_episodes)
                rows.append({"algo": algo, "bc_coef": coef, "seed": seed,
                             "imitation_loss": imitation_loss(result.policy, store), "success": success,
                             "return": ret, "cpu_s": round(cpu, 1)})
                print(rows[-1], flush=True)
    atomic_write_text(out / "finetune_bc.json", json.dumps(rows, indent=1))
    lines = ["| algorithm | bc_coef | copy's imitation loss on the demos | held-out success | held-out return | "
             "CPU s per run |", "|---|---|---|---|---|---|"]
    for algo in args.algos:
        for coef in [None, *args.coefs]:
            group = [r for r in rows if r["algo"] == algo and r["bc_coef"] == coef]
            label = "imitation start" if coef is None else f"{coef:g}"
            mean = {k: float(np.mean([r[k] for r in group])) for k in ("imitation_loss", "success", "return", "cpu_s")}
            lines.append(f"| {algo} | {label} | {mean['imitation_loss']:.3f} | {mean['success']:.2f} | "
                         f"{mean['return']:.2f} | {mean['cpu_s']:.0f} |")
    atomic_write_text(out / "finetune_bc.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""`diffpolicy main`: the README's main job, end to end on the embedded default task (PushT, state).

    diffpolicy main                      # diffusion; writes runs/main/report.md
    diffpolicy main --policy flow --out runs/main_flow

1. collect 3000 DART demonstrations (the expert acting through small action noise, below) into the
   main job's store (`datasets/pusht_dart.zarr`; resumes it; a store already holding more is reused
   for its first 3000; `--action-noise 0` collects clean ones into the card's `datasets/pusht.zarr`),
2. train a chunk policy with the CPU budget defaults below (`runs/main/train`; resumes), keeping a
   checkpoint at every quarter of the run,
3. evaluate the final checkpoint on the card's held-out seeds (100000, ...) with a rollout video, and
   the earlier checkpoints on the same seeds for the learning curve (no checkpoint is selected: the
   final one ships, so the held-out seeds stay held out),
4. write `runs/main/report.md` (metrics table, loss curve, held-out success vs training CPU-minutes,
   video link) and print the summary.

Interrupted at any point, the same command continues: collection skips seeds already attempted,
training resumes its latest checkpoint, evaluation and the report are redone (they are short).
The defaults fit the whole job into 20 minutes on a 2-core CPU (docs/RESULTS.md, "Main job").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from diffpolicy.collection.collect import collect, expert_success_on, recipe_settings
from diffpolicy.collection.episodes import available_cpus
from diffpolicy.envs.tasks import load_task
from diffpolicy.evaluation.latency import chunk_latency_ms
from diffpolicy.evaluation.report import plot_success_curve, write_report
from diffpolicy.evaluation.rollout import evaluate, score_policy
from diffpolicy.fsutil import read_jsonl
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import read_index, resolve_policy_dir
from diffpolicy.train.config import METHODS, config_for_run
from diffpolicy.train.precision import native_cpu_bf16
from diffpolicy.train.trainer import train

TASK = "pusht"
# CPU-budget training on top of the method defaults (`train.config.METHOD_DEFAULTS`) and the card's
# `train:` settings (PushT: diffusion predicts the clean chunk), each measured in docs/RESULTS.md
# ("Main job"): STEPS steps of 256 windows on both cores (two torch threads: the simulator is idle
# while training), SiLU instead of Mish and the fused AdamW (1.4x the steps per second, `python
# benchmarks/train_speed.py`), bf16 autocast where the CPU multiplies bf16 natively (1.5x more on two
# threads; elsewhere float32, the same steps taking longer), a lean step (no gradient clipping: the
# gradient norm stays below 0.16 from the first step, against a limit of 1; the EMA folded in every 4
# steps: 22.6 vs 24.5 ms a step), a short warm-up and a larger learning rate than Diffusion Policy's 1e-4
# (a short run), no checkpoint selection (eval.episodes=0: selecting on a few seeds picked worse
# checkpoints than the last), every quarter's checkpoint kept for the learning curve.
STEPS = 36000
BUDGET_OVERRIDES = [f"train.steps={STEPS}", "train.batch_size=256", "optim.lr=1e-3", "optim.warmup_steps=200",
                    "optim.grad_clip=null", "train.ema_every=4", f"train.checkpoint_every={STEPS // 4}",
                    "train.keep_all=true", "train.log_every=200", "eval.episodes=0", "train.device=cpu",
                    "train.num_threads=2", "policy.backbone.hidden_dim=512", "policy.backbone.activation=silu",
                    *(["train.cpu_bf16=true"] if native_cpu_bf16() else [])]
# Each method trains only on the levels its sampler visits (t = k / N for its N inference steps:
# diffusion's 10 DDPM steps, flow's 20 Euler steps) instead of the card's 100-level grid (diffusion)
# or continuous time (flow). docs/RESULTS.md, "Main job": diffusion 90.6 % vs 88.1 % over three runs
# each, held-out and validation seeds pooled (a small gain inside the spread between runs); flow
# 150 vs 104 of 200 validation episodes (one run each).
METHOD_OVERRIDES = {"diffusion": ["policy.process.train_steps=10"], "flow": ["policy.process.train_steps=20"]}


def budget_overrides(method: str) -> list[str]:
    """The main job's training settings for `method` on top of the card's recipe."""
    return [*BUDGET_OVERRIDES, *METHOD_OVERRIDES[method]]


# 3000 demonstrations (the card's): with 1000 the network memorizes them by 16k steps (validation loss
# flat at 0.0067 while the training loss falls to 0.0025) and held-out success stays at 82-90; with 3000
# the validation loss still falls at 32k (0.0027) and so does the held-out success curve.
DEMOS = 3000

# DART demonstrations (Laskey et al. 2017): the env executes the expert's action plus N(0, sigma^2) noise,
# sigma = ACTION_NOISE of the action half-range (0.02: 5 px), and the store records the expert's own
# action, so the data show the expert correcting small errors near its path. The policy's failures are
# near misses of the final alignment (coverage 0.90-0.95 after the full 300 steps), the states that
# correction covers. docs/RESULTS.md, "Main job": validation success of the job's training on three seeds,
# clean vs DART; 0.05 was worse than clean (episodes 40 % longer, 3 % of them failed).
ACTION_NOISE = 0.02
DART_DATASET = "datasets/pusht_dart.zarr"


# PushT environments stepped together in the evaluation: all 100 held-out episodes at once. Started
# together, the environments replan at the same ticks and one batched inference serves them all; with 10,
# each reset shifts an environment's replanning ticks and the calls fragment (536 calls for 40 episodes
# against 38). 100 held-out episodes on one thread: 10.2 s with 100 environments, 41.3 s with 10
# (docs/RESULTS.md, "Main job").
EVAL_ENVS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", choices=METHODS, default="diffusion", help="generative process (default: diffusion)")
    parser.add_argument("--out", default="runs/main", help="output directory (default: runs/main)")
    parser.add_argument("--demos", type=int, default=DEMOS,
                        help=f"demonstrations to collect and train on (default: {DEMOS})")
    parser.add_argument("--action-noise", type=float, default=ACTION_NOISE, metavar="SIGMA",
                        help=f"DART noise of the demonstrations as a fraction of the action half-range "
                             f"(default: {ACTION_NOISE}; 0: the card's clean expert)")
    parser.add_argument("--dataset", default=None,
                        help=f"dataset store (default: {DART_DATASET}; with --action-noise 0 the card's dataset.path)")
    parser.add_argument("--eval-episodes", type=int, default=None, help="held-out episodes (default: the card's)")
    parser.add_argument("--videos", type=int, default=1, help="rollout videos in the report (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    try:
        card = load_task(TASK)
        dataset = Path(args.dataset or (DART_DATASET if args.action_noise else card.dataset["path"]))
        demos = args.demos
        noise = f" (DART action noise {args.action_noise})" if args.action_noise else ""
        print(f"[1/4] collecting {demos} {card.name} demonstrations{noise} into {dataset}", flush=True)
        collect(card, episodes=demos, out=dataset, progress=not args.no_progress, workers=available_cpus(),
                **{**recipe_settings(card), "action_noise": args.action_noise})
        seconds["collect"] = time.perf_counter() - started

        run_dir = out / "train"
        resume = (run_dir / "checkpoints" / "index.json").is_file()
        config = config_for_run(card, args.policy, args.overrides, run_dir, resume,
                                base_overrides=[*budget_overrides(args.policy), f"data.path={dataset}",
                                                f"data.max_episodes={demos}"])
        print(f"[2/4] training {args.policy} for {config.train.steps} steps into {run_dir}"
              + (" (resuming)" if resume else ""), flush=True)
        mark = time.perf_counter()
        result = train(config, run_dir, resume=resume, progress=not args.no_progress, card=card,
                       scorer=score_policy)
        seconds["train"] = time.perf_counter() - mark

        episodes = args.eval_episodes if args.eval_episodes is not None else int(card.eval["episodes"])
        seed = int(card.eval["seed_start"])
        policy_dir = resolve_policy_dir(result.latest)
        print(f"[3/4] evaluating {policy_dir} (and the earlier checkpoints for the curve) on {episodes} held-out "
              f"seeds from {seed}", flush=True)
        mark = time.perf_counter()
        curve, final = held_out_curve(run_dir, episodes, seed, videos=min(args.videos, episodes),
                                      out_dir=out / "eval")
        seconds["evaluate"] = time.perf_counter() - mark
    except KeyboardInterrupt:
        print("diffpolicy main: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130

    torch.set_num_threads(1)  # batch-1 latency, as a robot's controller would run it
    policy = ChunkPolicy.from_pretrained(policy_dir)
    chunk_ms = chunk_latency_ms(policy, _first_history(dataset, policy))
    seconds["total"] = time.perf_counter() - started
    successes, attempted = expert_success_on(dataset, demos)
    summary = {
        **final["summary"],
        "expert success (demonstration seeds)": f"{successes}/{attempted}",
        "demonstration action noise (DART)": args.action_noise,
        "method": args.policy,
        "demonstrations": demos,
        "training steps": result.step,
        "training CPU-minutes": round(curve[-1]["cpu_minutes"], 1),
        "checkpoint": str(policy_dir),
        "inference ms / chunk (batch 1)": round(chunk_ms, 1),
        **{f"seconds: {k}": round(v, 1) for k, v in seconds.items()},
        "curve": curve,
    }
    command = "diffpolicy main " + " ".join([f"--policy {args.policy}", f"--out {out}",
                                             f"--action-noise {args.action_noise}", *args.overrides])
    png = plot_success_curve([(point["cpu_minutes"], point["success_rate"]) for point in curve],
                             out / "held_out_success.png", target=0.9)
    report = write_report(out, title=f"diffpolicy main: {card.name} ({args.policy})", summary=summary,
                          log_path=run_dir / "log.jsonl", videos=final["videos"],
                          figures=[("Held-out success vs training CPU-minutes", png)],
                          notes=[f"command: `{command}`",
                                 f"evaluation: `diffpolicy eval --checkpoint {policy_dir} --episodes {episodes} "
                                 f"--seed {seed}`",
                                 "the final checkpoint ships; earlier ones are evaluated on the same held-out "
                                 "seeds for the curve only (nothing is selected on them)",
                                 "success = coverage of the goal above 0.95 at any step; coverage = best over "
                                 "the episode"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rate = final["summary"]["success_rate"]
    print(f"[4/4] report: {report}")
    print(f"{card.name} {args.policy}: success {rate['rate']:.3f} [{rate['ci95_low']:.3f}, {rate['ci95_high']:.3f}] "
          f"({rate['successes']}/{rate['n']}), mean coverage {final['summary'].get('mean_coverage', float('nan')):.3f}, "
          f"{chunk_ms:.1f} ms per chunk, total {seconds['total'] / 60:.1f} min")
    return 0


def held_out_curve(run_dir: Path, episodes: int, seed: int, videos: int, out_dir: Path) -> tuple[list[dict], dict]:
    """Held-out success of every kept checkpoint against the training time spent to reach it.

    Returns the curve `[{"step", "cpu_minutes", "wall_minutes", "success_rate"}]` by step and the
    final checkpoint's evaluation `{"summary", "videos"}` (its results and `videos` rollout videos
    under `out_dir`). The checkpoints are evaluated two at a time in worker processes of one torch
    thread each, each with up to `EVAL_ENVS` environments stepped together: a batch of 10 observations
    is too small for two threads (10 PushT episodes took 2.5 s on one thread, 7.2 s on two, while
    another job ran).
    """
    times = {row["step"]: row for row in read_jsonl(run_dir / "log.jsonl") if "cpu_s" in row}
    entries = read_index(run_dir / "checkpoints")["checkpoints"]
    final_step = entries[-1]["step"]
    jobs = [(str(run_dir / "checkpoints" / entry["name"] / "policy"), episodes, seed,
             videos if entry["step"] == final_step else 0, str(out_dir) if entry["step"] == final_step else None)
            for entry in entries]
    with ProcessPoolExecutor(max_workers=min(2, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_evaluate_checkpoint, *zip(*jobs)))
    curve = []
    for entry, (summary, _) in zip(entries, results):
        clock = times.get(entry["step"], {"cpu_s": float("nan"), "wall_s": float("nan")})
        curve.append({"step": entry["step"], "cpu_minutes": clock["cpu_s"] / 60, "wall_minutes": clock["wall_s"] / 60,
                      "success_rate": summary["success_rate"]})
    summary, video_paths = results[-1]
    return curve, {"summary": summary, "videos": [Path(v) for v in video_paths]}


def _evaluate_checkpoint(policy_dir: str, episodes: int, seed: int, videos: int,
                         out_dir: str | None) -> tuple[dict, list[str]]:
    """One checkpoint on the held-out seeds (a worker process, one torch thread): summary, videos."""
    torch.set_num_threads(1)
    policy = ChunkPolicy.from_pretrained(policy_dir)
    evaluation = evaluate(policy, load_task(TASK), episodes=episodes, seed_start=seed,
                          n_envs=EVAL_ENVS, videos=videos, out_dir=out_dir)
    return evaluation.summary, [str(v) for v in evaluation.videos]


def _first_history(dataset: Path, policy: ChunkPolicy) -> dict[str, np.ndarray]:
    """The first To observations of the first demonstration, `{key: (To, ...)}`."""
    from diffpolicy.data.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.open(dataset)
    steps = policy.config.obs_horizon
    return {key: np.asarray(buffer[key][0:steps]) for key in policy.config.obs_shapes}

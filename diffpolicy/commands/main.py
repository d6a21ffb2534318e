"""`diffpolicy main`: the README's main job, end to end on the embedded default task (PushT, state).

    diffpolicy main                      # diffusion; writes runs/main/report.md
    diffpolicy main --policy flow --out runs/main_flow

1. collect 200 expert demonstrations into the card's store (`datasets/pusht.zarr`; resumes it; a store
   already holding more, such as the card's 3000-episode benchmark recipe, is reused for its first 200),
2. train a chunk policy with the CPU budget defaults below (`runs/main/train`; resumes),
3. evaluate the best checkpoint on the card's held-out seeds (100000, ...) with a rollout video,
4. write `runs/main/report.md` (metrics table, learning curve, video link) and print the summary.

Interrupted at any point, the same command continues: collection skips seeds already attempted,
training resumes its latest checkpoint, evaluation and the report are redone (they are short).
The defaults fit the whole job into 20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffpolicy.collection.collect import collect, recipe_settings
from diffpolicy.collection.episodes import available_cpus
from diffpolicy.envs.tasks import load_task
from diffpolicy.evaluation.latency import chunk_latency_ms
from diffpolicy.evaluation.report import write_report
from diffpolicy.evaluation.rollout import evaluate, score_policy
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.train.config import METHODS, config_for_run
from diffpolicy.train.trainer import train

TASK = "pusht"
# CPU-budget training on top of the method defaults (`train.config.METHOD_DEFAULTS`) and the card's
# `train:` settings (PushT: diffusion predicts the clean chunk): 10k steps of
# 256 windows (about 12 min on one core), a short warm-up and a larger learning rate than Diffusion
# Policy's 1e-4 (a short run), 4 checkpoints each evaluated on 20 selection seeds (200000, ...).
# The network stays 512 wide for both methods (the card's flow recipe widens it to 768, which trains
# half as fast), and the job uses 200 demonstrations (the card's benchmark recipe collects 3000,
# about 6 min of the budget).
# One torch thread: on 2 cores shared with the simulator or anything else, two intra-op threads
# oversubscribe the CPU and run up to 10x slower; one thread loses little on this small network.
BUDGET_OVERRIDES = ["train.steps=10000", "train.batch_size=256", "optim.lr=1e-3", "optim.warmup_steps=200",
                    "train.checkpoint_every=2500", "train.log_every=100", "eval.episodes=20", "train.device=cpu",
                    "train.num_threads=1", "policy.backbone.hidden_dim=512"]
DEMOS = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", choices=METHODS, default="diffusion", help="generative process (default: diffusion)")
    parser.add_argument("--out", default="runs/main", help="output directory (default: runs/main)")
    parser.add_argument("--demos", type=int, default=DEMOS,
                        help=f"demonstrations to collect and train on (default: {DEMOS})")
    parser.add_argument("--dataset", default=None, help="dataset store (default: the card's dataset.path)")
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
        dataset = Path(args.dataset or card.dataset["path"])
        demos = args.demos
        print(f"[1/4] collecting {demos} {card.name} demonstrations into {dataset}", flush=True)
        collected = collect(card, episodes=demos, out=dataset, progress=not args.no_progress,
                            workers=available_cpus(), **recipe_settings(card))
        seconds["collect"] = time.perf_counter() - started

        run_dir = out / "train"
        resume = (run_dir / "checkpoints" / "index.json").is_file()
        config = config_for_run(card, args.policy, args.overrides, run_dir, resume,
                                base_overrides=[*BUDGET_OVERRIDES, f"data.path={dataset}",
                                                f"data.max_episodes={demos}"])
        print(f"[2/4] training {args.policy} for {config.train.steps} steps into {run_dir}"
              + (" (resuming)" if resume else ""), flush=True)
        mark = time.perf_counter()
        result = train(config, run_dir, resume=resume, progress=not args.no_progress, card=card,
                       scorer=score_policy)
        seconds["train"] = time.perf_counter() - mark

        policy_dir = resolve_policy_dir(run_dir)
        policy = ChunkPolicy.from_pretrained(policy_dir)
        episodes = args.eval_episodes if args.eval_episodes is not None else int(card.eval["episodes"])
        seed = int(card.eval["seed_start"])
        print(f"[3/4] evaluating {policy_dir} on {episodes} held-out seeds from {seed}", flush=True)
        mark = time.perf_counter()
        evaluation = evaluate(policy, card, episodes=episodes, seed_start=seed, n_envs=10,
                              videos=min(args.videos, episodes), out_dir=out / "eval", progress=not args.no_progress)
        seconds["evaluate"] = time.perf_counter() - mark
    except KeyboardInterrupt:
        print("diffpolicy main: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130

    chunk_ms = chunk_latency_ms(policy, _first_history(dataset, policy))
    seconds["total"] = time.perf_counter() - started
    summary = {
        **evaluation.summary,
        "expert success (demonstration seeds)": f"{collected.successes}/{collected.attempted}",
        "method": args.policy,
        "demonstrations": demos,
        "training steps": result.step,
        "checkpoint": str(policy_dir),
        "inference ms / chunk (batch 1)": round(chunk_ms, 1),
        **{f"seconds: {k}": round(v, 1) for k, v in seconds.items()},
    }
    command = "diffpolicy main " + " ".join([f"--policy {args.policy}", f"--out {out}", *args.overrides])
    report = write_report(out, title=f"diffpolicy main: {card.name} ({args.policy})", summary=summary,
                          log_path=run_dir / "log.jsonl", videos=evaluation.videos,
                          notes=[f"command: `{command}`",
                                 f"evaluation: `diffpolicy eval --checkpoint {policy_dir} --episodes {episodes} "
                                 f"--seed {seed}`",
                                 "success = coverage of the goal above 0.95 at any step; coverage = best over "
                                 "the episode"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rate = evaluation.summary["success_rate"]
    print(f"[4/4] report: {report}")
    print(f"{card.name} {args.policy}: success {rate['rate']:.3f} [{rate['ci95_low']:.3f}, {rate['ci95_high']:.3f}] "
          f"({rate['successes']}/{rate['n']}), mean coverage {evaluation.summary.get('mean_coverage', float('nan')):.3f}, "
          f"{chunk_ms:.1f} ms per chunk, total {seconds['total'] / 60:.1f} min")
    return 0


def _first_history(dataset: Path, policy: ChunkPolicy) -> dict[str, np.ndarray]:
    """The first To observations of the first demonstration, `{key: (To, ...)}`."""
    from diffpolicy.data.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.open(dataset)
    steps = policy.config.obs_horizon
    return {key: np.asarray(buffer[key][0:steps]) for key in policy.config.obs_shapes}

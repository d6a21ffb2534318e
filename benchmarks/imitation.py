"""Imitation benchmark: collect -> train -> evaluate on held-out seeds, against the task's expert.

For each method (diffusion, flow) on one task card:
  1. the card's expert fills the dataset with `--episodes-demo` demonstrations (an existing store is
     reused and only extended; training uses its first `--episodes-demo` episodes);
  2. `diffpolicy train` runs in-process into `<out>/<task>_<method>` (resumed when a checkpoint is
     there) on this CPU with `--threads` torch threads; no evaluation while training, so the final
     EMA checkpoint is the one evaluated (no checkpoint selection on any seed);
  3. the final policy runs `--eval-episodes` episodes on held-out seeds `--eval-seed ...`
     (default: the card's `eval.seed_start`, 100 000) with `--inference-steps` denoising steps per
     chunk and, for diffusion, `--eta` (defaults: the checkpoint's), and the expert runs the very
     same seeds (`benchmarks/experts.py`'s episode loop);
  4. inference latency: median wall ms of `policy.sample` for one observation (batch 1, the same
     denoising steps) over `--latency-repeats` calls after warm-up.

Table (printed, and written to `<out>/<task>_imitation.{json,md}`; it also lists methods benchmarked
for the task by earlier calls with the same `--out`, from `<out>/<task>_<method>_result.json`):
  task, method, demos, train steps, inference steps, policy success [95 % Wilson],
  expert success [95 % Wilson], ratio policy / expert, target ratio (PushT and Lift 0.9, Can 0.8;
  Square: reported as is), met? (ratio >= target), training wall and process CPU time, ms per chunk
  (target <= 80 ms).

Every stage resumes: the dataset is extended, not rebuilt; training continues from the latest
checkpoint; evaluation results are cached under `--out`, the policy's by checkpoint, seeds and
sampling settings, the expert's per seed (`<task>_expert_outcomes.json`, dropped when the expert's
code or card changes).
Training time is the sum of the wall time of every training session of the run (`train_time.json`).

    python benchmarks/imitation.py --task lift --episodes-demo 150 --train-steps 8000 --set optim.lr=3e-4 \
        --set 'policy.backbone={type: mlp, hidden_dim: 512, num_blocks: 3, time_embed_dim: 32}'
    python benchmarks/imitation.py --task pusht --methods flow --eval-episodes 100
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffpolicy.collection.collect import collect, recipe_settings  # noqa: E402
from diffpolicy.envs.tasks import TaskCard, load_task, make_env, make_expert  # noqa: E402
from diffpolicy.evaluation.latency import chunk_latency_ms  # noqa: E402
from diffpolicy.evaluation.rollout import evaluate  # noqa: E402
from diffpolicy.evaluation.stats import SuccessRate, success_rate  # noqa: E402
from diffpolicy.fsutil import atomic_write_text  # noqa: E402
from diffpolicy.policies import ChunkPolicy, PolicyConfig  # noqa: E402
from diffpolicy.train.checkpoints import CheckpointManager, resolve_policy_dir  # noqa: E402
from diffpolicy.train.config import METHODS, config_for_run  # noqa: E402
from diffpolicy.train.trainer import train  # noqa: E402

TARGET_RATIO = {"pusht": 0.9, "lift": 0.9, "can": 0.8}  # the policy / expert targets
LATENCY_TARGET_MS = 80.0


def _load_experts_benchmark():
    """`benchmarks/experts.py` as a module (benchmarks/ is not a package)."""
    path = Path(__file__).with_name("experts.py")
    spec = importlib.util.spec_from_file_location("benchmarks_experts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1))


def rate_from_dict(d: dict[str, Any]) -> SuccessRate:
    return SuccessRate(successes=d["successes"], n=d["n"], rate=d["rate"], low=d["ci95_low"], high=d["ci95_high"])


# ----------------------------------------------------------------------------- stages


def ensure_dataset(card: TaskCard, episodes: int, path: Path) -> None:
    """Extend (or create) the store at `path` until it holds `episodes` expert episodes."""
    summary = collect(card, episodes=episodes, out=path, progress=sys.stderr.isatty(), **recipe_settings(card))
    print(f"dataset {path}: {summary.episodes} episodes ({summary.new_episodes} new, {summary.seconds:.0f} s)",
          flush=True)


def train_run(card: TaskCard, method: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train (or resume) `run_dir` to its configured steps; returns `{"steps", "seconds", "cpu_seconds",
    "sessions"}`.

    The wall time and the process CPU time of every session that advanced the run are appended to
    `run_dir/train_time.json` (also when interrupted), so the totals are what this run took on this
    machine. CPU time does not grow while other jobs hold the cores; it is None when a session did
    not record it.
    """
    times_path = run_dir / "train_time.json"
    sessions = read_json(times_path) or []
    checkpoints = run_dir / "checkpoints"
    resume = checkpoints.is_dir() and CheckpointManager(checkpoints).latest() is not None
    config = config_for_run(card, method, overrides, run_dir, resume)

    def done_steps() -> int:
        index = CheckpointManager(checkpoints).read_index() if checkpoints.is_dir() else {"checkpoints": []}
        return max((int(c["step"]) for c in index["checkpoints"]), default=0)

    start_step = done_steps()
    if start_step < config.train.steps:
        print(f"train {run_dir}: steps {start_step} -> {config.train.steps}", flush=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            train(config, run_dir, resume=resume, progress=sys.stderr.isatty(), card=card)
        finally:
            end_step = done_steps()
            if end_step > start_step:
                sessions.append({"from_step": start_step, "to_step": end_step,
                                 "seconds": time.perf_counter() - start,
                                 "cpu_seconds": time.process_time() - start_cpu,
                                 "threads": torch.get_num_threads()})
                write_json(times_path, sessions)
    cpu = [s.get("cpu_seconds") for s in sessions]
    return {"steps": done_steps(), "seconds": sum(s["seconds"] for s in sessions),
            "cpu_seconds": None if None in cpu else sum(cpu), "sessions": len(sessions)}


def sampling_suffix(trained: PolicyConfig, sampled: PolicyConfig) -> str:
    """Evaluation-directory suffix naming the sampling settings that differ from the checkpoint's
    (`""` when none do, so results cached before these options existed stay valid)."""
    suffix = "" if sampled.inference_steps == trained.inference_steps else f"_steps{sampled.inference_steps}"
    return suffix + ("" if sampled.process == trained.process else f"_eta{sampled.process.eta:g}")


def evaluate_policy(policy: ChunkPolicy, card: TaskCard, out_dir: Path, episodes: int, seed: int,
                    n_envs: int) -> SuccessRate:
    """Success of `policy` (with its sampling settings) on seeds `seed .. seed + episodes - 1` (cached in
    `out_dir/summary.json`)."""
    summary = read_json(out_dir / "summary.json")
    if summary is None:
        print(f"evaluate {out_dir} ({episodes} episodes from seed {seed}, "
              f"{policy.config.inference_steps} inference steps)", flush=True)
        summary = evaluate(policy, card, episodes=episodes, seed_start=seed, n_envs=n_envs, out_dir=out_dir,
                           progress=sys.stderr.isatty()).summary
    return rate_from_dict(summary["success_rate"])


def expert_fingerprint(card: TaskCard, expert: Any) -> str:
    """The card's expert entry point and kwargs plus a hash of its module's source: a cached outcome
    is reused only while all three are unchanged."""
    source = Path(inspect.getfile(type(expert))).read_bytes()
    spec = json.dumps({"entry_point": card.expert["entry_point"], "kwargs": card.expert.get("kwargs", {}),
                       "env": card.env}, sort_keys=True)
    return hashlib.sha256(spec.encode() + source).hexdigest()[:16]


def evaluate_expert(card: TaskCard, path: Path, episodes: int, seed: int) -> SuccessRate:
    """The card's expert on the same seeds as the policies (outcomes cached per seed in `path`)."""
    run_expert = _load_experts_benchmark().run_expert
    env = make_env(card)
    try:
        expert = make_expert(card, env)
        fingerprint = expert_fingerprint(card, expert)
        cache = read_json(path)
        outcomes: dict[str, bool] = cache["outcomes"] if cache and cache["fingerprint"] == fingerprint else {}
        seeds = [s for s in range(seed, seed + episodes) if str(s) not in outcomes]
        if seeds:
            print(f"expert {card.name}: {len(seeds)} episodes from seed {seeds[0]}", flush=True)
        try:
            for i, s in enumerate(seeds):
                outcomes[str(s)] = bool(run_expert(env, expert, s)[0])
                if (i + 1) % 10 == 0:
                    write_json(path, {"fingerprint": fingerprint, "outcomes": outcomes})
        finally:
            write_json(path, {"fingerprint": fingerprint, "outcomes": outcomes})
    finally:
        env.close()
    return success_rate([outcomes[str(s)] for s in range(seed, seed + episodes)])


def first_observation_latency_ms(policy: ChunkPolicy, card: TaskCard, seed: int, repeats: int) -> float:
    """`chunk_latency_ms` for the env's first observation at `seed`, repeated over the To history."""
    env = make_env(card)
    try:
        obs, _ = env.reset(seed=seed)
    finally:
        env.close()
    to = policy.config.obs_horizon
    history = {k: np.stack([obs[k]] * to) for k in policy.config.obs_shapes}
    return chunk_latency_ms(policy, history, repeats=repeats, warmup=5, seed=seed)


# ----------------------------------------------------------------------------- table


COLUMNS = ("task", "method", "demos", "train steps", "inference steps", "policy success [95% CI]",
           "expert success [95% CI]", "ratio", "target", "met?", "train wall / CPU", "ms/chunk")


def _fmt_rate(r: SuccessRate) -> str:
    return f"{r.rate:.2f} [{r.low:.2f}, {r.high:.2f}] ({r.successes}/{r.n})"


def _fmt_train_time(r: dict[str, Any]) -> str:
    cpu = r.get("train_cpu_seconds")
    return f"{r['train_seconds'] / 60:.1f} / " + ("?" if cpu is None else f"{cpu / 60:.1f}") + " min"


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        policy, expert = rate_from_dict(r["policy_success"]), rate_from_dict(r["expert_success"])
        ratio, target = r["ratio"], r["target_ratio"]
        met = "n/a" if target is None or ratio is None else ("yes" if ratio >= target else "no")
        rows.append([r["task"], r["method"], str(r["demos"]), str(r["train_steps"]),
                     str(r["inference_steps"]), _fmt_rate(policy),
                     _fmt_rate(expert), "n/a" if ratio is None else f"{ratio:.2f}",
                     "as is" if target is None else f"{target:.2f}", met, _fmt_train_time(r),
                     f"{r['ms_per_chunk']:.1f}"])
    return rows


def format_table(results: list[dict[str, Any]]) -> str:
    rows = table_rows(results)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="task card name or path (envs/<task>.yaml)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--episodes-demo", type=int, default=None, help="demonstrations (card: dataset.episodes)")
    parser.add_argument("--dataset", default=None, help="zarr store (card: dataset.path)")
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps (config default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override for every method (repeatable), e.g. optim.lr=3e-4")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--eval-seed", type=int, default=None, help="first held-out seed (card: eval.seed_start)")
    parser.add_argument("--inference-steps", type=int, default=None,
                        help="denoising steps per chunk in evaluation and latency (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, default=None,
                        help="diffusion only: DDIM stochasticity in evaluation and latency (default: the checkpoint's)")
    parser.add_argument("--n-envs", type=int, default=10, help="environments stepped together in evaluation")
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for training and inference")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args(argv)
    for name in ("episodes_demo", "train_steps", "eval_episodes", "inference_steps", "n_envs", "latency_repeats",
                 "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        parser.error(f"--eta must be in [0, 1], got {args.eta}")

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's kill ends a session like Ctrl-C: timing kept
    card = load_task(args.task)
    demos = args.episodes_demo or int(card.dataset["episodes"])
    dataset = Path(args.dataset or card.dataset["path"])
    eval_seed = int(card.eval["seed_start"]) if args.eval_seed is None else args.eval_seed
    if eval_seed < 100_000:
        print(f"warning: --eval-seed {eval_seed} < 100000 overlaps the demonstration seed range", file=sys.stderr)
    out = Path(args.out)
    overrides = [f"data.path={dataset}", f"data.max_episodes={demos}", "eval.episodes=0", "train.device=cpu",
                 f"train.num_threads={args.threads}"]
    overrides += [f"train.steps={args.train_steps}"] if args.train_steps else []
    overrides += args.overrides

    ensure_dataset(card, demos, dataset)
    expert = evaluate_expert(card, out / f"{card.name}_expert_outcomes.json", args.eval_episodes, eval_seed)
    results = []
    for method in args.methods:
        run_dir = out / f"{card.name}_{method}"
        try:
            timing = train_run(card, method, run_dir, overrides)
        except KeyboardInterrupt:
            print(f"interrupted; rerun the same command to resume {run_dir}", file=sys.stderr)
            return 130
        policy_dir = resolve_policy_dir(run_dir)
        policy = ChunkPolicy.from_pretrained(policy_dir)
        trained = policy.config
        policy.set_sampling(inference_steps=args.inference_steps, eta=args.eta if method == "diffusion" else None)
        eval_dir = (f"{policy_dir.parent.name}_seed{eval_seed}_n{args.eval_episodes}"
                    + sampling_suffix(trained, policy.config))
        policy_rate = evaluate_policy(policy, card, run_dir / "eval" / eval_dir, args.eval_episodes, eval_seed,
                                      args.n_envs)
        latency = first_observation_latency_ms(policy, card, eval_seed, args.latency_repeats)
        ratio = policy_rate.rate / expert.rate if expert.rate > 0 else None
        results.append({
            "task": card.name, "method": method, "demos": demos, "train_steps": timing["steps"],
            "checkpoint": str(policy_dir), "eval_seeds": f"{eval_seed}..{eval_seed + args.eval_episodes - 1}",
            "policy_success": policy_rate.to_dict(), "expert_success": expert.to_dict(), "ratio": ratio,
            "target_ratio": TARGET_RATIO.get(card.name), "train_seconds": timing["seconds"],
            "train_cpu_seconds": timing["cpu_seconds"],
            "train_sessions": timing["sessions"], "threads": args.threads,
            "inference_steps": policy.config.inference_steps, "eta": policy.config.process.eta,
            "ms_per_chunk": latency,
            "latency_target_ms": LATENCY_TARGET_MS,
        })
        write_json(out / f"{card.name}_{method}_result.json", results[-1])

    # the table holds every method benchmarked for this task under --out, this call's and earlier ones
    ran = {r["method"] for r in results}
    earlier = [read_json(out / f"{card.name}_{m}_result.json") for m in METHODS if m not in ran]
    results = sorted(results + [r for r in earlier if r is not None], key=lambda r: METHODS.index(r["method"]))
    print(format_table(results))
    print(f"train wall / CPU: wall time and process CPU time of training with {args.threads} torch thread(s); "
          f"ms/chunk: median policy.sample at batch 1 (target <= {LATENCY_TARGET_MS:.0f} ms)")
    write_json(out / f"{card.name}_imitation.json", {"command": sys.argv, "results": results})
    (out / f"{card.name}_imitation.md").write_text(markdown_table(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""World-model benchmark: real environment steps needed to reach the model-free run's final success,
dream fine-tuning (DPPO / flow PPO inside a learned world model) vs model-free DPPO / flow PPO.

Stages (each cached under `--out`, rerun the same command to resume; all through the command line):
  1. `demos`: `diffpolicy collect` of `--demos` expert demonstrations (the card's recipe);
  2. `bc`: `diffpolicy train` of a deliberately brief imitation policy on them (`--bc-steps`);
  3. `play`: `diffpolicy collect --action-noise --play-noise` of `--play-episodes` noisy-expert episodes
     (every one kept) and `rollouts`: `diffpolicy worldmodel collect` of `--rollout-episodes` of the
     imitation policy's own episodes: the world model's data, **counted as real steps** of the dream;
  4. `world_model`: `diffpolicy worldmodel train` on play + rollouts (`--wm-steps`);
  5. `model_free`: `diffpolicy finetune --algo dppo|flowppo` for `--mf-steps` real steps;
  6. `dream`: `diffpolicy finetune --algo dream` for `--dream-steps` imagined steps, no real step;
     `mixed` (with `--mixed-real-steps`): the same with that real budget refreshing the world model;
  7. every final policy (latest checkpoint, no selection) on `--eval-episodes` held-out seeds.
The demonstrations are shared by every run and not counted. Every fine-tuning run uses the
AbsorbingSuccess reward. Writes `<out>/world_model_<task>.{json,md,png}`: one table (run, real
steps, imagined steps, held-out success and return, CPU s, real steps to reach the model-free run's
final success on its in-run evaluations) and one plot (in-run held-out success vs real steps;
the dream runs also vs imagined steps).

    python benchmarks/world_model.py --task pusht --out runs/wm_bench --demos 100 --bc-steps 3000 \
        --play-episodes 100 --rollout-episodes 50 --wm-steps 5000 --mf-steps 150000 --dream-steps 300000
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from finetune import cpu_seconds, evaluate_chunk_policy  # benchmarks/finetune.py

from diffpolicy.cli import main as cli_main
from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.policies import ChunkPolicy
from diffpolicy.rl.rewards import absorbing_success_env
from diffpolicy.train.checkpoints import CheckpointManager, resolve_policy_dir


def run(command: list[str]) -> None:
    print("+ diffpolicy " + " ".join(command), flush=True)
    if cli_main(command) != 0:
        raise SystemExit(f"stage failed: diffpolicy {' '.join(command)}")


def steps_in(store: Path) -> int:
    with ReplayBuffer.open(store) as buffer:
        return buffer.n_steps


def in_run_curve(run_dir: Path, x: str) -> list[list[float]]:
    """[[x, eval_success, env_steps], ...] of a fine-tuning run's in-run held-out evaluations."""
    with open(run_dir / "curves.csv", newline="") as f:
        return [[float(r[x]), float(r["eval_success"]), float(r["env_steps"])] for r in csv.DictReader(f)
                if r["eval_success"]]


def first_reaching(curve: list[list[float]], target: float, offset: float) -> float | None:
    """Real steps (offset + the run's own) at the first in-run evaluation with success >= target."""
    return next((offset + env_steps for _, success, env_steps in curve if success >= target), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--out", required=True)
    parser.add_argument("--policy", choices=["diffusion", "flow"], default="diffusion")
    parser.add_argument("--demos", type=int, default=100)
    parser.add_argument("--bc-steps", type=int, default=3000)
    parser.add_argument("--play-episodes", type=int, default=100)
    parser.add_argument("--play-noise", type=float, default=0.1)
    parser.add_argument("--rollout-episodes", type=int, default=50)
    parser.add_argument("--wm-steps", type=int, default=5000)
    parser.add_argument("--mf-steps", type=int, default=150_000)
    parser.add_argument("--dream-steps", type=int, default=300_000)
    parser.add_argument("--mixed-real-steps", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--eval-seed", type=int, default=100_000)
    parser.add_argument("--set", action="append", default=[], metavar="STAGE:key=value",
                        help="an override for one stage: bc:, wm:, model_free:, dream: (the dream runs' "
                             "algorithm and dream.* keys), e.g. model_free:lr=3e-5")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = load_task(args.task)
    algo = "dppo" if args.policy == "diffusion" else "flowppo"

    def sets(stage: str) -> list[str]:
        return [item.split(":", 1)[1] for item in args.set if item.startswith(f"{stage}:")]

    results_path = out / f"world_model_{card.name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save() -> None:
        atomic_write_text(results_path, json.dumps(results, indent=1))

    # 1-4: data, imitation start, world model (each command resumes or is skipped when done)
    demos, play, rollouts = out / "demos.zarr", out / "play.zarr", out / "rollouts.zarr"
    run(["collect", "--task", args.task, "--episodes", str(args.demos), "--out", str(demos), "--no-progress"])
    bc = out / "bc"
    if not (bc / "checkpoints").exists() or "bc_done" not in results:
        run(["train", "--task", args.task, "--policy", args.policy, "--out", str(bc), "--no-progress",
             *(["--resume"] if (bc / "checkpoints").exists() else []), f"data.path={demos}",
             f"train.steps={args.bc_steps}", "eval.episodes=0", *sets("bc")])
        results["bc_done"] = True
        save()
    run(["collect", "--task", args.task, "--episodes", str(args.play_episodes), "--out", str(play),
         "--action-noise", str(args.play_noise), "--no-only-success", "--no-progress"])
    run(["worldmodel", "collect", "--task", args.task, "--checkpoint", str(bc), "--episodes",
         str(args.rollout_episodes), "--out", str(rollouts), "--no-progress"])
    data_steps = steps_in(play) + steps_in(rollouts)
    wm = out / "world_model"
    if "world_model" not in results:
        start = cpu_seconds()
        run(["worldmodel", "train", "--task", args.task, "--data", str(play), str(rollouts), "--out", str(wm),
             "--no-progress", *(["--resume"] if (wm / "checkpoints").exists() else []),
             f"train.steps={args.wm_steps}", *sets("wm")])
        results["world_model"] = {**json.loads((wm / "report.json").read_text()), "cpu_s": cpu_seconds() - start}
        save()

    env_fn = functools.partial(absorbing_success_env, functools.partial(make_env, card), card.max_episode_steps)
    seeds = list(range(args.eval_seed, args.eval_seed + args.eval_episodes))
    if "bc" not in results:
        policy = ChunkPolicy.from_pretrained(resolve_policy_dir(bc))
        if policy.config.process.type == "diffusion":
            policy.set_sampling(eta=0.0)  # DPPO's evaluation sampler
        results["bc"] = {**evaluate_chunk_policy(policy, env_fn, seeds), "real_steps": 0, "dream_steps": 0}
        save()

    # 5-6: fine-tuning runs
    common = ["--checkpoint", str(bc), "--task", args.task, "--absorbing-success", "--no-progress"]
    runs = {"model_free": ["--algo", algo, "--env-steps", str(args.mf_steps), *sets("model_free")],
            "dream": ["--algo", "dream", "--world-model", str(wm), "--env-steps", str(args.dream_steps), *sets("dream")]}
    if args.mixed_real_steps:
        runs["mixed"] = [*runs["dream"], f"dream.real_steps={args.mixed_real_steps}"]
    for name, command in runs.items():
        if name in results:
            continue
        run_dir = out / name
        start = cpu_seconds()
        run(["finetune", *command, *common, "--out", str(run_dir),
             *(["--resume"] if (run_dir / "checkpoints").exists() else [])])
        policy = ChunkPolicy.from_pretrained(CheckpointManager(run_dir / "checkpoints").latest() / "policy")
        dreamt = name != "model_free"
        curve = in_run_curve(run_dir, "dream_steps" if dreamt else "env_steps")
        with open(run_dir / "curves.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
        results[name] = {**evaluate_chunk_policy(policy, env_fn, seeds),
                         "real_steps": (data_steps if dreamt else 0) + int(float(last["env_steps"])),
                         "dream_steps": int(float(last["dream_steps"])) if dreamt else 0,
                         "cpu_s": float(last["cpu_s"]), "wall_cpu_s": cpu_seconds() - start, "curve": curve}
        save()

    write_outputs(results, card.name, out, args, data_steps)
    return 0


def write_outputs(results: dict, task: str, out: Path, args, data_steps: int) -> None:
    model_free = results["model_free"]
    target = model_free["curve"][-1][1] if model_free["curve"] else None
    reach = {"model_free": first_reaching(model_free["curve"], target, 0) if target is not None else None}
    for name in ("dream", "mixed"):
        if name in results and target is not None:
            reach[name] = first_reaching(results[name]["curve"], target, data_steps)
    lines = [f"| {task} run | real env steps (world-model data included) | imagined steps | held-out success "
             f"({args.eval_episodes} seeds from {args.eval_seed}) | mean return | real steps to reach the model-free "
             f"final in-run success ({target}) | process CPU s |", "|---|---|---|---|---|---|---|"]
    for name in ("bc", "model_free", "dream", "mixed"):
        if name not in results:
            continue
        r = results[name]
        reached = reach.get(name)
        lines.append(f"| {name} | {r['real_steps']} | {r['dream_steps']} | {r['success']}/{r['episodes']} | "
                     f"{r['mean_return']:.1f} | {'-' if name == 'bc' else (reached if reached is not None else 'not reached')} "
                     f"| {r.get('cpu_s', 0):.0f} |")
    table = "\n".join(lines)
    results["reach"] = reach
    atomic_write_text(out / f"world_model_{task}.md", table + "\n")
    atomic_write_text(out / f"world_model_{task}.json", json.dumps(results, indent=1))
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bc = results["bc"]
    for ax in (left, right):
        ax.axhline(bc["success"] / bc["episodes"], color="gray", linestyle="--", label="imitation start")
        ax.set_ylabel("in-run held-out success")
    left.plot([c[2] for c in model_free["curve"]], [c[1] for c in model_free["curve"]], marker="o", label="model-free")
    for name in ("dream", "mixed"):
        if name in results:
            curve = results[name]["curve"]
            left.plot([data_steps + c[2] for c in curve], [c[1] for c in curve], marker="s", linestyle="none", label=name)
            right.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=name)
    left.set_xlabel("real environment steps (world-model data included)")
    right.set_xlabel("imagined environment steps")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(out / f"world_model_{task}.png", dpi=80)


if __name__ == "__main__":
    sys.exit(main())

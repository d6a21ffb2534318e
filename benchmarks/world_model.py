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

`--toy` measures the same question on the tests' point-reaching task (`tests/rl_tasks.py`: the
imitation policy is biased and never succeeds; flow PPO fixes it in about 1.5k real steps): model-free
flow PPO for `--toy-real-steps`, and for each of `--toy-play-episodes` a world model trained on that
many play episodes (`tests/wm_tasks.py`, 12 steps each, all counted) and flow PPO dreaming
`--toy-imagined-steps` in it, every final policy on `--eval-episodes` held-out seeds. Writes
`<out>/world_model_point_reach.{json,md}`.

    python benchmarks/world_model.py --toy --out runs/wm_toy --toy-play-episodes 5 10 20 40 80
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

import numpy as np
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
    """[[x, eval_success, env_steps, eval_return], ...] of a fine-tuning run's in-run held-out evaluations."""
    with open(run_dir / "curves.csv", newline="") as f:
        return [[float(r[x]), float(r["eval_success"]), float(r["env_steps"]), float(r["eval_return"])]
                for r in csv.DictReader(f) if r["eval_success"]]


def first_reaching(curve: list[list[float]], target: float, offset: float) -> float | None:
    """Real steps (offset + the run's own) at the first in-run evaluation with success >= target."""
    return next((offset + env_steps for _, success, env_steps, _ in curve if success >= target), None)


def toy(args: argparse.Namespace) -> int:
    """The point-reaching comparison (see the module docstring)."""
    import dataclasses

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from rl_tasks import make_bc_policy, make_env
    from wm_tasks import REACH_CONFIG, reach_play_episodes

    from diffpolicy.evaluation.rollout import rollout
    from diffpolicy.rl import flow_ppo
    from diffpolicy.worldmodel import dream
    from diffpolicy.worldmodel.data import Transitions
    from diffpolicy.worldmodel.training import train_world_model

    out = Path(args.out)
    seeds = list(range(args.eval_seed, args.eval_seed + args.eval_episodes))
    config = flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.2, std_min=0.05, std_max=0.3,
                                    log_prob_per_dim=False, n_envs=8, n_steps=6, batch_size=16,
                                    epochs=4, eval_episodes=16, eval_every=0)

    def held_out(policy) -> dict:
        episodes, _ = rollout(policy, make_env, seeds, n_envs=10)
        return {"success": int(sum(e.success for e in episodes)), "episodes": len(episodes),
                "mean_return": float(np.mean([e.episode_return for e in episodes]))}

    def bc():
        return make_bc_policy("flow", inference_steps=4)

    results = {"bc": {**held_out(bc()), "real_steps": 0, "imagined_steps": 0, "cpu_s": 0.0}}
    start = cpu_seconds()
    free = flow_ppo.finetune(bc(), make_env, dataclasses.replace(config, env_steps=args.toy_real_steps),
                             out / "model_free", progress=False)
    saved = ChunkPolicy.from_pretrained(free.checkpoint / "policy")  # the final policy as the run saved it
    results["model_free"] = {**held_out(saved), "real_steps": saved.metadata["finetune_env_steps"],
                             "imagined_steps": 0, "cpu_s": cpu_seconds() - start}
    for episodes in args.toy_play_episodes:
        start = cpu_seconds()
        data = Transitions.from_episodes(reach_play_episodes(episodes, seed=1), ["pos"])
        world = train_world_model(data, REACH_CONFIG, out / f"world_model_{episodes}", np.full(2, -1.0),
                                  np.full(2, 1.0), progress=False)
        dreamt = dream.finetune(bc(), make_env, dataclasses.replace(config, env_steps=args.toy_imagined_steps),
                                dream.DreamConfig(), world.model, data, out / f"dream_{episodes}", max_episode_steps=12,
                                progress=False)
        saved = ChunkPolicy.from_pretrained(dreamt.checkpoint / "policy")
        assert saved.metadata["finetune_env_steps"] == 0  # a pure dream: no real step learned from
        results[f"dream_{episodes}_play_episodes"] = {**held_out(saved), "real_steps": data.n_steps,
                                                      "imagined_steps": args.toy_imagined_steps,
                                                      "cpu_s": cpu_seconds() - start}
    target = results["model_free"]["success"]
    reached = [r["real_steps"] for name, r in results.items() if name.startswith("dream") and r["success"] >= target]
    lines = [f"| point_reach run | real env steps (world-model data included) | imagined steps | held-out success "
             f"({args.eval_episodes} seeds from {args.eval_seed}) | mean return | CPU s |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['real_steps']} | {r['imagined_steps']} | {r['success']}/{r['episodes']} | "
              f"{r['mean_return']:.2f} | {r['cpu_s']:.0f} |" for name, r in results.items()]
    lines.append(f"\nFewest real steps of a dream reaching the model-free final success ({target}/{args.eval_episodes}): "
                 f"{min(reached) if reached else 'none'} vs {results['model_free']['real_steps']} model-free"
                 + (f" ({results['model_free']['real_steps'] / min(reached):.1f}x fewer)" if reached else ""))
    table = "\n".join(lines)
    atomic_write_text(out / "world_model_point_reach.md", table + "\n")
    atomic_write_text(out / "world_model_point_reach.json", json.dumps(results, indent=1))
    print(table)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="the point-reaching comparison instead of --task")
    parser.add_argument("--toy-play-episodes", type=int, nargs="+", default=[5, 10, 20, 40, 80])
    parser.add_argument("--toy-real-steps", type=int, default=1500)
    parser.add_argument("--toy-imagined-steps", type=int, default=1500)
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
    if args.toy:
        return toy(args)
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
    for name in ("model_free", "dream", "mixed"):  # the curves as the runs wrote them
        if name in results:
            results[name]["curve"] = in_run_curve(out / name, "env_steps" if name == "model_free" else "dream_steps")
    model_free = results["model_free"]
    # The question needs a model-free run that improved on the imitation start (held-out success).
    improved = model_free["success"] > results["bc"]["success"] and model_free["curve"]
    target = model_free["curve"][-1][1] if improved else None
    reach = {"model_free": first_reaching(model_free["curve"], target, 0) if target is not None else None}
    for name in ("dream", "mixed"):
        if name in results and target is not None:
            reach[name] = first_reaching(results[name]["curve"], target, data_steps)
    lines = [f"| {task} run | real env steps (world-model data included) | imagined steps | held-out success "
             f"({args.eval_episodes} seeds from {args.eval_seed}) | mean return | real steps to reach the model-free "
             f"final in-run success ({target if target is not None else '-'}) | process CPU s |", "|---|---|---|---|---|---|---|"]
    for name in ("bc", "model_free", "dream", "mixed"):
        if name not in results:
            continue
        r = results[name]
        reached = reach.get(name)
        if name == "bc":
            shown = "-"
        elif target is None:
            shown = "n/a: model-free did not improve on the start"
        else:
            shown = reached if reached is not None else "not reached"
        lines.append(f"| {name} | {r['real_steps']} | {r['dream_steps']} | {r['success']}/{r['episodes']} | "
                     f"{r['mean_return']:.1f} | {shown} | {r.get('cpu_s', 0):.0f} |")
    table = "\n".join(lines)
    results["reach"] = reach
    atomic_write_text(out / f"world_model_{task}.md", table + "\n")
    atomic_write_text(out / f"world_model_{task}.json", json.dumps(results, indent=1))
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    bc = results["bc"]
    for row, (column, start, label) in enumerate(((1, bc["success"] / bc["episodes"], "success"),
                                                   (3, bc["mean_return"], "return"))):
        left, right = axes[row]
        for ax in (left, right):
            ax.axhline(start, color="gray", linestyle="--", label="imitation start (held-out)")
            ax.set_ylabel(f"in-run held-out {label}")
        left.plot([c[2] for c in model_free["curve"]], [c[column] for c in model_free["curve"]], marker="o",
                  label="model-free")
        for name in ("dream", "mixed"):
            if name in results:
                curve = results[name]["curve"]
                left.plot([data_steps + c[2] for c in curve], [c[column] for c in curve], marker="s", linestyle="none",
                          label=name)
                right.plot([c[0] for c in curve], [c[column] for c in curve], marker="o", label=name)
        left.set_xlabel("real environment steps (world-model data included)")
        right.set_xlabel("imagined environment steps")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"world_model_{task}.png", dpi=80)


if __name__ == "__main__":
    sys.exit(main())

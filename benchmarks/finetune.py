"""RL fine-tuning benchmark: an imitation checkpoint fine-tuned by `diffpolicy finetune` against
stable-baselines3 Gaussian PPO and SAC trained from scratch with the same budget of environment steps.

Stages (each resumes or is skipped when its result is cached under `--out`):
  1. `bc`: the imitation checkpoint on `--eval-episodes` held-out seeds from `--eval-seed`
     (with `--eval-eta`, DDIM eta = 0 by default: DPPO's evaluation sampler);
  2. `<algo>` for each of `--algos`: `diffpolicy finetune --algo <algo>` in-process into
     `<out>/<algo>` (resumed if there), then its final (latest, not best) policy on the same seeds;
  3. `sb3_ppo`, `sb3_sac` (`--baselines`): SB3 PPO / SAC ("MlpPolicy", Gaussian) from scratch on the
     task with observations scaled by their bounds where finite and actions rescaled to [-1, 1],
     `--env-steps` steps, checkpointed every 50k steps (SAC with its replay buffer); held-out success
     and return on the first 20 seeds logged to `<out>/<baseline>/curves.csv`, the fine-tuning runs'
     format (`notebooks/finetuning_curves.ipynb` overlays it); its deterministic policy on the same seeds.
Every run uses the same reward (`--reward`): `absorbing` (default: success pays 1 per remaining
step; PushT's raw dense reward would favour hovering below the threshold), `sparse` (1 on the
succeeding step only) or `task` (the task's own reward: locomotion, where there is no success).
Writes `<out>/finetune_<task>.{json,md}` (one table: stage, environment steps, held-out success and
mean return, process CPU time) and `<out>/finetune_<task>.png` (held-out evaluation success, or
return for a task judged by its return, vs environment steps of every run). Each stage caches its
row, so stages can run as separate processes side by side (`--algos` with `--baselines`, or none).

    python benchmarks/finetune.py --task pusht --checkpoint runs/ft_bench/bc_diffusion --out runs/ft_bench \
        --algos dppo dsrl --env-steps 400000 --set dppo:n_steps=40 --set dppo:lr=3e-5 --set dsrl:eval_every=50000
    python benchmarks/finetune.py --task hopper --checkpoint runs/hopper_bc --out runs/ft_hopper --reward task \
        --algos --baselines sb3_sac --env-steps 1000000
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym
import numpy as np
import torch

from diffpolicy.cli import main as cli_main
from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.evaluation.rollout import rollout
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.policies import ChunkPolicy
from diffpolicy.rl.curves import Curves
from diffpolicy.rl.dsrl import DSRLPolicy
from diffpolicy.rl.rewards import absorbing_success_env, sparse_success_env
from diffpolicy.train.checkpoints import CheckpointManager, resolve_policy_dir

REWARDS = {"absorbing": ["--absorbing-success"], "sparse": ["--sparse-success"], "task": []}  # finetune flags


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(episodes) -> dict:
    return {"success": int(sum(e.success for e in episodes)), "episodes": len(episodes),
            "mean_return": float(np.mean([e.episode_return for e in episodes]))}


def evaluate_chunk_policy(policy, env_fn, seeds) -> dict:
    episodes, _ = rollout(policy, env_fn, seeds, n_envs=10)
    return summarize(episodes)


class ScaledTask(gym.Wrapper):
    """Flat observation, each entry with finite bounds scaled to [-1, 1] (the others as they are);
    actions in [-1, 1] (SB3 baselines)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        spaces = env.observation_space.spaces
        self.keys = sorted(spaces)
        low = np.concatenate([spaces[k].low.ravel() for k in self.keys]).astype(np.float64)
        high = np.concatenate([spaces[k].high.ravel() for k in self.keys]).astype(np.float64)
        bounded = np.isfinite(low) & np.isfinite(high)
        self.low, self.high = np.where(bounded, low, -1.0), np.where(bounded, high, 1.0)  # unbounded: x -> x
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, self.low.shape, np.float32)
        self.act_low, self.act_high = env.action_space.low, env.action_space.high
        self.action_space = gym.spaces.Box(-1.0, 1.0, env.action_space.shape, np.float32)

    def _obs(self, obs):
        flat = np.concatenate([np.asarray(obs[k], np.float64).ravel() for k in self.keys])
        return (2 * (flat - self.low) / (self.high - self.low) - 1).astype(np.float32)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._obs(obs), info

    def step(self, action):
        action = self.act_low + (np.clip(action, -1, 1) + 1) / 2 * (self.act_high - self.act_low)
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._obs(obs), reward, terminated, truncated, info


def sb3_from_scratch(name: str, env_fn, out: Path, env_steps: int, seeds, n_envs: int, metric: str) -> dict:
    """Train (resumably) and evaluate one SB3 baseline from scratch (`name`: sb3_ppo | sb3_sac); returns
    its result row. PPO steps `n_envs` environments; SAC one, as its reference setting does."""
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.vec_env import DummyVecEnv

    out.mkdir(parents=True, exist_ok=True)
    model_path, buffer_path, state_path = out / "model.zip", out / "replay_buffer.pkl", out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"env_steps": 0, "cpu_s": 0.0, "curve": []}
    is_sac = name == "sb3_sac"
    venv = DummyVecEnv([lambda: ScaledTask(env_fn()) for _ in range(1 if is_sac else n_envs)])
    cls = SAC if is_sac else PPO
    if model_path.exists():
        model = cls.load(model_path, env=venv, device="cpu")
        if is_sac:
            model.load_replay_buffer(buffer_path)
    elif is_sac:
        model = SAC("MlpPolicy", venv, seed=0, device="cpu", verbose=0)
    else:
        model = PPO("MlpPolicy", venv, n_steps=512, batch_size=256, seed=0, device="cpu", verbose=0)
    curves = Curves(out, resume_iteration=len(state["curve"]))  # curves.csv as the fine-tuning runs write it
    chunk = 50_000
    while state["env_steps"] < env_steps:
        start = cpu_seconds()
        steps = min(chunk, env_steps - state["env_steps"])
        model.learn(total_timesteps=steps, reset_num_timesteps=False)
        state["env_steps"] = int(model.num_timesteps)
        held_out = evaluate_sb3(model, env_fn, seeds[:20])
        row = {"eval_success": held_out["success"] / held_out["episodes"], "eval_return": held_out["mean_return"]}
        state["curve"].append([state["env_steps"], row[metric]])
        state["cpu_s"] += cpu_seconds() - start
        curves.log({"iteration": len(state["curve"]), "env_steps": state["env_steps"],
                    "cpu_s": round(state["cpu_s"], 2), **row})
        model.save(model_path)
        if is_sac:
            model.save_replay_buffer(buffer_path)
        state_path.write_text(json.dumps(state))
        print(f"[{name}] env_steps={state['env_steps']} cpu_s={state['cpu_s']:.0f} curve={state['curve'][-1]}",
              flush=True)
    curves.close()
    result = evaluate_sb3(model, env_fn, seeds)
    return {**result, "env_steps": state["env_steps"], "cpu_s": state["cpu_s"], "curve": state["curve"]}


def evaluate_sb3(model, env_fn, seeds) -> dict:
    successes, returns = 0, []
    for seed in seeds:
        env = ScaledTask(env_fn())
        obs, _ = env.reset(seed=seed)
        done, total, success = False, 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            success |= bool(info.get("is_success", False))
            done = terminated or truncated
        successes += success
        returns.append(total)
        env.close()
    return {"success": successes, "episodes": len(seeds), "mean_return": float(np.mean(returns))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--checkpoint", required=True, help="the imitation run / policy directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--algos", nargs="*", default=["dppo"], choices=["dppo", "flowppo", "dsrl"])
    parser.add_argument("--baselines", nargs="*", default=["sb3_ppo"], choices=["sb3_ppo", "sb3_sac"])
    parser.add_argument("--reward", default="absorbing", choices=list(REWARDS),
                        help="the reward of every run: absorbing success (default), sparse success, or the task's own")
    parser.add_argument("--env-steps", type=int, default=400_000)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--eval-seed", type=int, default=100_000)
    parser.add_argument("--eval-eta", type=float, default=0.0)
    parser.add_argument("--set", action="append", default=[], metavar="ALGO:key=value",
                        help="an override of one algorithm's config, e.g. dppo:lr=3e-5")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = load_task(args.task)
    task_env = functools.partial(make_env, card)
    env_fn = {"absorbing": functools.partial(absorbing_success_env, task_env, card.max_episode_steps),
              "sparse": functools.partial(sparse_success_env, task_env), "task": task_env}[args.reward]
    metric = "eval_return" if card.success["metric"] == "episode_return" else "eval_success"
    seeds = list(range(args.eval_seed, args.eval_seed + args.eval_episodes))
    results_path = out / f"finetune_{card.name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save() -> None:  # merged into what other runs of this script wrote meanwhile
        merged = json.loads(results_path.read_text()) if results_path.exists() else {}
        merged.update(results)
        atomic_write_text(results_path, json.dumps(merged, indent=1))
        results.update(merged)

    if "bc" not in results:
        start = cpu_seconds()
        policy = ChunkPolicy.from_pretrained(resolve_policy_dir(args.checkpoint))
        if policy.config.process.type == "diffusion":
            policy.set_sampling(eta=args.eval_eta)
        results["bc"] = {**evaluate_chunk_policy(policy, env_fn, seeds), "env_steps": 0,
                         "cpu_s": cpu_seconds() - start}
        save()
    for algo in args.algos:
        if algo in results:
            continue
        run_dir = out / algo
        start = cpu_seconds()
        command = ["finetune", "--algo", algo, "--checkpoint", args.checkpoint, "--task", args.task, "--out",
                   str(run_dir), "--env-steps", str(args.env_steps), *REWARDS[args.reward],
                   *(["--n-envs", str(args.n_envs)] if algo != "dsrl" else []),
                   *[item.split(":", 1)[1] for item in args.set if item.startswith(f"{algo}:")]]
        if (run_dir / "checkpoints").exists() or (run_dir / "sb3").exists():
            command.append("--resume")
        if cli_main(command) != 0:
            return 1
        if algo == "dsrl":
            policy, env_steps = DSRLPolicy.load(run_dir / "policy"), None
        else:  # the latest checkpoint: no selection on evaluation seeds
            policy = ChunkPolicy.from_pretrained(CheckpointManager(run_dir / "checkpoints").latest() / "policy")
            env_steps = policy.metadata.get("finetune_env_steps")
        with open(run_dir / "curves.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        curve = [[int(r["env_steps"]), float(r[metric])] for r in rows if r[metric]]
        run_cpu = float(rows[-1]["cpu_s"]) if rows and rows[-1].get("cpu_s") else cpu_seconds() - start
        results[algo] = {**evaluate_chunk_policy(policy, env_fn, seeds),
                         "env_steps": env_steps if env_steps is not None else int(rows[-1]["env_steps"]),
                         "cpu_s": run_cpu, "curve": curve}
        save()
    for baseline in args.baselines:
        if baseline not in results:
            results[baseline] = sb3_from_scratch(baseline, env_fn, out / baseline, args.env_steps, seeds,
                                                 args.n_envs, metric)
            save()
    write_table(json.loads(results_path.read_text()), card.name, out, args, metric)
    return 0


def write_table(results: dict, task: str, out: Path, args, metric: str) -> None:
    header = (f"| {task} | env steps | held-out success ({args.eval_episodes} seeds from {args.eval_seed}) "
              "| mean return | process CPU s |")
    lines = [header, "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['env_steps']} | {r['success']}/{r['episodes']} | {r['mean_return']:.1f} "
                     f"| {r['cpu_s']:.0f} |")
    table = "\n".join(lines)
    (out / f"finetune_{task}.md").write_text(table + "\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bc = results.get("bc")
    if bc:
        start = bc["mean_return"] if metric == "eval_return" else bc["success"] / bc["episodes"]
        ax.axhline(start, color="gray", linestyle="--", label="bc (start)")
    for name, r in results.items():
        if r.get("curve"):
            ax.plot(*zip(*r["curve"]), marker="o", label=name)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"held-out {metric.removeprefix('eval_')} (evaluation during the run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"finetune_{task}.png", dpi=80)


if __name__ == "__main__":
    sys.exit(main())

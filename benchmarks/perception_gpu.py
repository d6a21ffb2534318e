"""Issue 15's perception comparison on one lent GPU, in one timed call.

The CPU runs of `benchmarks/generative_perception.sh` stopped at 3000 steps, where no encoder succeeds
(RESULTS, "Perception"). This script trains the same PushT-image diffusion policy with each encoder
side by side on one GPU for a fixed wall-clock budget and evaluates them at equal training steps:

    1. collect the 200 PushT-image demonstrations (`diffpolicy collect`), and at the same time train
       the PushT image model (`diffpolicy generate image --data pusht --device cuda`);
    2. train the ResNet-18 arm from the start, and the two DiT arms (the image model's DiT frozen /
       fine-tuned) once the image model is saved, each with a checkpoint every `--checkpoint-every`
       steps (all kept);
    3. at `--train-seconds` stop every arm still training (SIGTERM; checkpoints are atomic), take the
       largest checkpoint step that every arm reached, and evaluate each arm there on `--episodes`
       held-out seeds, and an arm's own last checkpoint as well when it got further;
    4. write `summary.json` (steps reached, steps / s, validation loss, success with its interval).

    python benchmarks/perception_gpu.py --out runs/gen_gpu                        # on the GPU machine
    python benchmarks/perception_gpu.py --out /tmp/dry --steps 20 --checkpoint-every 10 --image-steps 20 \\
        --train-seconds 120 --episodes 2 --device cpu                            # a dry run on the CPU

Every subprocess's output goes to `<out>/<name>.log`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CLI = [sys.executable, "-m", "diffpolicy.cli"]
DIT_ENCODER = ('policy.encoder={{"crop_shape": [84, 84], "image_backbone": {{"type": "dit", "init": "{init}", '
               '"freeze": {freeze}}}}}')


def start(name: str, args: list[str], out: Path, threads: int) -> subprocess.Popen:
    """Start `diffpolicy ARGS` with its output in `<out>/<name>.log`, in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log = open(out / f"{name}.log", "w")
    print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(args)}", flush=True)
    return subprocess.Popen(CLI + args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints of a training run (their index)."""
    index = run / "checkpoints" / "index.json"
    if not index.is_file():
        return []
    return sorted(c["step"] for c in json.loads(index.read_text())["checkpoints"])


def train_args(name: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    return ["train", "--task", "pusht_image", "--out", str(args.out / name), "--no-progress",
            f"data.path={args.out / 'pusht_image.zarr'}", f"train.steps={args.steps}",
            f"train.batch_size={args.batch_size}", "train.log_every=100", f"train.num_threads={args.threads}",
            f"train.checkpoint_every={args.checkpoint_every}", "train.keep_all=true", f"train.device={args.device}",
            f"data.num_workers={args.loader_workers}", f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup}",
            "eval.episodes=0", *extra]


def last_row(run: Path, key: str) -> dict | None:
    """The last row of `<run>/log.jsonl` that holds `key`."""
    log = run / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    rows = [row for row in rows if key in row]
    return rows[-1] if rows else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20000, help="training steps of every arm (the cosine's end)")
    parser.add_argument("--checkpoint-every", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--image-model", type=Path, default=None,
                        help="a trained PushT image model to use (only sampled) instead of training one")
    parser.add_argument("--image-steps", type=int, default=10000, help="image model training steps")
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--train-seconds", type=float, default=360, help="wall-clock budget of the training phase")
    parser.add_argument("--eval-seconds", type=float, default=130, help="wall-clock budget of the evaluations")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=100000, help="first held-out seed")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each process")
    parser.add_argument("--collect-workers", type=int, default=6)
    parser.add_argument("--loader-workers", type=int, default=2, help="data loader processes of each arm")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + args.train_seconds

    collect = start("collect", ["collect", "--task", "pusht_image", "--episodes", "200", "--no-progress",
                                "--workers", str(args.collect_workers), "--out", str(args.out / "pusht_image.zarr")],
                    args.out, 1)
    image_model = args.image_model or args.out / "pusht_dit_x0"
    sampling = ["--count", "16", "--steps", "10", "--out", str(args.out / "image_model_samples.png")]
    training = [] if args.image_model else [
        "--data", "pusht", "--train-steps", str(args.image_steps), "--batch-size", str(args.image_batch),
        "--device", args.device, "--overwrite"]
    imaging = start("image_model", ["generate", "image", "--model", str(image_model), *training, *sampling],
                    args.out, args.threads)
    arms: dict[str, subprocess.Popen] = {}
    started: dict[str, float] = {}
    ended: dict[str, float] = {}  # when a process was first seen to have exited

    def launch(name: str, extra: list[str]) -> None:
        arms[name] = start(name, train_args(name, args, extra), args.out, args.threads)
        started[name] = time.monotonic()

    processes = {"collect": collect, "image_model": imaging}
    while True:
        for name, process in {**processes, **arms}.items():
            if name in ended or process.poll() is None:
                continue
            ended[name] = time.monotonic()
            if process.returncode != 0:
                print(f"{name} exited with {process.returncode}: see {name}.log", flush=True)
            elif name == "collect":
                launch("resnet", [])
        if "collect" in ended and collect.returncode == 0 and "image_model" in ended \
                and imaging.returncode == 0 and "dit_frozen" not in arms:
            for name, freeze in (("dit_frozen", "true"), ("dit_finetuned", "false")):
                launch(name, [DIT_ENCODER.format(init=image_model, freeze=freeze)])
        if time.monotonic() >= deadline or all(p.poll() is not None for p in [*processes.values(), *arms.values()]):
            break
        time.sleep(1)
    for process in [*processes.values(), *arms.values()]:
        stop(process)
    if collect.returncode != 0:
        return 1
    train_end = time.monotonic()
    reached = {name: checkpoint_steps(args.out / name) for name in arms}
    print(f"[{time.strftime('%H:%M:%S')}] checkpoints: {reached}", flush=True)
    common = min(max(steps) for steps in reached.values()) if reached and all(reached.values()) else None

    evaluations: dict[str, subprocess.Popen] = {}
    if common is not None:
        for name, steps in reached.items():
            for step in sorted({common, max(steps)}):
                label = f"{name}@{step}"
                evaluations[label] = start(f"eval_{name}_{step}", [
                    "eval", "--checkpoint", str(args.out / name / "checkpoints" / f"step_{step:08d}"),
                    "--episodes", str(args.episodes), "--seed", str(args.seed), "--n-envs", str(args.episodes),
                    "--device", args.device, "--no-progress",
                    "--out", str(args.out / f"eval_{name}_{step}")], args.out, 1)
    eval_deadline = time.monotonic() + args.eval_seconds
    while time.monotonic() < eval_deadline and any(p.poll() is None for p in evaluations.values()):
        time.sleep(2)
    for process in evaluations.values():
        stop(process)

    results = {}
    for name in arms:
        run = args.out / name
        train_row = last_row(run, "steps_per_s")
        val_row = last_row(run, "val_loss")
        results[name] = {
            "checkpoints": reached[name],
            "train_seconds": round(ended.get(name, train_end) - started[name], 1),
            "finished": name in ended and arms[name].returncode == 0,
            "last_steps_per_s": train_row and round(train_row["steps_per_s"], 2),
            "last_loss": train_row and train_row["loss"],
            "last_val_loss": val_row and {"step": val_row["step"], "val_loss": val_row["val_loss"]},
            "evaluations": {},
        }
    for label, process in evaluations.items():
        name, step = label.split("@")
        summary = args.out / f"eval_{name}_{step}" / "summary.json"
        results[name]["evaluations"][step] = json.loads(summary.read_text()) if summary.is_file() else \
            {"error": f"no summary (exit {process.returncode}); see eval_{name}_{step}.log"}
    summary = {
        "common_step": common, "episodes": args.episodes, "first_seed": args.seed,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "collect_seconds": round(ended["collect"] - t0, 1),
        "image_model_seconds": round(ended["image_model"] - t0, 1) if "image_model" in ended else None,
        "image_model": json.loads((image_model / "config.json").read_text()).get("metadata")
        if (image_model / "config.json").is_file() else None,
        "total_seconds": round(time.monotonic() - t0, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "cpus": os.cpu_count()},
        "arms": results,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

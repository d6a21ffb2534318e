"""Step cost of the robosuite tasks: low-dim vs. image observations, with and without shadows and
reflections (offscreen EGL rendering; software rendering on a machine without a GPU).

Rows (wall ms per env step with random actions, median over repeats; ratio against the baseline
row, the low-dim step, measured in the same process):
  low_dim (baseline)          RobosuiteEnv(obs_type="low_dim")
  image                       obs_type="image", agentview + eye-in-hand at --size (default)
  image, full quality         the same with shadows and reflections kept (full_render_quality=True)

    MUJOCO_GL=egl python benchmarks/robosuite_steps.py --task Lift --steps 50
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from diffpolicy.envs.robosuite_tasks import TASK_ENV_NAMES, RobosuiteEnv  # noqa: E402


def ms_per_step(env: RobosuiteEnv, steps: int, repeats: int) -> float:
    env.reset(seed=0)
    env.action_space.seed(0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            env.step(env.action_space.sample())
        times.append((time.perf_counter() - start) / steps)
        env.reset()
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="Lift", choices=TASK_ENV_NAMES)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    rows = [
        ("low_dim (baseline)", {"obs_type": "low_dim"}),
        (f"image {args.size}", {"obs_type": "image", "image_size": args.size}),
        (f"image {args.size}, full quality", {"obs_type": "image", "image_size": args.size,
                                               "full_render_quality": True}),
    ]
    results = []
    for name, kwargs in rows:
        env = RobosuiteEnv(args.task, **kwargs)
        results.append((name, ms_per_step(env, args.steps, args.repeats)))
        env.close()
    baseline = results[0][1]
    print(f"{args.task}: {args.steps} steps x {args.repeats} repeats, MUJOCO_GL={os.environ['MUJOCO_GL']}")
    print(f"{'row':<28}{'ms/step':>10}{'ratio':>8}")
    for name, ms in results:
        print(f"{name:<28}{ms:>10.2f}{ms / baseline:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

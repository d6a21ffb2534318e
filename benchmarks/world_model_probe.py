"""Does a world model let a policy succeed where the real task does? A probe of the model a dream loads.

From every held-out state `--min-before`..`--max-before` steps (every `--stride`th) before a success of
its episode, the imitation policy plays `--chunks` chunks inside the world model, the way a dream with
`dream.task_reward` does: success where the task's rule holds on every member's predicted observation.
The held-out episodes are the model's own (its data and split, from the model's metadata), so the
policy's real episodes from those states did succeed within `--max-before` steps. Prints, per chunk,
the imagined episodes still running and, for robosuite tasks, the median object height and
gripper-to-object distance (what decides Can: the can in the bin, the gripper let go), then the share of
imagined episodes that succeeded.

    python benchmarks/world_model_probe.py --task can --world-model runs/s25/wm_can_past \\
        --checkpoint runs/s23/can_diffusion/checkpoints/step_00032000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.dream import tried_rule
from diffpolicy.worldmodel.imagine import DreamVecEnv
from diffpolicy.worldmodel.model import LatentWorldModel
from diffpolicy.worldmodel.training import resolve_world_model_dir


def held_out_starts(val: Transitions, min_before: int, max_before: int, stride: int) -> np.ndarray:
    """`(N,)` step indices `min_before, min_before + stride, ... <= max_before` steps before each
    episode's first success, within the episode."""
    starts = []
    for first in np.flatnonzero(val.success & val.before_success):
        episode_start = val.episode_starts[val.episode_of(np.array([first]))[0]]
        starts += [first - k for k in range(min_before, max_before + 1, stride) if first - k >= episode_start]
    return np.array(starts, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--world-model", required=True, help="a `diffpolicy worldmodel train` run or model directory")
    parser.add_argument("--checkpoint", required=True, help="the policy the dream starts from")
    parser.add_argument("--min-before", type=int, default=8)
    parser.add_argument("--max-before", type=int, default=48)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = LatentWorldModel.load(resolve_world_model_dir(args.world_model)).eval()
    policy = ChunkPolicy.from_pretrained(resolve_policy_dir(args.checkpoint)).eval()
    train = model.metadata["train"]
    data = Transitions.load(model.metadata["data_paths"], model.obs_keys)
    _, val = data.split(train["val_fraction"], train["seed"])
    card = load_task(args.task)
    env = make_env(card)
    rule = tried_rule(env, "reward_from_observation")
    if rule is None:
        raise SystemExit(f"{args.task}: the environment has no reward_from_observation rule to judge success by")
    starts = held_out_starts(val, args.min_before, args.max_before, args.stride)
    n = len(starts)
    envs = DreamVecEnv(model, val, policy.config, n, int(card.max_episode_steps),
                       model.cut_thresholds(1e9), task_reward=rule, sparse_success=True,
                       rollout_steps=args.chunks * policy.config.action_horizon)
    envs.candidates = starts  # every imagined episode starts from one of these held-out states
    obs, _ = envs.reset(seed=[args.seed + i for i in range(n)])
    generator = torch.Generator().manual_seed(args.seed)
    object_start = getattr(getattr(env.unwrapped, "_success_rule", None), "start", None)
    succeeded, done = np.zeros(n, bool), np.zeros(n, bool)
    for chunk in range(args.chunks):
        with torch.no_grad():
            actions = policy.sample({k: torch.as_tensor(v) for k, v in obs.items()}, generator=generator).numpy()
        obs, _, terminated, truncated, info = envs.step(actions)
        running = ~done & ~terminated & ~truncated  # an ended episode's observation is already its successor's start
        line = f"chunk {chunk}: running {running.sum()}/{n}"
        if object_start is not None and running.any():
            position = obs["object"][:, -1, object_start:object_start + 3]
            gap = np.linalg.norm(obs["robot0_eef_pos"][:, -1] - position, axis=1)
            line += (f", object height {np.median(position[running, 2]):.3f} m, gripper-object distance "
                     f"{np.median(gap[running]):.3f} m")
        print(line)
        succeeded |= info["is_success"] & ~done
        done |= terminated | truncated
    print(f"{args.world_model}: {n} held-out states {args.min_before}-{args.max_before} steps before a success; "
          f"the policy succeeds in imagination (every member) from {succeeded.mean():.2f} of them")


if __name__ == "__main__":
    main()

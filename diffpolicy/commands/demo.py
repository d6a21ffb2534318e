"""`diffpolicy demo`: chunk policies keep both modes of a bimodal task; a regressor averages them.

The synthetic task: from a start near (0, -1) reach the goal (0, 1) past a disk obstacle of radius
0.5 at the origin. The demonstrator passes it on the left with probability p and on the right
otherwise; the action chunk is Tp 2-D waypoints along the way. A diffusion and a flow-matching
`ChunkPolicy` and an MSE regressor (same data, same observation) are trained, then sampled; the
table reports per model the fraction of chunks passing left, passing right, or in between (where
no demonstration goes), the fraction colliding with the obstacle, and the training time. The
regressor learns the conditional mean, which runs between the modes, through the obstacle.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffpolicy.errors import UsageError
from diffpolicy.policies import ChunkPolicy, Normalizer, PolicyConfig, diffusion_process, flow_process

GOAL = np.array([0.0, 1.0])
OBSTACLE_CENTER = np.array([0.0, 0.0])
OBSTACLE_RADIUS = 0.5
DETOUR = 1.0
"""Mean sideways amplitude of a demonstration at mid-way (each draws DETOUR +- 0.1)."""
MODE_OFFSET = 0.75 * DETOUR
"""A path whose mid-way offset is beyond this (demonstrations: 0.9 to 1.1) follows a mode; the mean
of the modes at p = 0.3, (1 - 2p) DETOUR = 0.4, is well inside."""


# ---------------------------------------------------------------------------- the task
@dataclass
class BimodalData:
    """Demonstrations: `start (N, 2)` observations, `chunks (N, Tp, 2)` waypoints, `left (N,)` modes."""

    start: np.ndarray
    chunks: np.ndarray
    left: np.ndarray


def make_bimodal_data(n: int, p_left: float, horizon: int, rng: np.random.Generator) -> BimodalData:
    """`n` demonstrations from starts (0, -1) +- 0.05; waypoint k of Tp at u = k / Tp is
    start + u (goal - start) plus a sideways bump side * a * sin(pi u) with side = -1 (left,
    probability p_left) or +1, a ~ DETOUR +- 0.1."""
    start = np.array([0.0, -1.0]) + rng.uniform(-0.05, 0.05, size=(n, 2))
    left = rng.random(n) < p_left
    amplitude = np.where(left, -1.0, 1.0) * (DETOUR + rng.uniform(-0.1, 0.1, size=n))
    u = np.arange(1, horizon + 1) / horizon
    chunks = start[:, None, :] + u[None, :, None] * (GOAL - start)[:, None, :]
    chunks[..., 0] += amplitude[:, None] * np.sin(np.pi * u)[None, :]
    return BimodalData(start.astype(np.float32), chunks.astype(np.float32), left)


def segment_distance(points: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Distance from `center (2,)` to each segment of polylines `points (N, K, 2)` -> `(N, K - 1)`."""
    a, b = points[:, :-1], points[:, 1:]
    ab, ac = b - a, center - a
    u = np.clip((ac * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(a + u[..., None] * ab - center, axis=-1)


def classify(start: np.ndarray, chunks: np.ndarray) -> dict[str, np.ndarray]:
    """Per chunk `(N, Tp, 2)` from `start (N, 2)`, all `(N,)` bool: the mode, from the sideways offset
    of the path at the obstacle's height against the straight start-goal line, "left" (< -MODE_OFFSET),
    "right" (> MODE_OFFSET) or "between" (neither: no demonstration goes there), and "collide" (the
    polyline start -> waypoints enters the obstacle)."""
    path = np.concatenate([start[:, None, :], chunks], axis=1)
    collide = segment_distance(path, OBSTACLE_CENTER).min(axis=1) < OBSTACLE_RADIUS
    # x of the path where it is closest to the obstacle's height y = 0, against the straight line
    middle = np.abs(path[..., 1] - OBSTACLE_CENTER[1]).argmin(axis=1)
    point = path[np.arange(len(path)), middle]
    u = (point[:, 1] - start[:, 1]) / (GOAL[1] - start[:, 1])
    offset = point[:, 0] - (start[:, 0] + u * (GOAL[0] - start[:, 0]))
    left, right = offset < -MODE_OFFSET, offset > MODE_OFFSET
    return {"left": left, "right": right, "between": ~(left | right), "collide": collide}


# ---------------------------------------------------------------------------- models
class MeanRegressor(nn.Module):
    """Unimodal baseline: MLP from the normalized observation `(B, 2)` to a normalized chunk `(B, Tp, 2)`."""

    def __init__(self, horizon: int, hidden: int = 128):
        super().__init__()
        self.horizon = horizon
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(),
                                 nn.Linear(hidden, 2 * horizon))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).view(-1, self.horizon, 2)


def demo_policy_config(process: str, horizon: int, hidden: int = 128, prediction: str = "epsilon") -> PolicyConfig:
    """A tiny MLP chunk policy for the task: To = 1, obs "state" (2,), Da = 2; diffusion is Diffusion
    Policy's process (100-step cosine grid) with the given prediction, flow is the Euler ODE."""
    return PolicyConfig(
        obs_shapes={"state": (2,)}, action_dim=2, obs_horizon=1, pred_horizon=horizon, action_horizon=horizon,
        process=diffusion_process(prediction=prediction) if process == "diffusion" else flow_process(),
        backbone={"type": "mlp", "hidden_dim": hidden, "num_blocks": 2},
        inference_steps=20 if process == "diffusion" else 10,
    )


def _batches(data: BimodalData, batch: int, rng: np.random.Generator):
    while True:
        index = rng.integers(0, len(data.start), size=batch)
        yield torch.from_numpy(data.start[index][:, None, :]), torch.from_numpy(data.chunks[index])


def train_chunk_policy(config: PolicyConfig, data: BimodalData, steps: int, seed: int,
                       batch: int = 256, lr: float = 3e-3) -> ChunkPolicy:
    """Fit a `ChunkPolicy` by its denoising loss (AdamW, cosine-decayed lr)."""
    torch.manual_seed(seed)  # parameter initialization
    normalizer = Normalizer.fit({"action": data.chunks, "state": data.start})
    policy = ChunkPolicy(config, normalizer).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-6)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(data, batch, np.random.default_rng(seed))
    for _ in range(steps):
        obs, action = next(batches)
        loss = policy.compute_loss({"obs": {"state": obs}, "action": action}, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return policy.eval()


def train_regressor(data: BimodalData, horizon: int, steps: int, seed: int,
                    batch: int = 256, lr: float = 3e-3) -> tuple[MeanRegressor, Normalizer]:
    """Fit the MSE regressor on the same normalized data."""
    torch.manual_seed(seed)
    normalizer = Normalizer.fit({"action": data.chunks, "state": data.start})
    model = MeanRegressor(horizon)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-6)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    batches = _batches(data, batch, np.random.default_rng(seed))
    for _ in range(steps):
        obs, action = next(batches)
        prediction = model(normalizer.normalize("state", obs[:, 0]))
        loss = (prediction - normalizer.normalize("action", action)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval(), normalizer


@torch.no_grad()
def regressor_predict(model: MeanRegressor, normalizer: Normalizer, start: np.ndarray) -> np.ndarray:
    """Chunks `(N, Tp, 2)` in data units for starts `(N, 2)`."""
    out = model(normalizer.normalize("state", torch.from_numpy(start)))
    return normalizer.unnormalize("action", out).numpy()


def policy_predict(policy: ChunkPolicy, start: np.ndarray, seed: int) -> np.ndarray:
    """One sampled chunk `(N, Tp, 2)` per start `(N, 2)`."""
    obs = {"state": torch.from_numpy(start)[:, None, :]}
    return policy.sample(obs, generator=torch.Generator().manual_seed(seed)).numpy()


# ---------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--p-left", type=float, default=0.3, help="probability of passing on the left (0.3)")
    parser.add_argument("--demos", type=int, default=2000, help="number of demonstrations (2000)")
    parser.add_argument("--horizon", type=int, default=8, help="waypoints per chunk, Tp (8)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per model (2000)")
    parser.add_argument("--samples", type=int, default=1000, help="evaluation starts (1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.p_left <= 1.0:
        raise UsageError(f"--p-left must be in [0, 1], got {args.p_left}")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    data = make_bimodal_data(args.demos, args.p_left, args.horizon, rng)
    start = make_bimodal_data(args.samples, args.p_left, args.horizon, rng).start

    rows = [("demonstrations", classify(data.start, data.chunks), None)]
    for process, label in (("diffusion", "diffusion (DDPM, 20 steps)"), ("flow", "flow matching (Euler, 10 steps)")):
        began = time.perf_counter()
        policy = train_chunk_policy(demo_policy_config(process, args.horizon), data, args.steps, args.seed)
        seconds = time.perf_counter() - began
        rows.append((label, classify(start, policy_predict(policy, start, args.seed + 1)), seconds))
    began = time.perf_counter()
    model, normalizer = train_regressor(data, args.horizon, args.steps, args.seed)
    seconds = time.perf_counter() - began
    rows.append(("MSE regressor", classify(start, regressor_predict(model, normalizer, start)), seconds))

    print(f"Bimodal 2-D task: pass the obstacle left with p = {args.p_left}; {args.demos} demonstrations, "
          f"Tp = {args.horizon}, {args.steps} training steps, {args.samples} evaluation starts, "
          f"{args.threads} threads")
    print(f"{'model':<34}{'left':>8}{'right':>8}{'between':>9}{'collide':>9}{'train s':>9}")
    for label, stats, seconds in rows:
        timing = "-" if seconds is None else f"{seconds:.1f}"
        print(f"{label:<34}{stats['left'].mean():>8.3f}{stats['right'].mean():>8.3f}{stats['between'].mean():>9.3f}"
              f"{stats['collide'].mean():>9.3f}{timing:>9}")
    return 0

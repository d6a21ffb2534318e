"""Backbone benchmark on CPU: size, latency and training speed of each denoiser in a ChunkPolicy.

Shape: PushT-like state task (To = 2, one 20-D observation key, Da = 2, Tp = 16), Diffusion
Policy's process. Per backbone it measures

    params      parameters of the whole policy (encoder + backbone; the state encoder is identity)
    call ms     one denoiser call at batch 1
    chunk@K ms  one full `policy.sample` at batch 1 with K denoising steps (observation validation,
                normalization and encoding included)
    train it/s  optimizer steps per second at batch 64 (compute_loss + backward + AdamW)

each the median over `--repeats` timed repeats after one warm-up, all in one process, with the ratio
against Diffusion Policy's full-size UNet measured in the same run ("x": time ratio for latencies,
lower is faster; speed ratio for it/s, higher is faster).

A second table measures the sampling loop's own cost per step for the MLP denoiser: one
`sample_normalized` call (condition encoded once) at K = 10 and 100 steps against K network calls,
with the core's value checks made once per call (the default) and, as the baseline in the same
process, made inside every step (the loop before 2026-12); CPU time of the sampling thread. Usage:

    python benchmarks/backbones.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from diffpolicy.core import samplers
from diffpolicy.policies import ChunkPolicy, Normalizer, PolicyConfig, diffusion_process

TO, OBS_DIM, DA, TP = 2, 20, 2, 16
BASELINE = "unet (DP default)"
BACKBONES: dict[str, dict] = {
    BASELINE: {"type": "unet", "down_dims": [256, 512, 1024], "time_embed_dim": 256},
    "unet small": {"type": "unet"},
    "dit small": {"type": "dit"},
    "mlp": {"type": "mlp"},
}
CHUNK_STEPS = (1, 2, 10, 100)


def make_policy(backbone: dict, seed: int = 0) -> ChunkPolicy:
    """A PushT-shaped chunk policy with the given backbone spec (stats fit on uniform data)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit({"action": rng.uniform(0, 512, (256, DA)),
                                 "state": rng.uniform(0, 512, (256, OBS_DIM))})
    config = PolicyConfig(obs_shapes={"state": (OBS_DIM,)}, action_dim=DA, obs_horizon=TO, pred_horizon=TP,
                          action_horizon=8, process=diffusion_process(), backbone=backbone)
    return ChunkPolicy(config, normalizer)


def median_seconds(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of `fn()` on `clock` (wall time by default) over `repeats` calls after one
    untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        began = clock()
        fn()
        times.append(clock() - began)
    return statistics.median(times)


def measure(policy: ChunkPolicy, repeats: int, train_steps: int) -> dict[str, float]:
    """The table's numbers for one policy: params, call/chunk latencies (s) and train it/s."""
    g = torch.Generator().manual_seed(0)
    obs = {"state": torch.rand(1, TO, OBS_DIM, generator=g) * 512}
    results: dict[str, float] = {"params": float(sum(p.numel() for p in policy.parameters()))}

    policy.eval()
    with torch.no_grad():
        cond = policy.encode_obs(obs)
        x, t = torch.randn(1, TP, DA, generator=g), torch.full((1, TP), 0.5)
        results["call"] = median_seconds(lambda: policy.backbone(x, t, cond), repeats)
    for steps in CHUNK_STEPS:
        results[f"chunk@{steps}"] = median_seconds(
            lambda: policy.sample(obs, steps=steps, generator=torch.Generator().manual_seed(1)), repeats)

    policy.train()
    batch = {"obs": {"state": torch.rand(64, TO, OBS_DIM, generator=g) * 512},
             "action": torch.rand(64, TP, DA, generator=g) * 512}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=1e-6)

    def train() -> None:
        for _ in range(train_steps):
            loss = policy.compute_loss(batch, generator=g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    results["train it/s"] = train_steps / median_seconds(train, repeats)
    return results


def loop_overhead(policy: ChunkPolicy, repeats: int, steps_list: tuple[int, ...] = (10, 100)) -> list[str]:
    """Lines of the per-step overhead table: for K steps, K network calls vs one sampling call with
    value checks once per call and with them in every step (`samplers.values_checked` disabled).
    Times are this thread's CPU time (`time.thread_time`), so other processes on the machine do not
    inflate them."""
    g = torch.Generator().manual_seed(0)
    obs = {"state": torch.rand(1, TO, OBS_DIM, generator=g) * 512}
    policy.eval()
    lines = [f"{'steps K':<8}{'K calls ms':>12}{'checks/step ms':>16}{'checks/call ms':>16}"
             f"{'overhead/step us (per step -> per call)':>42}{'speed-up':>10}"]
    with torch.no_grad():
        cond = policy.encode_obs(obs)
        x, t = torch.randn(1, TP, DA, generator=g), torch.full((1, TP), 0.5)
        call = median_seconds(lambda: policy.backbone(x, t, cond), repeats * 10, time.thread_time)
        for steps in steps_list:
            def run() -> None:
                policy.sample_normalized(cond, steps=steps, generator=torch.Generator().manual_seed(1))
            lean = median_seconds(run, repeats, time.thread_time)
            original = samplers.values_checked
            samplers.values_checked = contextlib.nullcontext  # the baseline: value checks in every step
            try:
                checked = median_seconds(run, repeats, time.thread_time)
            finally:
                samplers.values_checked = original
            per_step = [(total - steps * call) / steps * 1e6 for total in (checked, lean)]
            lines.append(f"{steps:<8}{steps * call * 1e3:>12.2f}{checked * 1e3:>16.2f}{lean * 1e3:>16.2f}"
                         f"{f'{per_step[0]:.1f} -> {per_step[1]:.1f}':>42}{checked / lean:>9.2f}x")
    return lines


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """One line per backbone: value and ratio against the baseline row."""
    base = rows[BASELINE]
    columns = ["params", "call", *(f"chunk@{k}" for k in CHUNK_STEPS), "train it/s"]
    titles = ["params", "call ms", *(f"chunk@{k} ms" for k in CHUNK_STEPS), "train it/s"]
    lines = [f"{'backbone':<20}" + "".join(f"{title:>21}" for title in titles)]
    for name, row in rows.items():
        cells = []
        for column in columns:
            value, ratio = row[column], row[column] / base[column]
            if column == "params":
                text = f"{value / 1e6:.2f}M"
            elif column == "train it/s":
                text = f"{value:.3g}"
            else:
                text = f"{value * 1e3:.2f}"
            cells.append(f"{text} ({ratio:.3f}x)")
        lines.append(f"{name:<20}" + "".join(f"{cell:>21}" for cell in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per number; the median is shown")
    parser.add_argument("--train-steps", type=int, default=3, help="optimizer steps per timed training repeat")
    parser.add_argument("--loop-only", action="store_true", help="only the sampling-loop overhead table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.loop_only:
        print("\n".join(loop_overhead(make_policy(BACKBONES["mlp"]), args.repeats)))
        return
    rows = {name: measure(make_policy(spec), args.repeats, args.train_steps) for name, spec in BACKBONES.items()}
    print(f"Backbones on CPU: To={TO}, obs {OBS_DIM}-D, Da={DA}, Tp={TP}; batch 1 latencies, batch 64 training; "
          f"median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}")
    print(format_table(rows))
    print(f"(x): ratio to '{BASELINE}' measured in this run: time ratio for ms (lower is faster), "
          f"speed ratio for it/s (higher is faster)")
    print("\nSampling-loop overhead, MLP denoiser, batch 1 (one network call timed alone; overhead = "
          "(loop - K calls) / K):")
    print("\n".join(loop_overhead(make_policy(BACKBONES["mlp"]), args.repeats)))


if __name__ == "__main__":
    main()

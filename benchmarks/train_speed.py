"""Training throughput on this CPU: steps / s, achieved FLOP / s and efficiency against the CPU's
matrix-multiply peak, for the main job's PushT network and for Diffusion Policy's default UNet.

One training step is the trainer's: `policy.compute_loss` on a batch of `--batch` PushT windows
(the real card's policy: To = 2, 20-D state, Tp = 16, Da = 2; DDPM, clean-chunk prediction),
backward, gradient clipping, AdamW, the EMA update. Rows add one lever at a time to the main
job's network as it was before 2026-12 (Mish, per-tensor AdamW, one thread), all in one process,
and report the speed-up against that first row:

    baseline      MLP 512 x 3 blocks, Mish, AdamW (foreach), 1 thread
    + fused AdamW `optim.fused=true`
    + SiLU        `policy.backbone.activation=silu`
    + 2 threads   `train.num_threads=2`
    + bf16        bf16 autocast of the forward pass (`train.cpu_bf16=true`), 1 and 2 threads; only on a
                  CPU with native bf16 matrix multiplies (`diffpolicy.train.precision`)
    + compile     `torch.compile` of the denoiser (`--compile`; the compile time is reported apart)
    + lean step   no gradient clipping (`optim.grad_clip=null`) and the EMA folded in every 4 steps
                  (`train.ema_every=4`): the main job's step
    DP UNet       Diffusion Policy's default ConditionalUnet1D (down dims 256, 512, 1024), 1 and 2 threads

FLOPs of a step are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix multiplies and
convolutions, forward and backward); the peak is the best of `torch.mm` at the network's own layer
shapes (`(B, in) @ (in, out)`, each Linear of the MLP) at the row's thread count and precision. A
second table splits the fastest configuration's step into its parts, a third gives its steps / s and
windows / s at each batch size of `--batches` on one and two threads. Usage:

    python benchmarks/train_speed.py [--batch 256] [--steps 30] [--compile] [--no-unet] [--batches 64,128,256,512]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffpolicy.nn.ema import EMA
from diffpolicy.policies import ChunkPolicy, Normalizer
from diffpolicy.train.clipping import clip_gradients
from diffpolicy.train.config import build_config
from diffpolicy.train.precision import native_cpu_bf16

DP_UNET = ["policy.backbone={\"type\": \"unet\", \"down_dims\": [256, 512, 1024], \"time_embed_dim\": 256}"]
MAIN_JOB_NETWORK = ["policy.backbone.hidden_dim=512"]
FAST = (*MAIN_JOB_NETWORK, "optim.fused=true", "policy.backbone.activation=silu")


@dataclass(frozen=True)
class Variant:
    """One row: config overrides on the PushT diffusion card, threads, compile."""

    name: str
    overrides: tuple[str, ...]
    threads: int
    compile: bool = False
    bf16: bool = False
    steps: int | None = None  # timed steps (None: --steps)
    clip: bool = True  # gradient clipping at norm 1
    ema_every: int = 1  # steps between EMA updates

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the row's matrix multiplies."""
        return torch.bfloat16 if self.bf16 else torch.float32


def make_policy(overrides: tuple[str, ...]) -> tuple[ChunkPolicy, torch.optim.Optimizer, EMA]:
    """The PushT card's diffusion policy with `overrides`, its AdamW and EMA as the trainer builds them."""
    config = build_config("pusht", "diffusion", list(overrides))
    rng = np.random.default_rng(0)
    shapes = {**{k: v[0] for k, v in config.policy.obs_shapes.items()}, "action": config.policy.action_dim}
    normalizer = Normalizer.fit({key: rng.uniform(0, 512, (256, dim)) for key, dim in shapes.items()})
    torch.manual_seed(0)
    policy = ChunkPolicy(config.policy, normalizer)
    optim = config.optim
    optimizer = torch.optim.AdamW(policy.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay, fused=optim.fused)
    return policy, optimizer, EMA(policy)


def make_batch(policy: ChunkPolicy, batch: int) -> dict:
    """A batch of `batch` random windows in data units: obs `{key: (B, To, dim)}`, action `(B, Tp, Da)`."""
    g = torch.Generator().manual_seed(0)
    c = policy.config
    obs = {k: torch.rand(batch, c.obs_horizon, *shape, generator=g) * 512 for k, shape in c.obs_shapes.items()}
    return {"obs": obs, "action": torch.rand(batch, c.pred_horizon, c.action_dim, generator=g) * 512}


def step_parts(policy: ChunkPolicy, optimizer: torch.optim.Optimizer, ema: EMA, batch: dict,
               loss_fn: Callable[[dict], torch.Tensor], clip: bool = True,
               ema_every: int = 1) -> dict[str, Callable[[], object]]:
    """The trainer's step as named parts, run in order (the EMA part updates every `ema_every`-th call,
    folding in the skipped steps, as the trainer does)."""
    state: dict = {"calls": 0}

    def forward() -> None:
        state["loss"] = loss_fn(batch)

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        state["loss"].backward()

    def update_ema() -> None:
        state["calls"] += 1
        if state["calls"] % ema_every == 0:
            ema.update(policy, steps=ema_every)

    parts = {"forward": forward, "backward": backward,
             "clip": lambda: clip_gradients(policy.parameters(), 1.0),
             "optimizer": optimizer.step, "ema": update_ema}
    return parts if clip else {name: part for name, part in parts.items() if name != "clip"}


def time_step(parts: dict[str, Callable[[], object]], steps: int, period: int = 1) -> tuple[float, dict[str, float]]:
    """Median seconds of a whole step over `steps` timed steps (after 3 warm-up steps, 1 when
    `steps` < 5: Diffusion Policy's UNet takes seconds per step), and the median seconds of each part.
    With `period` > 1 the medians are over rounds of `period` steps, divided by `period` (a part that
    runs every `period`-th step counts at its average)."""
    warmup = 3 if steps >= 5 else 1
    times: dict[str, list[float]] = {name: [] for name in parts}
    totals = []
    for i in range(steps + warmup):
        began = time.perf_counter()
        spent = dict.fromkeys(parts, 0.0)
        for _ in range(period):
            for name, part in parts.items():
                mark = time.perf_counter()
                part()
                spent[name] += time.perf_counter() - mark
        if i >= warmup:
            totals.append((time.perf_counter() - began) / period)
            for name, value in spent.items():
                times[name].append(value / period)
    return statistics.median(totals), {name: statistics.median(v) for name, v in times.items()}


def step_flops(policy: ChunkPolicy, batch: dict) -> float:
    """FLOPs of one forward + backward of the loss (matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        policy.compute_loss(batch, generator=torch.Generator().manual_seed(0)).backward()
    policy.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak(policy: ChunkPolicy, batch: int, threads: int, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of `torch.mm` in `dtype` at the shapes of the policy's Linear layers, `(batch, in) @ (in, out)`."""
    torch.set_num_threads(threads)
    shapes = {(m.in_features, m.out_features) for m in policy.backbone.modules() if isinstance(m, nn.Linear)}
    best = 0.0
    for fan_in, fan_out in sorted(shapes):
        a, w = torch.randn(batch, fan_in, dtype=dtype), torch.randn(fan_in, fan_out, dtype=dtype)
        repeats = max(20, int(2e9 / (2 * batch * fan_in * fan_out)))
        for _ in range(5):
            torch.mm(a, w)
        began = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, w)
        best = max(best, 2 * batch * fan_in * fan_out * repeats / (time.perf_counter() - began))
    return best


def variants(args: argparse.Namespace) -> list[Variant]:
    before = (*MAIN_JOB_NETWORK, "optim.fused=false", "policy.backbone.activation=mish")
    fused = (*MAIN_JOB_NETWORK, "optim.fused=true", "policy.backbone.activation=mish")
    silu = FAST
    rows = [Variant("baseline (Mish, AdamW, 1 thread)", before, 1), Variant("+ fused AdamW", fused, 1),
            Variant("+ SiLU", silu, 1), Variant("+ 2 threads", silu, 2)]
    if native_cpu_bf16():
        rows += [Variant("+ bf16 autocast (1 thread)", silu, 1, bf16=True),
                 Variant("+ bf16 autocast (2 threads)", silu, 2, bf16=True)]
    else:
        print("# no native bf16 matrix multiply on this CPU: bf16 rows skipped")
    rows.append(Variant("+ lean step (no clip, EMA every 4)", silu, 2, bf16=native_cpu_bf16(), clip=False,
                        ema_every=4))
    if args.compile:
        rows.append(Variant("+ torch.compile", silu, 2, compile=True, bf16=native_cpu_bf16()))
    if not args.no_unet:
        unet = (*DP_UNET, "optim.fused=false")
        rows += [Variant("DP UNet (1 thread)", unet, 1, steps=2), Variant("DP UNet (2 threads)", unet, 2, steps=2)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row (DP UNet: 2)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--no-unet", action="store_true", help="skip Diffusion Policy's UNet rows")
    parser.add_argument("--batches", default="64,128,256,512", help="batch sizes of the third table ('' to skip)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, batch {args.batch}")

    peaks: dict[tuple[int, torch.dtype], float] = {}
    rows, fastest = [], None
    for variant in variants(args):
        torch.set_num_threads(variant.threads)
        policy, optimizer, ema = make_policy(variant.overrides)
        batch = make_batch(policy, args.batch)
        flops = step_flops(policy, batch)
        def loss_fn(b: dict, p: ChunkPolicy = policy, bf16: bool = variant.bf16) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return p.compute_loss(b)

        compile_s = 0.0
        if variant.compile:
            policy.backbone.compile()  # in place: the parameter names (and the EMA's) stay
            began = time.perf_counter()
            loss_fn(batch).backward()
            compile_s = time.perf_counter() - began
        seconds, parts = time_step(step_parts(policy, optimizer, ema, batch, loss_fn, variant.clip, variant.ema_every),
                                   variant.steps or args.steps, period=variant.ema_every)
        if (variant.threads, variant.dtype) not in peaks:
            peaks[variant.threads, variant.dtype] = matmul_peak(make_policy(MAIN_JOB_NETWORK)[0], args.batch,
                                                                variant.threads, variant.dtype)
        rows.append((variant, seconds, flops, compile_s))
        if not variant.name.startswith("DP"):
            fastest = (variant, seconds, parts) if fastest is None or seconds < fastest[1] else fastest

    base = rows[0][1]
    print(f"{'configuration':<36}{'ms/step':>9}{'steps/s':>9}{'GFLOP/step':>12}{'GFLOP/s':>9}"
          f"{'peak GFLOP/s':>14}{'efficiency':>12}{'speed-up':>10}")
    for variant, seconds, flops, compile_s in rows:
        achieved = flops / seconds / 1e9
        peak = peaks[variant.threads, variant.dtype] / 1e9
        note = f"  (compile {compile_s:.0f} s)" if variant.compile else ""
        print(f"{variant.name:<36}{seconds * 1e3:>9.1f}{1 / seconds:>9.1f}{flops / 1e9:>12.2f}{achieved:>9.1f}"
              f"{peak:>14.1f}{achieved / peak:>11.0%}{base / seconds:>9.3g}x{note}")
    variant, seconds, parts = fastest
    print(f"\nparts of a step, {variant.name.lstrip('+ ')} (median ms):")
    print("  " + "  ".join(f"{name} {value * 1e3:.1f}" for name, value in parts.items())
          + f"  = {sum(parts.values()) * 1e3:.1f}")
    if args.batches:
        print("\nbatch size and threads, SiLU + fused AdamW (steps / s, windows / s):")
        print(f"{'batch':>6}" + "".join(f"{f'{n} thread' + ('s' if n > 1 else ''):>24}" for n in (1, 2)))
        for size in (int(b) for b in args.batches.split(",")):
            cells = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                policy, optimizer, ema = make_policy(FAST)
                batch = make_batch(policy, size)
                seconds, _ = time_step(step_parts(policy, optimizer, ema, batch, policy.compute_loss), args.steps)
                cells.append(f"{1 / seconds:.1f} / {size / seconds:.0f}")
            print(f"{size:>6}" + "".join(f"{cell:>24}" for cell in cells))


if __name__ == "__main__":
    main()

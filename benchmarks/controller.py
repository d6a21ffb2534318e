"""The real-time controller on a task (`--task`, PushT by default; Lift): every mode at simulated
delays, the Diffusion Policy reference, the control tick's latency and a safety soak. One table, one run.

Rows: each mode at each delay d (ticks of inference during which the committed actions execute,
`diffpolicy eval --controller MODE --delay D`'s deterministic protocol), on the policy trained for
it: `sync`, `ensemble`, `rtc` on the `--shared` policy (loss.token_times shared, Diffusion Policy's
training); `prefix`, `streaming`, `warmstart` on the `--mix` policy (a token-time mix with ladder and
prefix shares, e.g. ladder:0.4,prefix:0.4,shared:0.2). `--cross` adds every mode on the other policy
too (labelled by its policy), to separate what the mode does from what the training does.
Columns: success over the held-out seeds with its 95 % Wilson interval, the change against the same
mode at d = 0, denoiser calls (NFE) per executed action and its ratio to the reference's, mean jerk,
mean largest seam jump, queue underruns, commands the safety filter changed. Every row's commands
pass through the robot profile's safety filter (`--profile`, default: the task's) on their way to
the environment, as on a robot (`ControlSpec.profile`); holds command the profile's hold target.
The reference row is Diffusion Policy's default sampler on the shared policy: DDPM (eta = 1) with
100 steps, execute Ta = 8, sync at d = 0.

Then the control tick: p50 / p99 of `RealTimeController.tick` (queue pop, watchdog, safety filter,
interpolation; inference excluded: a stub returns chunks, completed between ticks on a fake clock),
in wall time and in the thread's CPU time (on a shared machine the wall p99 is preemption),
and a soak of `--soak-ticks` ticks with injected stalls (1 %), NaN chunks (2 %), chunks that jump
(2 %) and stale observations (1 %) behind the PushT robot profile: every command is checked against
the profile's limits (`safety.within_limits`); `--skip-timing` leaves both out (they do not depend on
the task).

Every (mode, policy, delay) result is cached in `--out` as JSON, so an interrupted run resumes;
`--only-configs` splits one run over processes sharing `--out`. docs/RESULTS.md has the commands
that train the policies and run the tables.

    python benchmarks/controller.py --shared runs/ctl_shared --mix runs/ctl_mix --episodes 100 --cross
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from diffpolicy.control.execution import ControlSpec
from diffpolicy.control.modes import Generated, make_mode
from diffpolicy.control.profile import load_profile
from diffpolicy.control.realtime import RealTimeController
from diffpolicy.control.safety import within_limits
from diffpolicy.envs.tasks import load_task
from diffpolicy.evaluation.rollout import evaluate
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir

POLICY_OF_MODE = {"sync": "shared", "ensemble": "shared", "rtc": "shared",
                  "prefix": "mix", "streaming": "mix", "warmstart": "mix"}


def load(path: str) -> ChunkPolicy:
    return ChunkPolicy.from_pretrained(resolve_policy_dir(path)).eval()


def run_config(name: str, policy: ChunkPolicy, spec: ControlSpec, args, cache: Path) -> dict | None:
    """Evaluate one (mode, delay) on the held-out seeds, cached (None: not cached and --table-only)."""
    path = cache / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if args.table_only:
        return None
    started = time.perf_counter()
    result = evaluate(policy, load_task(args.task), episodes=args.episodes, seed_start=args.seed, n_envs=args.n_envs,
                      control=spec)
    summary = {**result.summary, "seconds": time.perf_counter() - started}
    atomic_write_text(path, json.dumps(summary, indent=1))
    print(f"{name}: {summary['success_rate']['successes']}/{summary['episodes']} "
          f"nfe/action {summary['control']['nfe_per_action']:.3f} ({summary['seconds']:.0f} s)", flush=True)
    return summary


def labelled_chunk(request) -> Generated:
    horizon = 16
    k = torch.arange(horizon, dtype=torch.float64)
    return Generated(torch.stack([200 + 10 * torch.sin(k / 3 + request.chunk_id), 250 + k], -1)[None], None, None, 1)


class StubPolicy:
    def __init__(self, config):
        self.config = config


def tick_latency(config, ticks: int) -> dict:
    """p50 / p99 microseconds of one control tick (inference excluded)."""
    controller = RealTimeController(StubPolicy(config), make_mode("rtc"), load_profile("pusht"), infer=labelled_chunk)
    obs = {k: np.zeros(v) for k, v in config.obs_shapes.items()}
    controller.reset(obs, np.array([256.0, 256.0]), 0.0)
    controller.run_pending()
    times, cpu = [], []
    for tick in range(ticks):
        now = tick * 0.1
        started, started_cpu = time.perf_counter(), time.thread_time()
        controller.tick(now)
        times.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
        controller.observe(obs, now)
        if controller.pending is not None and tick % 3 == 0:
            controller.run_pending()
    us, cpu_us = 1e6 * np.array(times), 1e6 * np.array(cpu)
    return {"ticks": ticks, "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "cpu_p50_us": float(np.percentile(cpu_us, 50)),
            "cpu_p99_us": float(np.percentile(cpu_us, 99))}


def soak(config, ticks: int, seed: int = 0) -> dict:
    """Injected faults behind the PushT profile; counts commands outside the limits."""
    rng = np.random.default_rng(seed)
    profile = load_profile("pusht")

    def faulty(request):
        out = labelled_chunk(request)
        draw = rng.random()
        if draw < 0.02:
            out.actions[0, rng.integers(16), rng.integers(2)] = float("nan")
        elif draw < 0.04:
            out.actions[0] += rng.choice([-1, 1]) * rng.uniform(300, 5000)
        elif draw < 0.06:
            out.actions[0] = torch.as_tensor(rng.uniform(-2000, 2500, size=(16, 2)))
        return out

    controller = RealTimeController(StubPolicy(config), make_mode("rtc"), profile, infer=faulty)
    obs = {k: np.zeros(v) for k, v in config.obs_shapes.items()}
    controller.reset(obs, np.array([256.0, 256.0]), 0.0)
    controller.run_pending()
    commands = np.empty((ticks + 1, 2))
    commands[0] = controller.safety.position
    done_at, stale_until, now = None, -1, 0.0
    for tick in range(ticks):
        now = tick * 0.1
        if done_at is not None and tick >= done_at:
            controller.run_pending()
            done_at = None
        out = controller.tick(now)
        commands[tick + 1] = out.command
        if rng.random() < 0.01:
            stale_until = tick + int(rng.integers(3, 10))
        if tick > stale_until:
            controller.observe(obs, now)
        if controller.pending is not None and done_at is None:
            stall = rng.random() < 0.01
            done_at = tick + (int(rng.integers(25, 60)) if stall else int(rng.integers(1, 5)))
    ok = within_limits(profile, commands)
    return {"ticks": ticks, "out_of_limit": int((~ok).sum()), "flags": dict(controller.flags)}


def table(rows: list[dict], reference: dict | None) -> str:
    ref_nfe = None if reference is None else reference["control"]["nfe_per_action"]
    lines = ["| mode (policy) | d | success [95 % CI] | vs d = 0 | NFE / action | NFE vs reference | mean jerk | "
             "mean max seam jump | underruns | limited |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, c = row["summary"]["success_rate"], row["summary"]["control"]
        base = row.get("base")
        delta = "" if base is None else f"{100 * (s['rate'] - base):+.0f} pts"
        lines.append(f"| {row['label']} | {row['delay']} | {s['successes']}/{row['summary']['episodes']} "
                     f"[{s['ci95_low']:.2f}, {s['ci95_high']:.2f}] | {delta} | {c['nfe_per_action']:.3f} | "
                     f"{'n/a' if ref_nfe is None else format(c['nfe_per_action'] / ref_nfe, '.3f')} | {c['mean_jerk']:.1f} | {c['mean_seam_jump']:.1f} | "
                     f"{c['underruns']} | {c['limited_commands']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", required=True, help="policy trained with token_times shared")
    parser.add_argument("--mix", required=True, help="policy trained with the ladder/prefix/shared mix")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=100000)
    parser.add_argument("--n-envs", type=int, default=10)
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 3, 1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["sync", "rtc", "prefix", "streaming", "warmstart", "ensemble"])
    parser.add_argument("--task", default="pusht", help="task card the policies were trained on")
    parser.add_argument("--profile", default=None,
                        help="robot profile whose safety filter every command passes (default: the task's)")
    parser.add_argument("--cross", action="store_true", help="also run every mode on the other policy")
    parser.add_argument("--tick-samples", type=int, default=20000)
    parser.add_argument("--soak-ticks", type=int, default=1_000_000)
    parser.add_argument("--out", default="runs/bench_controller")
    parser.add_argument("--reference-only", action="store_true", help="run (and cache) the reference row only")
    parser.add_argument("--table-only", action="store_true",
                        help="no evaluation: the table of the rows cached in --out, then the tick and soak")
    parser.add_argument("--no-timing", action="store_true", help="print the results of tick_latency.json and "
                        "soak.json in --out instead of measuring them again")
    parser.add_argument("--skip-timing", action="store_true",
                        help="no control-tick latency or soak (they do not depend on the task: run them once)")
    parser.add_argument("--only-configs", action="store_true",
                        help="run (and cache) the mode x delay rows only: no reference, table, tick or soak "
                             "(to split one run over several processes sharing --out)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    policies = {"shared": load(args.shared), "mix": load(args.mix)}
    profile = load_profile(args.profile or args.task)

    results = {}

    pairs = [(mode, POLICY_OF_MODE[mode]) for mode in args.modes]
    if args.cross:
        pairs += [(mode, other) for mode in args.modes for other in policies if other != POLICY_OF_MODE[mode]]

    def run_delays(delays):
        for delay in delays:
            for mode, trained in pairs:
                spec = ControlSpec(make_mode(mode), delay, profile=profile)
                results[mode, trained, delay] = run_config(f"{mode}_{trained}_d{delay}_n{args.episodes}",
                                                           policies[trained], spec, args, cache)

    if args.reference_only:
        args.delays = []
    run_delays(args.delays[:2])  # the default order puts d = 0 and d = 3 first: the goals' columns
    if args.only_configs:
        run_delays(args.delays[2:])
        return
    reference_policy = load(args.shared)
    reference_policy.set_sampling(inference_steps=100, eta=1.0)
    reference = run_config(f"reference_ddpm100_sync_d0_n{args.episodes}", reference_policy,
                           ControlSpec(make_mode("sync"), 0, profile=profile), args, cache)
    if args.reference_only:
        return
    run_delays(args.delays[2:])
    rows = []
    for mode, trained in pairs:
        for delay in sorted(args.delays):
            if results[mode, trained, delay] is None:
                continue
            base = results.get((mode, trained, 0))
            rows.append({"label": f"{mode} ({trained})", "delay": delay, "summary": results[mode, trained, delay],
                         "base": None if base is None or delay == 0 else base["success_rate"]["rate"]})
    if reference is not None:
        rows.append({"label": "reference: DDPM 100 steps, sync (shared)", "delay": 0, "summary": reference,
                     "base": None})
    print(f"\n{args.task}, {args.episodes} held-out episodes from seed {args.seed}; {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, 1 thread")
    print(table(rows, reference))
    if args.skip_timing:
        return
    config = policies["shared"].config
    if args.no_timing:
        latency = json.loads((cache / "tick_latency.json").read_text())
        soaked = json.loads((cache / "soak.json").read_text())
    else:
        latency = tick_latency(config, args.tick_samples)
        soaked = soak(config, args.soak_ticks)
        atomic_write_text(cache / "tick_latency.json", json.dumps(latency, indent=1))
        atomic_write_text(cache / "soak.json", json.dumps(soaked, indent=1))
    print(f"\ncontrol tick (inference excluded), {latency['ticks']} ticks: wall p50 {latency['p50_us']:.0f} us, "
          f"p99 {latency['p99_us']:.0f} us, max {latency['max_us']:.0f} us; thread CPU time p50 "
          f"{latency['cpu_p50_us']:.0f} us, p99 {latency['cpu_p99_us']:.0f} us")
    print(f"soak: {soaked['ticks']} ticks, {soaked['out_of_limit']} out-of-limit commands; flags {soaked['flags']}")


if __name__ == "__main__":
    main()

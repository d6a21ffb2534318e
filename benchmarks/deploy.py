"""Deployment benchmark on CPU: the policy server against a local call, serialization against
pickle, and the ROS bridge's latency from observation message to command.

Policy: a PushT-shaped flow chunk policy (agent_pos (2,), keypoints (18,), To = 2, Tp = 16,
Da = 2, MLP 256 wide, 10 steps), untrained: the numbers time the path, not the policy's skill.

    server     round-trip latency p50 / p99 of `RemotePolicy.sample` (one request per client at a
               time) against `ChunkPolicy.sample` in this process, at 1, 8 and 32 concurrent
               clients; the server is `diffpolicy serve` in its own process (one torch thread).
               Overhead = remote p50 - local p50 at 1 client (goal: <= 1 ms). From each reply:
               the server's `infer_ms` (the policy call) and `queue_ms` (from the request's
               arrival in the socket thread to the worker's start: its decoding and the hand-off);
               the wire column is each request's round trip less both (the client's checks and
               codec, the sockets, the reply); round trip - infer_ms, per request, is all the
               server path adds to the policy call, paired, so it does not depend on which process
               the machine's load slows down (remote p50 - local p50 does). At 1 client also a `health` request, which the
               socket thread answers itself: the transport without the worker or any array. On a
               shared machine, pin it (`taskset -c N`): the server process inherits the affinity.
    codec      encode + decode of one observation request (msgpack, raw array bytes, schema
               checks) against pickle.dumps + pickle.loads of the same dict of arrays, in this
               process: a low-dim PushT observation and a 2 x 96 x 96 x 3 uint8 image one.
    bridge     with a roscore (ROS 1), on Cyclone DDS (ROS 2 types), and with the bridge as an rclpy
               node (Fast DDS) driving a Cyclone DDS robot (where .venv-rclpy or
               DIFFPOLICY_RCLPY_PYTHON has rclpy): `diffpolicy bridge` and
               `diffpolicy sim-robot` as processes for `--bridge-seconds`; from the bridge's
               heartbeats, `tick_ms` (the bridge's tick: controller tick + publication),
               `latency_ms` (newest observation's arrival -> command published) and
               `stamp_to_command_ms` (the observation's header stamp -> command published, so it
               includes the middleware's delivery). At 10 Hz the tick waits for its period, so
               the second also holds up to 100 ms of tick phase.
    success    a trained PushT checkpoint (`--checkpoint`): success of the simulated robot driven
               through ROS 1 (`sim-robot` + `bridge --mode sync`, in real time at 10 Hz) against
               direct evaluation (`evaluation.rollout.evaluate`) on the same seeds, each with its
               95 % Wilson interval. Through ROS the robot keeps stepping (holding its last
               command) while the policy infers; direct evaluation pauses the simulation.

    python benchmarks/deploy.py [--part server codec bridge] [--requests 300] [--bridge-seconds 15]
    python benchmarks/deploy.py --part success --checkpoint DIR [--episodes 20] [--seed 100000] [--modes sync rtc]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from diffpolicy.deploy import RemotePolicy
from diffpolicy.deploy.wire import check_request, decode_sample, encode_array, make_request, pack, unpack
from diffpolicy.policies import ChunkPolicy, Normalizer, PolicyConfig, flow_process
from diffpolicy.policies.locate import resolve_policy_dir

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"agent_pos": (2,), "keypoints": (18,)}
CYCLONE_LOOPBACK = ROOT / "deploy" / "cyclonedds_loopback.xml"
RCLPY_PYTHON = os.environ.get("DIFFPOLICY_RCLPY_PYTHON") or str(ROOT / ".venv-rclpy" / "bin" / "python")


def make_policy() -> ChunkPolicy:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    normalizer = Normalizer.fit({"action": rng.uniform(0, 512, (64, 2)), "agent_pos": rng.uniform(0, 512, (64, 2)),
                                 "keypoints": rng.uniform(0, 512, (64, 18))})
    config = PolicyConfig(obs_shapes=SHAPES, action_dim=2, obs_horizon=2, pred_horizon=16, action_horizon=8,
                          process=flow_process(), backbone={"type": "mlp", "hidden_dim": 256}, inference_steps=10)
    return ChunkPolicy(config, normalizer).eval()


def make_obs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.rand(1, 2, *shape, generator=g) * 512 for key, shape in SHAPES.items()}


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples_ms, 50)), float(np.percentile(samples_ms, 99))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict | None = None, python: str = sys.executable) -> subprocess.Popen:
    return subprocess.Popen([python, "-m", "diffpolicy.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


# ---------------------------------------------------------------------------- server
def bench_server(policy: ChunkPolicy, directory: Path, requests: int, clients_list: tuple[int, ...]) -> list[str]:
    obs = make_obs()
    for _ in range(10):
        policy.sample(obs)
    policy.save_pretrained(directory / "policy")
    port = free_port()
    server = start(["serve", "--checkpoint", str(directory / "policy"), "--port", str(port)])
    rows = []
    local: list[float] = []
    try:
        assert "serving" in server.stdout.readline()
        for clients in clients_list:
            remotes = [RemotePolicy.connect(f"tcp://127.0.0.1:{port}", timeout_s=60) for _ in range(clients)]
            for remote in remotes:
                remote.sample(obs)
            times: list[list[float]] = [[] for _ in range(clients)]
            infer: list[list[float]] = [[] for _ in range(clients)]
            queued: list[list[float]] = [[] for _ in range(clients)]
            path: list[list[float]] = [[] for _ in range(clients)]
            wire: list[list[float]] = [[] for _ in range(clients)]
            per_client = max(10, requests // clients)

            def loop(i: int) -> None:
                for _ in range(per_client):
                    if clients == 1:  # the local call interleaved with the remote one: both see the same load
                        t0 = time.perf_counter()
                        policy.sample(obs)
                        local.append((time.perf_counter() - t0) * 1e3)
                    t0 = time.perf_counter()
                    remotes[i].sample(obs)
                    times[i].append((time.perf_counter() - t0) * 1e3)
                    timing = remotes[i].last_timing
                    infer[i].append(timing.infer_ms)
                    queued[i].append(timing.queue_ms)
                    path[i].append(timing.round_trip_ms - timing.infer_ms)
                    wire[i].append(timing.round_trip_ms - timing.infer_ms - timing.queue_ms)

            threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            health: list[float] = []
            if clients == 1:  # the transport alone: a request the socket thread answers (no worker, no arrays)
                for _ in range(per_client):
                    t0 = time.perf_counter()
                    remotes[0].client.request("health")
                    health.append((time.perf_counter() - t0) * 1e3)
            for remote in remotes:
                remote.close()
            p50, p99 = percentiles(sum(times, []))
            if clients == 1:
                local_p50, local_p99 = percentiles(local)
                rows.append(f"| local `ChunkPolicy.sample` (this process, interleaved with the 1-client remote calls) | "
                            f"1 | {local_p50:.2f} | {local_p99:.2f} | - | - | - | - | 1.00 |")
            infer_p50, queue_p50, wire_p50 = (float(np.median(sum(x, []))) for x in (infer, queued, wire))
            path_p50, path_p99 = percentiles(sum(path, []))
            rows.append(f"| `RemotePolicy.sample` over loopback | {clients} | {p50:.2f} | {p99:.2f} | "
                        f"{infer_p50:.2f} | {queue_p50:.2f} | {wire_p50:.2f} | {path_p50:.2f} | {p50 / local_p50:.2f} |")
            if clients == 1:
                paired_p50 = float(np.median(np.array(times[0]) - np.array(local)))  # each remote call - its local one
                rows.append(f"| **server overhead at 1 client**: remote p50 - local p50 (p50 of remote - local per "
                            f"interleaved pair); per request, round trip - infer_ms, p50 / p99 | 1 | "
                            f"{p50 - local_p50:.2f} ({paired_p50:.2f}) | | | | | {path_p50:.2f} / {path_p99:.2f} | |")
                health_p50, health_p99 = percentiles(health)
                rows.append(f"| `health` request (answered by the socket thread: the transport alone) | 1 | "
                            f"{health_p50:.2f} | {health_p99:.2f} | | | | | |")
    finally:
        stop(server)
    if not local:
        raise SystemExit("--clients must include 1 (the local baseline is timed there)")
    header = ["| call | clients | p50 ms | p99 ms | server infer_ms p50 | server queue_ms p50 | "
              "round trip - infer - queue, p50 ms | round trip - infer, p50 ms | p50 / local p50 |",
              "|---|---|---|---|---|---|---|---|---|"]
    return header + rows


# ---------------------------------------------------------------------------- codec
def bench_codec(repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    observations = {
        "PushT state (2 x 2 + 2 x 18 float32)": {"agent_pos": rng.random((1, 2, 2), np.float32),
                                                 "keypoints": rng.random((1, 2, 18), np.float32)},
        "image (2 x 96 x 96 x 3 uint8) + state": {"image": rng.integers(0, 256, (1, 2, 96, 96, 3), np.uint8),
                                                  "agent_pos": rng.random((1, 2, 2), np.float32)},
    }
    rows = ["| observation | bytes msgpack | bytes pickle | msgpack encode+decode us | pickle dumps+loads us | ratio |",
            "|---|---|---|---|---|---|"]
    for name, obs in observations.items():
        def ours(obs=obs) -> bytes:
            raw = pack(make_request(1, "sample", {"obs": {k: encode_array(v) for k, v in obs.items()}}))
            _, _, body = check_request(unpack(raw, 2 ** 26))
            decode_sample(body)
            return raw

        def theirs(obs=obs) -> bytes:
            raw = pickle.dumps({"obs": obs}, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(raw)  # noqa: S301 - the baseline the server refuses to run on network input
            return raw

        timings = {}
        for label, fn in (("ours", ours), ("pickle", theirs)):
            size = len(fn())
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
            timings[label] = (size, float(np.median(samples)))
        rows.append(f"| {name} | {timings['ours'][0]} | {timings['pickle'][0]} | {timings['ours'][1]:.1f} | "
                    f"{timings['pickle'][1]:.1f} | {timings['ours'][1] / timings['pickle'][1]:.2f} |")
    return rows


# ---------------------------------------------------------------------------- bridge
def bench_bridge(policy: ChunkPolicy, directory: Path, seconds: float) -> list[str]:
    from diffpolicy.deploy.errors import BridgeError
    from diffpolicy.deploy.ros.transport import make_transport

    policy.save_pretrained(directory / "policy")
    rows = ["| transport | ticks | tick_ms p50 | p99 | latency_ms p50 | p99 | stamp_to_command_ms p50 | p99 |",
            "|---|---|---|---|---|---|---|---|"]
    setups = ["ros1"] if shutil.which("roscore") else []
    setups.append("ros2")
    if Path(RCLPY_PYTHON).exists():
        setups.append("rclpy")
    labels = {"ros1": "ROS 1 (rospy, roscore on loopback)", "ros2": "ROS 2 types on Cyclone DDS",
              "rclpy": "ROS 2: bridge on rclpy (Fast DDS), robot on Cyclone DDS"}
    for name in setups:
        env: dict[str, str] = {}
        roscore = None
        domain = 0  # ROS 1 has no domain
        bridge_python, bridge_args = sys.executable, None
        try:
            if name == "ros1":
                port = free_port()
                env = {"ROS_MASTER_URI": f"http://127.0.0.1:{port}", "ROS_HOSTNAME": "localhost",
                       "ROS_HOME": str(directory / "ros_home")}
                os.environ.update(env)
                roscore = subprocess.Popen(["roscore", "-p", str(port)], env={**os.environ}, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                time.sleep(3)
                transport_args = ["--transport", "ros1"]
            else:  # the robot and this listener on Cyclone DDS; with rclpy, the bridge is a ROS 2 node on Fast DDS
                env = {"CYCLONEDDS_URI": CYCLONE_LOOPBACK.as_uri(), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
                os.environ.update(env)
                domain = 150 + os.getpid() % 50
                transport_args = ["--transport", "ros2", "--domain-id", str(domain)]
                if name == "rclpy":
                    bridge_python, bridge_args = RCLPY_PYTHON, ["--transport", "rclpy", "--domain-id", str(domain)]
            transport = make_transport("ros1" if name == "ros1" else "ros2", node="diffpolicy_benchmark",
                                       domain_id=domain)
        except BridgeError as err:
            rows.append(f"| {name} | skipped: {err} | | | | | | |")
            continue
        beats: list[dict] = []
        transport.subscribe_text("/diffpolicy/heartbeat", lambda text: beats.append(json.loads(text)))
        bridge = start(["bridge", "--config", "pusht", *(bridge_args or transport_args), "--checkpoint",
                        str(directory / "policy")], env, bridge_python)
        robot = start(["sim-robot", "--config", "pusht", *transport_args, "--seeds", "0", "--max-steps", "100000"], env)
        deadline = time.monotonic() + 120
        while not any(b["state"] == "running" for b in beats) and time.monotonic() < deadline:
            time.sleep(0.1)
        first = len(beats)
        time.sleep(seconds)
        running = [b for b in beats[first:] if b["state"] == "running" and b["latency_ms"] is not None]
        stop(robot)
        stop(bridge)
        if name != "ros1":
            transport.close()
        if roscore is not None:
            stop(roscore, signal.SIGINT)
        lat = percentiles([b["latency_ms"] for b in running])
        tick = percentiles([b["tick_ms"] for b in running])
        stamp = percentiles([b["stamp_to_command_ms"] for b in running])
        rows.append(f"| {labels[name]} | "
                    f"{len(running)} | {tick[0]:.2f} | {tick[1]:.2f} | {lat[0]:.1f} | {lat[1]:.1f} | {stamp[0]:.1f} | "
                    f"{stamp[1]:.1f} |")
    return rows


def bench_success(checkpoint: Path, episodes: int, seed: int, directory: Path, modes: list[str],
                  direct: bool) -> list[str]:
    from diffpolicy.envs.tasks import load_task
    from diffpolicy.evaluation.rollout import evaluate
    from diffpolicy.evaluation.stats import wilson_interval

    card = load_task("pusht")
    rows = ["| path | episodes | successes | success rate [95 % Wilson] | mean coverage |", "|---|---|---|---|---|"]

    def row(name: str, successes: list[bool], coverage: list[float]) -> str:
        low, high = wilson_interval(sum(successes), len(successes))
        return (f"| {name} | {len(successes)} | {sum(successes)} | {sum(successes) / len(successes):.2f} "
                f"[{low:.2f}, {high:.2f}] | {np.mean(coverage):.3f} |")

    if direct:
        result = evaluate(ChunkPolicy.from_pretrained(checkpoint), card, episodes=episodes, seed_start=seed, n_envs=1)
        rows.append(row("direct `evaluate` (simulation paused while the policy infers)",
                        [bool(e.success) for e in result.episodes], [float(e.coverage) for e in result.episodes]))
    for mode in modes:
        rows.append(_ros_success_row(checkpoint, episodes, seed, directory, mode, row))
    return rows


def _ros_success_row(checkpoint: Path, episodes: int, seed: int, directory: Path, mode: str, row) -> str:
    port = free_port()
    env = {"ROS_MASTER_URI": f"http://127.0.0.1:{port}", "ROS_HOSTNAME": "localhost",
           "ROS_HOME": str(directory / "ros_home")}
    roscore = subprocess.Popen(["roscore", "-p", str(port)], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    time.sleep(3)
    bridge = start(["bridge", "--config", "pusht", "--transport", "ros1", "--checkpoint", str(checkpoint),
                    "--mode", mode], env)
    try:
        robot = start(["sim-robot", "--config", "pusht", "--transport", "ros1", "--seeds",
                       *map(str, range(seed, seed + episodes))], env)
        output, _ = robot.communicate()
        result = json.loads(output.strip().splitlines()[-1])["episodes"]
    finally:
        stop(bridge)
        stop(roscore, signal.SIGINT)
    return row(f"ROS 1: sim-robot -> bridge ({mode}) -> commands, real time 10 Hz",
               [bool(e["success"]) for e in result], [float(e["coverage"]) for e in result])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", default=["server", "codec", "bridge"],
                        choices=["server", "codec", "bridge", "success"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained PushT policy (--part success)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=100000)
    parser.add_argument("--modes", nargs="+", default=["sync"], help="controller modes of the ROS runs (--part success)")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct evaluation (--part success)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per setting")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--bridge-seconds", type=float, default=15.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"1 torch thread")
    policy = make_policy()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if "server" in args.part:
            print("\n".join(["", "Server vs local call"] + bench_server(policy, directory, args.requests,
                                                                         tuple(args.clients))), flush=True)
        if "codec" in args.part:
            print("\n".join(["", "Serialization of one observation request"] + bench_codec(args.requests)), flush=True)
        if "bridge" in args.part:
            print("\n".join(["", "Bridge latency"] + bench_bridge(policy, directory, args.bridge_seconds)), flush=True)
        if "success" in args.part:
            if args.checkpoint is None:
                raise SystemExit("--part success needs --checkpoint DIR (a trained PushT policy)")
            print("\n".join(["", "Success through ROS vs direct evaluation"] +
                             bench_success(resolve_policy_dir(args.checkpoint), args.episodes, args.seed, directory, args.modes,
                                           not args.no_direct)), flush=True)
    os._exit(0)  # rospy's threads do not end on their own


if __name__ == "__main__":
    main()

"""Helpers of the ROS bridge tests: a PushT-shaped policy, processes started and stopped by PID,
a listener of heartbeats and commands, and the end-to-end scenario both transports run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

import numpy as np
import torch

from diffpolicy.deploy.ros.config import load_bridge_config
from diffpolicy.deploy.ros.transport import Image, JointState
from diffpolicy.policies import ChunkPolicy, Normalizer, PolicyConfig, flow_process

ROOT = Path(__file__).resolve().parents[1]
PUSHT_SHAPES = {"agent_pos": (2,), "keypoints": (18,)}
CYCLONE_LOOPBACK = ROOT / "deploy" / "cyclonedds_loopback.xml"  # loopback only; also matches Fast DDS peers


def save_pusht_policy(path: Path) -> Path:
    """An (untrained) PushT-shaped flow policy at `path`: the path, not the policy's skill, is under test."""
    torch.manual_seed(0)
    config = PolicyConfig(obs_shapes=PUSHT_SHAPES, action_dim=2, obs_horizon=2, pred_horizon=8, action_horizon=4,
                          process=flow_process(), backbone={"type": "mlp", "hidden_dim": 32}, inference_steps=4)
    rng = np.random.default_rng(0)
    normalizer = Normalizer.fit({"action": rng.uniform(0, 512, (64, 2)), "agent_pos": rng.uniform(0, 512, (64, 2)),
                                 "keypoints": rng.uniform(0, 512, (64, 18))})
    ChunkPolicy(config, normalizer).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RosCore:
    """A roscore on a loopback port: roscore starts a rosmaster and a rosout node (each in its own
    session). `kill` SIGKILLs the three by PID (a crash), `start` brings a new one up on the same port."""

    def __init__(self, port: int, home: Path):
        self.port, self.uri = port, f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "ROS_MASTER_URI": self.uri, "ROS_HOSTNAME": "localhost", "ROS_HOME": str(home),
                    "PYTHONPATH": str(ROOT)}
        self.process: subprocess.Popen | None = None
        self.pids: list[int] = []  # roscore, its rosmaster, its rosout

    def start(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(["roscore", "-p", str(self.port)], env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        master = xmlrpc.client.ServerProxy(self.uri)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # up when its master answers and its rosout has registered
                code, _, rosout = master.lookupNode("/test", "/rosout")
                if code == 1:
                    self.pids = [self.process.pid, master.getPid("/test")[2],
                                 xmlrpc.client.ServerProxy(rosout).getPid("/test")[2]]
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"roscore did not start on port {self.port} within {timeout} s")

    def system_state(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """The master's {topic: [node, ...]} of publishers and of subscribers."""
        code, status, (publishers, subscribers, _) = xmlrpc.client.ServerProxy(self.uri).getSystemState("/test")
        assert code == 1, status
        return dict(publishers), dict(subscribers)

    def kill(self) -> None:
        """SIGKILL to roscore, its master and its rosout, by their PIDs (a crash: nothing unregisters)."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)

    def stop(self) -> None:
        """SIGINT to roscore (it stops its master and rosout); a kill after 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


class Listener:
    """Heartbeats and commands seen on the middleware by the test process."""

    def __init__(self, transport):
        self.beats: list[dict] = []
        self.commands: list[np.ndarray] = []
        self.lock = threading.Lock()
        config = load_bridge_config("pusht")
        transport.subscribe_text(config.heartbeat_topic, self._beat)
        transport.subscribe_joint_state(config.command_topic, self._command)

    def _beat(self, text: str) -> None:
        with self.lock:
            self.beats.append(json.loads(text))

    def _command(self, message: JointState) -> None:
        with self.lock:
            self.commands.append(np.asarray(message.position))

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = next((b for b in reversed(self.beats) if predicate(b)), None)
            if found is not None:
                return found
            time.sleep(0.05)
        with self.lock:
            last = self.beats[-3:]
        raise AssertionError(f"no heartbeat with {what} within {timeout} s; last ones: {last}")


def start(args: list[str], env: dict, python: str = sys.executable) -> subprocess.Popen:
    return subprocess.Popen([python, "-m", "diffpolicy.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def run_episode_scenario(transport_args: list[str], env: dict, listener: Listener, policy_args: list[str],
                         bridge_on: tuple[str, list[str]] | None = None) -> None:
    """Bridge + robot; kill the robot (hold); a new robot (recover, episode completes); SIGTERM (hold, stop).
    `policy_args`: ["--checkpoint", DIR] or ["--server", ADDRESS]. `bridge_on`: (python, transport args) when
    the bridge runs in another interpreter or on another transport than the robots (`transport_args`)."""
    python, bridge_args = bridge_on or (sys.executable, transport_args)
    bridge = start(["bridge", "--config", "pusht", *bridge_args, *policy_args], env, python)
    first = second = None
    try:
        first = start(["sim-robot", "--config", "pusht", *transport_args, "--seeds", "0", "--max-steps", "1000"], env)
        listener.wait_for(lambda b: b["state"] == "running" and b["commands"] >= 10, 90, "10 commands while running")
        os.kill(first.pid, signal.SIGKILL)  # the observation publisher dies
        first.wait(10)
        held = listener.wait_for(lambda b: b["state"] == "holding", 15, "state holding")
        assert held["watchdog"] is True and held["queue_depth"] is None
        second = start(["sim-robot", "--config", "pusht", *transport_args, "--seeds", "1", "--max-steps", "15"], env)
        output, _ = second.communicate(timeout=90)
        assert second.returncode == 0, output
        result = json.loads(output.strip().splitlines()[-1])
        assert result["episodes"][0]["steps"] == 15 and result["commands_received"] >= 15, result
        recovered = listener.wait_for(lambda b: b["state"] == "running" and b["restarts"] >= 2, 5, "a restart")
        assert recovered["latency_ms"] >= 0 and recovered["tick_ms"] >= 0
        assert isinstance(recovered["queue_depth"], int) and isinstance(recovered["delay_estimate"], int)
        os.kill(bridge.pid, signal.SIGTERM)
        output, _ = bridge.communicate(timeout=30)
        assert bridge.returncode == 0, output
        assert "bridge stopped" in output
        listener.wait_for(lambda b: b["state"] == "stopped", 5, "state stopped")
        with listener.lock:
            states = [b["state"] for b in listener.beats]
            commands = np.array(listener.commands)
        assert "stopping" in states and states.index("stopping") < len(states) - 1
        assert np.isfinite(commands).all() and (commands >= 0).all() and (commands <= 512).all()  # profile limits
    finally:
        for process in (first, second, bridge):
            if process is not None:
                stop(process)


def assert_image_round_trip(transport, timeout: float = 20.0) -> None:
    """A 96 x 96 rgb8 image published and received through the middleware, bytes and stamp intact."""
    received: list[Image] = []
    transport.subscribe_image("/diffpolicy_test/image", received.append)
    publish = transport.image_publisher("/diffpolicy_test/image")
    array = (np.arange(96 * 96 * 3) % 251).astype(np.uint8).reshape(96, 96, 3)
    deadline = time.monotonic() + timeout
    while not received and time.monotonic() < deadline:  # publish until the subscription is matched
        publish(Image.from_array(1234.5, array))
        time.sleep(0.1)
    assert received, f"no image received within {timeout} s"
    image = received[0]
    assert (image.height, image.width, image.encoding, image.step, image.stamp) == (96, 96, "rgb8", 288, 1234.5)
    assert image.data == array.tobytes()

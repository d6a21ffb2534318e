"""The ROS bridge against a real ROS 1 master: a roscore started by the test on loopback (stopped
by its PID); the simulated PushT robot and the bridge run as separate processes: the robot is driven
by the bridge's commands, killing it makes the bridge hold, a new robot makes it recover, SIGTERM
makes it hold, then stop. A roscore killed by its PIDs makes the bridge hold; a new one on the same
port gets the bridge's and the robot's topics registered again and the bridge runs again. Plus the
bridge's hold on a lost middleware (in process), the message mapping and the bridge config's bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
from ros_helpers import (
    PUSHT_SHAPES,
    Listener,
    RosCore,
    assert_image_round_trip,
    free_port,
    run_episode_scenario,
    save_pusht_policy,
    start,
    stop,
)

from diffpolicy.config import ConfigError
from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.bridge import Bridge, ObservationBuffer, image_value, observation_value
from diffpolicy.deploy.ros.config import BridgeConfig, ObservationTopic, load_bridge_config
from diffpolicy.deploy.ros.transport import Image, JointState, Transport, make_transport


def test_observation_values_by_position_and_by_name():
    plain = ObservationTopic("agent_pos", "/a")
    message = JointState(stamp=1.5, names=("y", "x"), position=np.array([2.0, 1.0]))
    assert observation_value(message, plain, (2,)).tolist() == [2.0, 1.0]
    named = ObservationTopic("agent_pos", "/a", names=("x", "y"))
    assert observation_value(message, named, (2,)).tolist() == [1.0, 2.0]
    with pytest.raises(BridgeError, match="needs 3 positions, got 2"):
        observation_value(message, plain, (3,))
    with pytest.raises(BridgeError, match="joint names"):
        observation_value(message, ObservationTopic("agent_pos", "/a", names=("x", "z")), (2,))
    with pytest.raises(BridgeError, match="non-finite"):
        observation_value(JointState(stamp=0.0, position=np.array([np.nan, 1.0])), plain, (2,))
    assert JointState(stamp=12.25).stamp_parts() == (12, 250_000_000)


def test_observation_buffer_feeds_whole_new_frames_and_counts_bad_messages():
    config = load_bridge_config("pusht")
    now = [100.0]
    buffer = ObservationBuffer(config, PUSHT_SHAPES, clock=lambda: now[0])
    agent, keypoints = (buffer.callback(topic) for topic in config.observations)
    assert buffer.snapshot(now[0])[0] is None and not buffer.take_new()
    agent(JointState(1.0, position=np.array([1.0, 2.0])))
    keypoints(JointState(1.0, position=np.arange(18.0)))
    obs, newest, age = buffer.snapshot(now[0])
    assert obs["agent_pos"].tolist() == [1.0, 2.0] and newest.stamp == 1.0 and age == 0.0
    assert buffer.take_new() and not buffer.take_new()  # the same frame is not new twice
    agent(JointState(2.0, position=np.array([3.0, 4.0])))
    assert not buffer.take_new()  # half a frame (keypoints not yet updated) is not new
    keypoints(JointState(2.0, position=np.arange(18.0)))
    assert buffer.take_new()
    agent(JointState(3.0, position=np.array([np.nan, 0.0])))  # dropped, counted, the last good value kept
    assert buffer.bad_messages == 1 and "non-finite" in buffer.last_error
    now[0] += config.max_observation_age_s + 0.01
    obs, _, age = buffer.snapshot(now[0])
    assert obs is None and age > config.max_observation_age_s  # stale: the bridge holds


def test_image_values_and_their_bad_input():
    topic = ObservationTopic("image", "/cam", type="image")
    array = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(image_value(Image.from_array(0.0, array), topic, (4, 5, 3)), array)
    padded = np.zeros((4, 16), np.uint8)  # rows padded to a step of 16 bytes
    padded[:, :15] = array.reshape(4, 15)
    assert np.array_equal(image_value(Image(0.0, 4, 5, "rgb8", padded.tobytes(), 16), topic, (4, 5, 3)), array)
    with pytest.raises(BridgeError, match="encoding must be 'rgb8', got 'bgr8'"):
        image_value(Image(0.0, 4, 5, "bgr8", array.tobytes(), 15), topic, (4, 5, 3))
    with pytest.raises(BridgeError, match="needs a 4 x 6 image, got 4 x 5"):
        image_value(Image.from_array(0.0, array), topic, (4, 6, 3))
    with pytest.raises(BridgeError, match="59 bytes do not hold 4 rows of step 15"):
        image_value(Image(0.0, 4, 5, "rgb8", array.tobytes()[:-1], 15), topic, (4, 5, 3))
    with pytest.raises(BridgeError, match="uint8 array"):
        Image.from_array(0.0, np.zeros((4, 5)))
    load_bridge_config("pusht_image").check_policy({"image": (96, 96, 3), "agent_pos": (2,)})
    with pytest.raises(BridgeError, match="needs a topic of type 'image'"):
        BridgeConfig("x", "pusht", (ObservationTopic("image", "/i"),), "image", "/c").check_policy({"image": (8, 8, 3)})


def test_bridge_config_bad_input(tmp_path):
    config = load_bridge_config("pusht")
    config.check_policy(PUSHT_SHAPES)
    with pytest.raises(BridgeError, match="policy expects"):
        config.check_policy({"agent_pos": (2,)})
    with pytest.raises(BridgeError, match="needs a topic of type 'joint_state'"):
        BridgeConfig("x", "pusht", (ObservationTopic("a", "/i", type="image"),), "a", "/c").check_policy({"a": (3,)})
    with pytest.raises(ConfigError, match="observations.type"):
        ObservationTopic("a", "/a", type="pointcloud")
    with pytest.raises(ConfigError, match="position_key"):
        BridgeConfig("x", "pusht", (ObservationTopic("a", "/a"),), "b", "/c")
    with pytest.raises(ConfigError, match="distinct topics"):
        BridgeConfig("x", "pusht", (ObservationTopic("a", "/a"),), "a", "/a")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrobot_profile: pusht\nobservations: []\nposition_key: a\ncommand_topic: /c\nrate: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'rate'"):
        load_bridge_config(bad)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_bridge_config("no_such_robot")


class InProcessTransport(Transport):
    """Topics as lists of callbacks in this process; `up` is what `connected()` reports."""

    def __init__(self):
        self.callbacks: dict[str, list] = defaultdict(list)
        self.up, self.reconnections = True, 0

    def connected(self) -> bool:
        return self.up

    def joint_state_publisher(self, topic):
        return lambda message: [callback(message) for callback in self.callbacks[topic]]

    def subscribe_joint_state(self, topic, callback):
        self.callbacks[topic].append(callback)

    text_publisher, subscribe_text = joint_state_publisher, subscribe_joint_state


class CountingController:
    """A controller double: command k at its k-th tick; records reset, start, observe and stop."""

    def __init__(self):
        self.calls, self.ticks = [], 0

    def reset(self, obs, position, now):
        self.calls.append("reset")

    def start(self):
        self.calls.append("start")

    def observe(self, obs, now):
        self.calls.append("observe")

    def tick(self, now):
        self.ticks += 1
        return SimpleNamespace(command=np.array([float(self.ticks), 0.0]), flags=[])

    def stop(self):
        self.calls.append("stop")


def test_bridge_holds_while_the_middleware_is_lost_and_restarts_the_controller_after():
    config, transport, now = load_bridge_config("pusht"), InProcessTransport(), [0.0]
    controllers, commands, beats = [], [], []

    def make_controller():
        controllers.append(CountingController())
        return controllers[-1]

    bridge = Bridge(transport, config, make_controller, PUSHT_SHAPES, control_hz=10.0, clock=lambda: now[0])
    transport.subscribe_joint_state(config.command_topic, lambda message: commands.append(message.position.tolist()))
    transport.subscribe_text(config.heartbeat_topic, lambda text: beats.append(json.loads(text)))
    agent, keypoints = (transport.joint_state_publisher(topic.topic) for topic in config.observations)

    def tick():  # a whole new frame, then one bridge tick 0.1 s later
        agent(JointState(now[0], position=np.array([1.0, 2.0])))
        keypoints(JointState(now[0], position=np.arange(18.0)))
        now[0] += 0.1
        bridge.tick()
        return beats[-1]

    assert tick()["state"] == "running" and tick()["state"] == "running" and commands == [[1.0, 0.0], [2.0, 0.0]]
    transport.up = False  # the master is gone; observations still arrive on the old connections
    for _ in range(3):
        beat = tick()
        assert beat["state"] == "holding" and beat["flags"] == ["middleware_lost"] and beat["watchdog"] is True
    assert commands[2:] == [[2.0, 0.0]] * 3 and beat["holds"] == 3  # the last command again, no new one
    assert controllers[0].calls == ["reset", "start", "observe", "stop"] and len(controllers) == 1
    transport.up, transport.reconnections = True, 1
    beat = tick()
    assert beat["state"] == "running" and beat["restarts"] == 2 and beat["middleware_reconnections"] == 1
    assert controllers[1].calls == ["reset", "start"] and commands[-1] == [1.0, 0.0]  # a fresh controller


def test_bridge_holds_a_delta_robot_at_zero_within_its_profile():
    """With a robot profile whose dimension 0 is a delta, holding commands 0 there (a repeated delta
    would keep the robot moving) and every published command stays within the profile's limits."""
    from diffpolicy.control.profile import RobotProfile
    from diffpolicy.control.safety import within_limits

    profile = RobotProfile.from_dict({
        "name": "delta", "action_dim": 2, "control_hz": 10.0, "robot_hz": 10.0,
        "limits": {"position": {"low": [-10.0, -10.0], "high": [10.0, 10.0]}, "velocity": [10.0, 10.0],
                   "acceleration": [100.0, 100.0]},
        "seam_jump": 1e9, "binary_dims": [], "delta_dims": [0],
        "watchdog": {"max_observation_age_s": 1e9, "max_inference_s": 1e9}})
    config, transport, now = load_bridge_config("pusht"), InProcessTransport(), [0.0]
    bridge = Bridge(transport, config, CountingController, PUSHT_SHAPES, control_hz=10.0, clock=lambda: now[0],
                    profile=profile)
    commands = []
    transport.subscribe_joint_state(config.command_topic, lambda message: commands.append(message.position.copy()))
    agent, keypoints = (transport.joint_state_publisher(topic.topic) for topic in config.observations)
    for _ in range(3):
        agent(JointState(now[0], position=np.array([1.0, 2.0])))
        keypoints(JointState(now[0], position=np.arange(18.0)))
        now[0] += 0.1
        bridge.tick()
    transport.up = False
    for _ in range(4):
        now[0] += 0.1
        bridge.tick()
    assert [c[0] for c in commands] == [1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0]  # stop, then back to 0 at 1 per tick
    assert within_limits(profile, np.stack(commands)).all()


def test_ros1_message_conversion_round_trips():
    ros1 = pytest.importorskip("diffpolicy.deploy.ros.ros1", exc_type=BridgeError)
    message = JointState(stamp=1700000000.123456789, names=("a", "b"), position=np.array([1.0, -2.5]),
                         velocity=np.array([0.5, 0.0]), effort=np.zeros(0))
    back = ros1.from_ros(ros1.to_ros(message))
    assert back.names == message.names and back.stamp_parts() == message.stamp_parts()
    assert np.array_equal(back.position, message.position) and np.array_equal(back.velocity, message.velocity)


def test_bridge_command_usage_errors(tmp_path, capsys):
    from diffpolicy.cli import main
    assert main(["bridge", "--config", "pusht", "--transport", "ros2", "--checkpoint", "a", "--server", "b"]) == 2
    assert "exactly one of --checkpoint DIR and --server ADDRESS" in capsys.readouterr().err
    assert main(["bridge", "--config", "nowhere", "--transport", "ros1", "--checkpoint", "a"]) == 2
    assert "bridge config 'nowhere'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_pusht_policy(tmp_path_factory.mktemp("pusht_policy"))


@pytest.fixture(scope="module")
def roscore(tmp_path_factory):
    """A `RosCore` on a free loopback port (one master URI per module: rospy binds a process to one)."""
    if shutil.which("roscore") is None:
        pytest.skip("roscore not installed (apt-get install -y python3-rospy ros-core python3-std-msgs "
                    "python3-sensor-msgs)")
    try:
        import diffpolicy.deploy.ros.ros1  # noqa: F401
    except BridgeError as err:
        pytest.skip(str(err))
    core = RosCore(free_port(), tmp_path_factory.mktemp("ros_home"))
    try:
        core.start()
        yield core
    finally:
        core.stop()


@pytest.fixture(scope="module")
def ros1_transport(roscore):
    """The test process's rospy node (rospy allows one per process and none after a shutdown)."""
    saved = {key: os.environ.get(key) for key in ("ROS_MASTER_URI", "ROS_HOSTNAME", "ROS_HOME")}
    os.environ.update({key: roscore.env[key] for key in saved})
    transport = make_transport("ros1", node="diffpolicy_test_listener")
    try:
        yield transport
    finally:
        transport.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_ros1_bridge_end_to_end(roscore, ros1_transport, checkpoint):
    assert_image_round_trip(ros1_transport)
    run_episode_scenario(["--transport", "ros1"], roscore.env, Listener(ros1_transport),
                         ["--checkpoint", str(checkpoint)])


def test_ros1_bridge_holds_on_a_roscore_crash_and_recovers_with_a_new_one(roscore, ros1_transport, checkpoint):
    """Kill roscore (master and rosout) by PID while the robot runs: the bridge holds (the last command
    again, flag middleware_lost); a new roscore on the same port: the bridge re-registers, runs again,
    and a robot started afterwards (it knows only the new master) finds it and completes an episode."""
    listener = Listener(ros1_transport)
    env = roscore.env
    bridge = start(["bridge", "--config", "pusht", "--transport", "ros1", "--checkpoint", str(checkpoint)], env)
    first = second = None
    try:
        first = start(["sim-robot", "--config", "pusht", "--transport", "ros1", "--seeds", "0", "--max-steps",
                       "100000"], env)
        running = listener.wait_for(lambda b: b["state"] == "running" and b["commands"] >= 10, 90, "10 commands")
        roscore.kill()
        lost = listener.wait_for(lambda b: "middleware_lost" in b["flags"] and b["tick"] > running["tick"], 15,
                                 "flag middleware_lost")
        assert lost["state"] == "holding" and lost["watchdog"] is True and lost["queue_depth"] is None
        with listener.lock:
            first_held = len(listener.commands)
        time.sleep(2.0)  # the old connections still deliver observations: only the master is gone
        with listener.lock:
            beats = [b for b in listener.beats if b["tick"] >= lost["tick"]]
            held = np.array(listener.commands[first_held + 2:])  # skip any still in flight
        assert len(beats) >= 10 and all(b["state"] == "holding" and "middleware_lost" in b["flags"] for b in beats)
        assert {b["commands"] - b["holds"] for b in beats} == {lost["commands"] - lost["holds"]}  # no new command
        assert len(held) >= 10 and (held == held[0]).all()  # the last command, published again
        assert first.poll() is None  # the robot lives on, executing the held command

        roscore.start()  # a new master on the same URI, which knows no node
        back = listener.wait_for(lambda b: b["state"] == "running" and b["middleware_reconnections"] >= 1, 30,
                                 "running after re-registering")
        assert back["restarts"] == running["restarts"] + 1 and back["commands"] - back["holds"] > (
            lost["commands"] - lost["holds"])
        registered = {("/diffpolicy_bridge", "pub", "/pusht/command"), ("/diffpolicy_bridge", "sub", "/pusht/agent_pos"),
                      ("/diffpolicy_sim_robot", "pub", "/pusht/agent_pos")}  # each node re-registers on its own poll
        deadline = time.monotonic() + 10
        while registered and time.monotonic() < deadline:
            publishers, subscribers = roscore.system_state()
            registered = {(node, kind, topic) for node, kind, topic in registered if not any(
                name.startswith(node) for name in (publishers if kind == "pub" else subscribers).get(topic, []))}
            time.sleep(0.1)
        assert not registered, f"not registered with the new master: {sorted(registered)}"

        stop(first)  # a robot that knows only the new master: it reaches the bridge through it
        second = start(["sim-robot", "--config", "pusht", "--transport", "ros1", "--seeds", "1", "--max-steps", "15"],
                       env)
        output, _ = second.communicate(timeout=90)
        assert second.returncode == 0, output
        result = json.loads(output.strip().splitlines()[-1])
        assert result["episodes"][0]["steps"] == 15 and result["commands_received"] >= 15, result
        os.kill(bridge.pid, signal.SIGTERM)
        output, _ = bridge.communicate(timeout=30)
        assert bridge.returncode == 0 and "bridge stopped" in output, output
    finally:
        for process in (first, second, bridge):
            if process is not None:
                stop(process)

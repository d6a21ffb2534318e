"""The ROS bridge against a real ROS 1 master: a roscore started by the test on loopback (stopped
by its PID); the simulated PushT robot and the bridge run as separate processes: the robot is driven
by the bridge's commands, killing it makes the bridge hold, a new robot makes it recover, SIGTERM
makes it hold, then stop. Plus the message mapping and the bridge config's bad input."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from diffpolicy.config import ConfigError
from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.bridge import ObservationBuffer, image_value, observation_value
from diffpolicy.deploy.ros.config import BridgeConfig, ObservationTopic, load_bridge_config
from diffpolicy.deploy.ros.transport import Image, JointState, make_transport
from ros_helpers import (PUSHT_SHAPES, ROOT, Listener, assert_image_round_trip, free_port, run_episode_scenario,
                         save_pusht_policy)


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
    if shutil.which("roscore") is None:
        pytest.skip("roscore not installed (apt-get install -y python3-rospy ros-core python3-std-msgs "
                    "python3-sensor-msgs)")
    try:
        import diffpolicy.deploy.ros.ros1  # noqa: F401
    except BridgeError as err:
        pytest.skip(str(err))
    port = free_port()
    home = tmp_path_factory.mktemp("ros_home")
    env = {**os.environ, "ROS_MASTER_URI": f"http://127.0.0.1:{port}", "ROS_HOSTNAME": "localhost",
           "ROS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(["roscore", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"roscore did not listen on port {port} within 30 s")
        yield env
    finally:
        os.kill(process.pid, signal.SIGINT)  # roscore stops its rosmaster and rosout
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_ros1_bridge_end_to_end(roscore, checkpoint, monkeypatch):
    for key in ("ROS_MASTER_URI", "ROS_HOSTNAME", "ROS_HOME"):
        monkeypatch.setenv(key, roscore[key])
    transport = make_transport("ros1", node="diffpolicy_test_listener")
    try:
        assert_image_round_trip(transport)
        run_episode_scenario(["--transport", "ros1"], roscore, Listener(transport), ["--checkpoint", str(checkpoint)])
    finally:
        transport.close()

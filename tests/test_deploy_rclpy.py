"""The rclpy transport: a real ROS 2 node (rclpy from PyPI's ROS 2 wheels, on Fast DDS, ROS 2's
default RMW) talking to the Cyclone DDS transport across DDS vendors, on a loopback-only domain.
rclpy lives in an interpreter of its own (`./run test` makes .venv-rclpy; DIFFPOLICY_RCLPY_PYTHON
names another), so the rclpy side runs as processes, started here and stopped by their PIDs:
an echo node for the message conversions, and the bridge driving a simulated robot end to end."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import CYCLONE_LOOPBACK, ROOT, Listener, run_episode_scenario, save_pusht_policy, stop

from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.transport import Image, JointState, make_transport


@pytest.fixture
def ros2_env(monkeypatch) -> dict:
    """Loopback discovery for both vendors: Cyclone's loopback profile (it matches Fast DDS by type
    name) and Fast DDS's localhost range; the environment for the processes."""
    try:
        import diffpolicy.deploy.ros.dds  # noqa: F401
    except BridgeError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("CYCLONEDDS_URI", CYCLONE_LOOPBACK.as_uri())
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def rclpy_python(env: dict) -> str:
    python = os.environ.get("DIFFPOLICY_RCLPY_PYTHON") or str(ROOT / ".venv-rclpy" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no interpreter with rclpy at {python} (./run test makes .venv-rclpy from PyPI's ROS 2 wheels)")
    check = subprocess.run([python, "-c", "import rclpy, sensor_msgs.msg, std_msgs.msg, diffpolicy"], env=env,
                           capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        pytest.skip(f"{python} cannot import rclpy beside diffpolicy: {check.stderr.strip()[-300:]}")
    return python


def domain_id() -> int:
    return 200 + os.getpid() % 30


def echoed(transport, kind: str, message, timeout: float = 30.0):
    """Publish `message` on /diffpolicy_test/<kind> until the echo node sends one back."""
    received: list = []
    subscribe, publisher = {"joint": (transport.subscribe_joint_state, transport.joint_state_publisher),
                            "image": (transport.subscribe_image, transport.image_publisher),
                            "text": (transport.subscribe_text, transport.text_publisher)}[kind]
    subscribe(f"/diffpolicy_test/{kind}_echo", received.append)
    publish = publisher(f"/diffpolicy_test/{kind}")
    deadline = time.monotonic() + timeout
    while not received and time.monotonic() < deadline:
        publish(message)
        time.sleep(0.1)
    assert received, f"no {kind} echoed by the rclpy node within {timeout} s"
    return received[0]


def test_rclpy_node_and_cyclone_exchange_every_message_type(ros2_env):
    python = rclpy_python(ros2_env)
    echo = subprocess.Popen([python, str(ROOT / "tests" / "rclpy_echo.py"), str(domain_id())], env=ros2_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    transport = make_transport("ros2", node="rclpy_test", domain_id=domain_id())
    try:
        assert echo.stdout.readline().strip() == "echoing", echo.stdout.read()
        joint = JointState(stamp=1234.25, names=("x", "y"), position=np.array([1.5, -2.0]),
                           velocity=np.array([0.25, 3.0]), effort=np.array([]))
        back: JointState = echoed(transport, "joint", joint)
        assert back.stamp == 1234.25 and back.names == ("x", "y")
        assert back.position.tolist() == [1.5, -2.0] and back.velocity.tolist() == [0.25, 3.0] and back.effort.size == 0
        array = (np.arange(96 * 96 * 3) % 251).astype(np.uint8).reshape(96, 96, 3)
        image: Image = echoed(transport, "image", Image.from_array(99.5, array))
        assert (image.height, image.width, image.encoding, image.step, image.stamp) == (96, 96, "rgb8", 288, 99.5)
        assert image.data == array.tobytes()
        assert echoed(transport, "text", '{"state": "running"}') == '{"state": "running"}'
    finally:
        transport.close()
        stop(echo)


def test_rclpy_bridge_drives_a_cyclone_robot_end_to_end(tmp_path, ros2_env):
    """The bridge as a ROS 2 node on rclpy (Fast DDS), the robots and the listener on Cyclone DDS:
    the ROS 1 / DDS scenario (robot killed: hold; new robot: recover; SIGTERM: hold, stop)."""
    python = rclpy_python(ros2_env)
    checkpoint = save_pusht_policy(tmp_path / "policy")
    domain = str(domain_id())
    transport = make_transport("ros2", node="listener", domain_id=int(domain))
    try:
        run_episode_scenario(["--transport", "ros2", "--domain-id", domain], ros2_env, Listener(transport),
                             ["--checkpoint", str(checkpoint)], bridge_on=(python, ["--transport", "rclpy",
                                                                                    "--domain-id", domain]))
    finally:
        transport.close()


def test_rclpy_transport_without_rclpy_names_what_to_install():
    try:
        import rclpy  # noqa: F401
        pytest.skip("this interpreter has rclpy")
    except ImportError:
        pass
    with pytest.raises(BridgeError, match=r"rclpy transport needs a ROS 2 installation's rclpy .*ros-rclpy\[fastrtps\]"):
        make_transport("rclpy", node="x", domain_id=0)

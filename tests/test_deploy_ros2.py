"""The ROS bridge over Cyclone DDS with ROS 2's wire types, on a loopback-only domain: the same
end-to-end scenario as the ROS 1 test (robot and bridge as processes stopped by their PIDs), with
the policy behind a policy server: observation message -> bridge -> server -> controller -> command.
DDS has no master to restart: discovery is peer to peer, so the middleware restart of ROS 1's test
is, here, a peer process that dies and a new one that is discovered (the scenario's robot restart)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from ros_helpers import (
    CYCLONE_LOOPBACK,
    ROOT,
    Listener,
    assert_image_round_trip,
    free_port,
    run_episode_scenario,
    save_pusht_policy,
    start,
    stop,
)

from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.transport import JointState, make_transport


def test_ros2_wire_types_and_round_trip():
    dds = pytest.importorskip("diffpolicy.deploy.ros.dds", exc_type=BridgeError)
    from diffpolicy.deploy.ros.ros2_types import Image_, JointState_, ros2_topic
    assert JointState_.__idl_typename__ == "sensor_msgs::msg::dds_::JointState_"
    assert Image_.__idl_typename__ == "sensor_msgs::msg::dds_::Image_"
    assert ros2_topic("/pusht/command") == "rt/pusht/command" == ros2_topic("pusht/command")
    message = JointState(stamp=5.75, names=("j",), position=np.array([3.0]))
    sample = dds.to_dds(message)
    assert (sample.header.stamp.sec, sample.header.stamp.nanosec) == (5, 750_000_000)
    decoded = JointState_.deserialize(sample.serialize())  # through the CDR bytes that go on the wire
    back = JointState.from_ros2(decoded)
    assert back.stamp == 5.75 and back.names == ("j",) and back.position.tolist() == [3.0]


def test_ros2_dds_bridge_end_to_end(tmp_path, monkeypatch):
    checkpoint = save_pusht_policy(tmp_path / "policy")
    try:
        import diffpolicy.deploy.ros.dds  # noqa: F401
    except BridgeError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("CYCLONEDDS_URI", CYCLONE_LOOPBACK.as_uri())
    domain = 100 + os.getpid() % 100
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = free_port()
    server = start(["serve", "--checkpoint", str(checkpoint), "--port", str(port)], env)
    transport = make_transport("ros2", node="listener", domain_id=domain)
    try:
        assert_image_round_trip(transport)
        assert "serving" in server.stdout.readline()
        run_episode_scenario(["--transport", "ros2", "--domain-id", str(domain)], env, Listener(transport),
                             ["--server", f"tcp://127.0.0.1:{port}"])
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        transport.close()
        stop(server)

"""The policy server over real ZeroMQ sockets on loopback: round trips of every dtype, a remote
policy that equals the local one, error replies for every bad input, a refused pickle, CURVE
authentication, concurrency, a slow inference that does not block health replies, and the
`diffpolicy serve` command started as a subprocess and stopped by its PID."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from policy_helpers import DA, TP, make_obs, make_policy

from diffpolicy.config import ConfigError
from diffpolicy.core.guidance import GuidedInpainting, PrefixInpainting, rtc_prefix_weights
from diffpolicy.deploy import PolicyClient, PolicyServer, RemotePolicy, ServerConfig
from diffpolicy.deploy import server as server_module
from diffpolicy.deploy.auth import ClientKeys, make_keys
from diffpolicy.deploy.errors import AuthenticationError, RemoteError, WireError
from diffpolicy.deploy.runner import run_sample
from diffpolicy.deploy.wire import DTYPES, decode_array, encode_array, make_request, pack
from diffpolicy.errors import InvalidStateError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy():
    return make_policy("flow").eval()


@pytest.fixture
def server(policy):
    server = PolicyServer(policy, ServerConfig(port=0)).start()
    yield server
    server.stop()


def raw_exchange(address: str, payloads: list[bytes], timeout_s: float = 20.0) -> list[dict]:
    """Send raw payloads on one DEALER socket (pipelined) and collect one decoded reply per payload."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(address)
    try:
        for payload in payloads:
            dealer.send(payload)
        replies = []
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(payloads) and time.monotonic() < deadline:
            if dealer.poll(100):
                replies.append(msgpack.unpackb(dealer.recv(), raw=False))
        return replies
    finally:
        dealer.close(0)
        context.term()


def echo(policy, request):
    """An inference that returns the first observation array unchanged (round trips of any dtype)."""
    return {"chunk": encode_array(next(iter(request["obs"].values())))}


# ---------------------------------------------------------------------------- arrays
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_through_the_server(policy, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(2, 3, 4)) * 50).astype(dtype)
    variants = [array, array[:, ::2], array.astype(np.dtype(dtype).newbyteorder(">")), array[:0]]
    server = PolicyServer(policy, ServerConfig(port=0), infer=echo).start()
    try:
        with PolicyClient(server.address) as client:
            for value in variants:
                reply = client.request("sample", {"obs": {"x": encode_array(value)}})
                back = decode_array(reply["chunk"], "chunk")
                assert back.dtype == np.dtype(dtype) and back.shape == value.shape
                assert np.array_equal(back, value, equal_nan=dtype.startswith("float"))
    finally:
        server.stop()


def test_object_and_string_arrays_are_refused():
    for value in (np.array([{"a": 1}], dtype=object), np.array(["text"]), np.zeros(2, dtype=np.complex64)):
        with pytest.raises(WireError, match="cannot go on the wire"):
            encode_array(value)
    bad = {"dtype": "object", "shape": [1], "data": b"\x00" * 8}
    with pytest.raises(WireError, match="dtype: expected one of"):
        decode_array(bad, "x")
    with pytest.raises(WireError, match="needs 12 bytes, got 8"):
        decode_array({"dtype": "float32", "shape": [3], "data": b"\x00" * 8}, "x")


# ---------------------------------------------------------------------------- the remote policy
def test_remote_policy_equals_the_local_policy(server, policy):
    remote = RemotePolicy.connect(server.address)
    try:
        assert remote.config == policy.config
        obs, noise = make_obs(3), torch.randn(3, TP, DA, generator=torch.Generator().manual_seed(1))
        assert torch.equal(remote.sample(obs, x_init=noise), policy.sample(obs, x_init=noise))
        actions = 150 + 20 * torch.randn(3, TP, DA)
        assert torch.equal(remote.normalize_action(actions), policy.normalize_action(actions))
        # the warm-start and inpainting calls of the controller's modes
        t_start = torch.linspace(0, 1, TP).expand(3, TP).contiguous()
        prefix = PrefixInpainting(noise[:, :2] * 0.1)
        guided = GuidedInpainting(noise * 0.3, rtc_prefix_weights(TP, 3, 1), 5.0)
        for kwargs in ({"t_start": t_start}, {"t_start": 0.5}, {"guidance": prefix}, {"guidance": guided},
                       {"steps": 3}):
            local = policy.sample_normalized(policy.encode_obs(obs), x_init=noise, **kwargs).x0
            there = remote.sample_normalized(remote.encode_obs(obs), x_init=noise, **kwargs).x0
            assert torch.equal(there, local), kwargs
        timing = remote.last_timing
        assert timing.infer_ms > 0 and timing.queue_ms >= 0 and timing.round_trip_ms >= timing.infer_ms
        # a generator draws the same noise remotely as locally, and advances the same way
        local_gen, remote_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for _ in range(2):
            assert torch.equal(remote.sample(obs, generator=remote_gen), policy.sample(obs, generator=local_gen))
        assert torch.equal(remote_gen.get_state(), local_gen.get_state())
    finally:
        remote.close()


def test_stochastic_diffusion_sampling_matches_through_the_generator_state():
    policy = make_policy("diffusion").eval()  # DDPM ancestral steps (eta = 1): noise drawn every step
    server = PolicyServer(policy, ServerConfig(port=0)).start()
    remote = RemotePolicy.connect(server.address)
    try:
        local_gen, remote_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        obs = make_obs(2)
        for _ in range(2):
            assert torch.equal(remote.sample(obs, generator=remote_gen), policy.sample(obs, generator=local_gen))
    finally:
        remote.close()
        server.stop()


def test_remote_policy_refuses_what_cannot_travel(server):
    remote = RemotePolicy.connect(server.address)
    try:
        with pytest.raises(TypeError, match="denoiser stays on the server"):
            remote.backbone
        with pytest.raises(TypeError, match="cannot be sent"):
            remote.sample(make_obs(1), guidance=object())
        with pytest.raises(TypeError, match="must come from RemotePolicy.encode_obs"):
            remote.sample_normalized(torch.zeros(1, 8))
    finally:
        remote.close()


# ---------------------------------------------------------------------------- bad input
def valid_sample(batch=1, **changes):
    obs = {key: encode_array(value.numpy()) for key, value in make_obs(batch).items()}
    return make_request(7, "sample", {"obs": obs, **changes})


@pytest.mark.parametrize("message, match", [
    ({**valid_sample(), "v": 2}, "schema version 1, got 2"),
    ({**valid_sample(), "op": "exec"}, "request.op: expected one of"),
    ({**valid_sample(), "extra": 1}, "unexpected \\['extra'\\]"),
    (make_request(7, "health", {"x": 1}), "takes an empty body"),
    (valid_sample(mystery=1), "unknown field 'mystery'"),
    (valid_sample(steps=0), "sample.steps"),
    (valid_sample(t_start=2.0), "sample.t_start"),
    (valid_sample(rng_state=encode_array(np.zeros(7, np.uint8))), "not a CPU torch.Generator state"),
    (valid_sample(rng_state=encode_array(np.zeros(7, np.float32))), "1-D uint8 array"),
    (make_request(7, "sample", {"obs": {"state": encode_array(np.zeros((1, 2, 3), np.float32)),
                                        "joint": encode_array(np.zeros((1, 2, 3), np.float32))}}),
     "unexpected \\['joint'\\]"),
    (make_request(7, "sample", {"obs": {"state": encode_array(np.zeros((1, 2, 4), np.float32))}}), "state"),
    (make_request(7, "sample", {"obs": {"state": encode_array(np.zeros((1, 2, 3), np.int64))}}), "floating point"),
    (valid_sample(x_init=encode_array(np.zeros((1, 3, DA), np.float32))), "x_init must have shape"),
])
def test_bad_requests_get_a_clear_error_reply(server, message, match):
    reply = raw_exchange(server.address, [pack(message)])[0]
    assert reply["ok"] is False and reply["id"] == 7
    assert __import__("re").search(match, reply["error"]["message"]), reply["error"]


def test_oversized_truncated_and_non_msgpack_messages(policy):
    server = PolicyServer(policy, ServerConfig(port=0, max_message_bytes=4096)).start()
    try:
        big = valid_sample(x_init=encode_array(np.zeros((1, 1000, 2), np.float32)))
        good = pack(valid_sample())
        replies = raw_exchange(server.address, [pack(big), good[:-3], b"", b"\xc1", good + b"\x00", good])
        messages = [r.get("error", {}).get("message", "") for r in replies]
        assert "exceeds the limit of 4096 bytes" in messages[0]
        assert all("not one valid msgpack value" in m for m in messages[1:5]), messages
        assert replies[5]["ok"] is True  # still serving
    finally:
        server.stop()


class Exploit:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_is_refused_and_never_executed(server, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker))
    inside = valid_sample()
    inside["body"]["obs"]["state"]["data"] = payload  # a pickle where array bytes belong
    inside_dtype = valid_sample()
    inside_dtype["body"]["obs"]["state"]["dtype"] = "object"
    replies = raw_exchange(server.address, [payload, pickle.dumps({"v": 1}, protocol=0),
                                            pack(inside), pack(inside_dtype), pack(valid_sample())])
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert not marker.exists()


def test_fuzzed_messages_never_crash_the_server(server):
    """2000 mutations (seeded) of valid requests: byte flips, truncations, insertions, random bytes,
    random msgpack values. Every one gets a reply; a valid request is answered afterwards."""
    rng = np.random.default_rng(0)
    seeds = [pack(valid_sample()), pack(make_request(1, "health")), pack(make_request(2, "metadata"))]
    payloads = []
    for i in range(2000):
        raw = bytearray(seeds[i % 3])
        kind = i % 5
        if kind == 0:
            for _ in range(rng.integers(1, 8)):
                raw[rng.integers(len(raw))] = rng.integers(256)
        elif kind == 1:
            raw = raw[: rng.integers(len(raw))]
        elif kind == 2:
            at = rng.integers(len(raw))
            raw[at:at] = rng.bytes(int(rng.integers(1, 16)))
        elif kind == 3:
            raw = bytearray(rng.bytes(int(rng.integers(0, 200))))
        else:
            raw = bytearray(pack(_random_value(rng, depth=0)))
        payloads.append(bytes(raw))
    start = time.monotonic()
    replies = raw_exchange(server.address, payloads, timeout_s=60)
    assert len(replies) == len(payloads)
    assert time.monotonic() - start < 60
    assert raw_exchange(server.address, [pack(make_request(9, "health"))])[0]["ok"] is True
    assert server._threads[0].is_alive() and server._threads[1].is_alive()


def _random_value(rng, depth):
    choice = rng.integers(7 if depth < 3 else 4)
    if choice == 0:
        return int(rng.integers(-2 ** 40, 2 ** 40))
    if choice == 1:
        return rng.bytes(int(rng.integers(0, 20)))
    if choice == 2:
        return ["v", "id", "op", "body", "dtype", "shape", "data", "sample", "obs"][rng.integers(9)]
    if choice == 3:
        return None
    if choice == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    keys = ["v", "id", "op", "body", "obs", "state", "dtype", "shape", "data", "x_init", "guidance"]
    return {keys[rng.integers(len(keys))]: _random_value(rng, depth + 1) for _ in range(rng.integers(0, 5))}


def test_hypothesis_requests_with_valid_framing(server):
    """Structured fuzzing (hypothesis, derandomized, 100 examples): any msgpack map with the
    request's field names gets a reply and never stops the server."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    leaves = st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.binary(max_size=64) | \
        st.sampled_from(["sample", "health", "metadata", "float32", "uint8", "object", "state"])
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["v", "id", "op", "body", "obs", "state", "dtype", "shape", "data", "steps", "t_start"]),
        inner, max_size=5), max_leaves=20)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(server.address)

    @hypothesis.settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @hypothesis.given(st.fixed_dictionaries({"v": st.just(1) | values, "id": st.integers(0, 9) | values,
                                             "op": st.sampled_from(["sample", "health"]) | values,
                                             "body": values}))
    def check(message):
        dealer.send(pack(message))
        assert dealer.poll(10_000), f"no reply to {message!r}"
        reply = msgpack.unpackb(dealer.recv(), raw=False)
        assert isinstance(reply["ok"], bool)

    try:
        check()
    finally:
        dealer.close(0)
        context.term()
    assert raw_exchange(server.address, [pack(make_request(9, "health"))])[0]["ok"] is True


def test_a_port_in_use_is_an_error_not_a_hang(server, policy):
    port = int(server.address.rsplit(":", 1)[1])
    started = time.monotonic()
    with pytest.raises(InvalidStateError, match=f"failed to start on 127.0.0.1:{port}: Address already in use"):
        PolicyServer(policy, ServerConfig(port=port)).start()
    assert time.monotonic() - started < 10
    assert raw_exchange(server.address, [pack(make_request(1, "health"))])[0]["ok"] is True


# ---------------------------------------------------------------------------- authentication
def test_binding_beyond_loopback_needs_keys():
    with pytest.raises(ConfigError, match="beyond loopback, which requires CURVE"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(ConfigError, match="beyond loopback"):
        ServerConfig(host="192.168.1.5")
    assert ServerConfig(host="localhost").curve_keys is None and ServerConfig(host="::1").port == 5555


def test_curve_keys_admit_only_authorized_clients(policy, tmp_path):
    keys = make_keys(tmp_path / "keys", clients=("robot",))
    stranger = make_keys(tmp_path / "other", clients=("robot",))
    server = PolicyServer(policy, ServerConfig(port=0, curve_keys=str(keys))).start()
    try:
        good = ClientKeys.load(keys / "robot.key_secret", keys / "server.key")
        with PolicyClient(server.address, timeout_s=10, keys=good) as client:
            assert client.request("health")["status"] == "ok"
        wrong = ClientKeys.load(stranger / "robot.key_secret", keys / "server.key")
        with PolicyClient(server.address, timeout_s=10, keys=wrong) as client:
            with pytest.raises(AuthenticationError, match="refused this client's CURVE handshake"):
                client.request("health")
        with PolicyClient(server.address, timeout_s=10) as client:  # no keys at all
            with pytest.raises(AuthenticationError):
                client.request("health")
    finally:
        server.stop()


# ---------------------------------------------------------------------------- concurrency
def test_a_slow_inference_does_not_block_health_replies(policy):
    release, started = threading.Event(), threading.Event()

    def slow(policy_, request):
        started.set()
        release.wait(30)
        return run_sample(policy_, request)

    server = PolicyServer(policy, ServerConfig(port=0, max_pending=1), infer=slow).start()
    remote = RemotePolicy.connect(server.address)
    try:
        results = []
        worker = threading.Thread(target=lambda: results.append(remote.sample(make_obs(1))))
        worker.start()
        assert started.wait(10)
        with PolicyClient(server.address, timeout_s=5) as other:
            health = other.request("health")  # answered while the inference is still blocked
            assert health["status"] == "ok" and not release.is_set()
            other.timeout_s = 30
            queued = threading.Thread(target=lambda: results.append(_request_ok(server.address)))
            queued.start()
            deadline = time.monotonic() + 10
            while other.request("health")["pending"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(RemoteError, match="ServerBusyError: inference queue full"):
                other.request("sample", {"obs": valid_sample()["body"]["obs"]})
        release.set()
        worker.join(30)
        queued.join(30)
        assert results[0].shape == (1, TP, DA) and results[1] is True
    finally:
        release.set()
        remote.close()
        server.stop()


def _request_ok(address):
    with PolicyClient(address, timeout_s=30) as client:
        client.request("sample", {"obs": valid_sample()["body"]["obs"]})
        return client.last_timing.queue_ms > 0


def test_replies_and_health_never_wait_for_the_poll_timeout(policy, monkeypatch):
    """The socket thread waits on the ROUTER's edge-triggered descriptor and the worker sends replies
    on the socket itself: with the poll timeout at a minute, a message the socket thread fails to
    drain or a lost wake-up stalls a request past the clients' 5 s timeout. Many clients in a tight
    loop of fast requests and health checks."""
    monkeypatch.setattr(server_module, "POLL_MS", 60_000)
    server = PolicyServer(policy, ServerConfig(port=0, max_pending=64), infer=echo).start()
    errors: list[BaseException] = []

    def client_loop(seed: int) -> None:
        value = np.arange(6, dtype=np.float32).reshape(1, 2, 3) + seed
        try:
            with PolicyClient(server.address, timeout_s=5.0) as client:
                for i in range(150):
                    if i % 5 == 0:
                        assert client.request("health")["status"] == "ok"
                    reply = client.request("sample", {"obs": {"x": encode_array(value)}})
                    assert np.array_equal(decode_array(reply["chunk"], "chunk"), value)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(6)]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors[0]
        assert server.counts["served"] == 6 * 150
    finally:
        server.stop()
    assert time.monotonic() - started < 120  # stop() wakes the socket thread at once


def test_many_clients_at_once(server, policy):
    errors, outcomes = [], {}

    def client_loop(index):
        try:
            remote = RemotePolicy.connect(server.address, timeout_s=30)
            obs = make_obs(1, seed=index)
            noise = torch.randn(1, TP, DA, generator=torch.Generator().manual_seed(index))
            outcomes[index] = all(torch.equal(remote.sample(obs, x_init=noise), policy.sample(obs, x_init=noise))
                                  for _ in range(4))
            remote.close()
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and outcomes == dict.fromkeys(range(8), True)


# ---------------------------------------------------------------------------- the command
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_runs_and_stops_on_sigterm(policy, tmp_path):
    policy.save_pretrained(tmp_path / "ckpt")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "diffpolicy.cli", "serve", "--checkpoint",
                                str(tmp_path / "ckpt"), "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "serving" in process.stdout.readline()
        remote = RemotePolicy.connect(f"tcp://127.0.0.1:{port}", timeout_s=30)
        noise = torch.randn(1, TP, DA)
        # another process (its own thread count): equal up to float32 summation order
        torch.testing.assert_close(remote.sample(make_obs(1), x_init=noise), policy.sample(make_obs(1), x_init=noise),
                                   rtol=1e-5, atol=1e-3)
        remote.close()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(30) == 0
        assert "policy server stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    refused = subprocess.run([sys.executable, "-m", "diffpolicy.cli", "serve", "--checkpoint", str(tmp_path / "ckpt"),
                              "--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "requires CURVE" in refused.stderr


@pytest.mark.parametrize("mode", ["sync", "prefix", "rtc", "warmstart"])
def test_the_controller_runs_a_remote_policy_exactly_as_the_local_one(server, policy, mode):
    """The real-time controller (no thread, fixed clock) issues bit-identical commands with the
    remote policy and with the local one, across several chunks of each mode's warm path."""
    from diffpolicy.control.modes import make_mode
    from diffpolicy.control.profile import RobotProfile
    from diffpolicy.control.realtime import RealTimeController

    profile = RobotProfile.from_dict({
        "name": "loose", "action_dim": DA, "control_hz": 10.0, "robot_hz": 10.0,
        "limits": {"position": {"low": [-1e6] * DA, "high": [1e6] * DA}, "velocity": [1e9] * DA,
                   "acceleration": [1e9] * DA},
        "seam_jump": 1e9, "binary_dims": [], "delta_dims": [], "watchdog": {"max_observation_age_s": 1e9, "max_inference_s": 1e9}})
    remote = RemotePolicy.connect(server.address)
    try:
        runs = []
        for used in (policy, remote):
            controller = RealTimeController(used, make_mode(mode), profile, seed=3)
            obs_stream = torch.Generator().manual_seed(0)
            first = {"state": (torch.randn(3, generator=obs_stream) * 5).numpy()}
            controller.reset(first, np.full(DA, 150.0), now=0.0)
            commands = []
            for tick in range(16):
                controller.run_pending()
                commands.append(controller.tick(float(tick)).command)
                controller.observe({"state": (torch.randn(3, generator=obs_stream) * 5).numpy()}, float(tick) + 0.5)
            runs.append(np.array(commands))
            assert controller.scheduler.stats.inferences >= 3
        np.testing.assert_array_equal(runs[0], runs[1])
    finally:
        remote.close()

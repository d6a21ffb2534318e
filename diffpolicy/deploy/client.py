"""The client side: `PolicyClient` (requests and replies) and `RemotePolicy` (a policy that lives on a server).

    policy = RemotePolicy.connect("tcp://127.0.0.1:5555")
    chunk = policy.sample(obs, x_init=noise)            # as ChunkPolicy.sample, one round trip
    cond = policy.encode_obs(obs)                       # checked locally; encoded on the server
    x0 = policy.sample_normalized(cond, steps, x_init=x, t_start=t, guidance=g).x0

`RemotePolicy` has the public surface the controller's modes use on a local `ChunkPolicy`:
`config`, `normalize_action` / `unnormalize_action` and `process` (computed locally from the
server's config and action statistics), `encode_obs`, `sample` and `sample_normalized` (one round
trip each; `encode_obs` only checks the observations and keeps them, the server encodes them with
the sampling call). Guidance travels as data: `PrefixInpainting` and `GuidedInpainting`. The
denoiser itself stays on the server, so the streaming mode (which calls `policy.backbone` per
step) cannot run remotely. Randomness: a `generator`'s state travels with the request, the server
samples with a generator in that state and sends back its state afterwards, which the client's
generator takes: remote sampling draws exactly the noise a local call would (CPU generators), so
the results equal the local policy's bit for bit (up to float summation order if the server runs
another thread count), and a controller driving a `RemotePolicy` issues the same commands.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from diffpolicy.core.guidance import GuidedInpainting, PrefixInpainting
from diffpolicy.core.samplers import SampleResult
from diffpolicy.deploy.auth import ClientKeys
from diffpolicy.deploy.errors import AuthenticationError, RemoteError, ServerUnavailableError, WireError
from diffpolicy.deploy.wire import check_reply, decode_array, encode_array, make_request, pack, unpack
from diffpolicy.errors import InvalidTypeError
from diffpolicy.policies import Normalizer, PolicyConfig, make_process
from diffpolicy.policies.validation import check_observations

REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL  # the peer said why
DROPPED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL  # the peer closed mid-handshake (it saw the mismatch first)
AUTH_EVENTS = REFUSED | DROPPED
DROPS_TO_REFUSE = 3  # handshakes dropped in a row before a request gives up (one may be a transient reset)


@dataclass
class Timing:
    """Milliseconds of one request: waiting in the server's queue, inferring, and the whole round trip."""

    queue_ms: float
    infer_ms: float
    round_trip_ms: float


class PolicyClient:
    """One DEALER connection to a policy server; thread-safe (one request at a time).

    Args:
        address: "tcp://host:port".
        timeout_s: how long to wait for a reply before `ServerUnavailableError`.
        keys: `ClientKeys` for a server with CURVE authentication (None: plain loopback).
        max_reply_bytes: larger replies are refused.
    """

    def __init__(self, address: str, timeout_s: float = 10.0, keys: ClientKeys | None = None,
                 max_reply_bytes: int = 256 * 2 ** 20):
        self.address, self.timeout_s, self.max_reply_bytes = address, timeout_s, max_reply_bytes
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        if keys is not None:
            keys.apply(self._socket)
        self._monitor = self._socket.get_monitor_socket(AUTH_EVENTS)
        self._socket.connect(address)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.last_timing: Timing | None = None

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(0)
        self._socket.close(0)
        self._context.term()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and wait for its reply body. Raises `RemoteError` (error reply),
        `AuthenticationError` (CURVE refused) or `ServerUnavailableError` (no reply in time)."""
        with self._lock:
            request_id = next(self._ids)
            start = time.perf_counter()
            self._socket.send(pack(make_request(request_id, op, body)))
            reply = self._wait(request_id, start + self.timeout_s)
            round_trip = (time.perf_counter() - start) * 1e3
        timing = reply["timing"]
        self.last_timing = Timing(timing["queue_ms"], timing["infer_ms"], round_trip)
        if not reply["ok"]:
            error = reply["error"]
            raise RemoteError(f"policy server {self.address} refused {op!r}: {error['type']}: {error['message']}")
        return reply["body"]

    def _wait(self, request_id: int, deadline: float) -> dict[str, Any]:
        drops = 0
        while (left := deadline - time.perf_counter()) > 0:
            events = dict(self._poller.poll(max(1, int(left * 1e3))))
            if self._monitor in events:
                event = recv_monitor_message(self._monitor)
                drops += event["event"] == DROPPED
                if event["event"] != DROPPED or drops >= DROPS_TO_REFUSE:
                    how = (f"it closed the connection mid-handshake {drops} times" if event["event"] == DROPPED
                           else f"event {event['event']}, value {event['value']}")
                    raise AuthenticationError(
                        f"policy server {self.address} refused this client's CURVE handshake ({how}): wrong or "
                        "unauthorized key, or the server expects CURVE keys and this client has none, or the reverse")
            if self._socket in events:
                reply = check_reply(unpack(self._socket.recv(), self.max_reply_bytes))
                if reply["id"] == request_id:
                    return reply
                # a late reply to a request that timed out earlier: drop it
        raise ServerUnavailableError(f"no reply from policy server {self.address} within {self.timeout_s} s")


@dataclass
class RemoteCondition:
    """What `RemotePolicy.encode_obs` returns: the checked observations, encoded on the server."""

    obs: dict[str, np.ndarray]
    batch: int

    @property
    def shape(self) -> tuple[int]:
        return (self.batch,)


class RemotePolicy:
    """A policy served by a `PolicyServer`, used like a local `ChunkPolicy` (module docstring)."""

    def __init__(self, client: PolicyClient):
        self.client = client
        meta = client.request("metadata")
        self.config = PolicyConfig.from_dict(meta["policy_config"])
        self.metadata = meta["metadata"]
        low, high = (torch.from_numpy(decode_array(meta[k], f"metadata.{k}")) for k in ("action_min", "action_max"))
        self.normalizer = Normalizer({"action": (low, high)})
        self.process = make_process(self.config.process)

    @classmethod
    def connect(cls, address: str, timeout_s: float = 10.0, keys: ClientKeys | None = None) -> RemotePolicy:
        return cls(PolicyClient(address, timeout_s, keys))

    def close(self) -> None:
        self.client.close()

    @property
    def last_timing(self) -> Timing | None:
        return self.client.last_timing

    @property
    def backbone(self) -> Any:
        raise InvalidTypeError("RemotePolicy: the denoiser stays on the server; modes that call policy.backbone "
                               "per step (streaming) need a local ChunkPolicy")

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return self.normalizer.normalize("action", action)

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return self.normalizer.unnormalize("action", action)

    def encode_obs(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> RemoteCondition:
        """Check `obs {key: (B, To, ...)}` here (the same checks as the local policy) and keep it."""
        batch = check_observations(obs, self.config)
        return RemoteCondition({k: v.detach().cpu().numpy() for k, v in obs.items()}, batch)

    def sample(self, obs: Mapping[str, torch.Tensor], steps: int | None = None, x_init: torch.Tensor | None = None,
               t_start: float | torch.Tensor | None = None, guidance: Any = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """As `ChunkPolicy.sample`: actions `(B, Tp, Da)` in data units."""
        return self._sample(self.encode_obs(obs), steps, x_init, t_start, guidance, generator, normalized=False)

    def sample_normalized(self, cond: RemoteCondition, steps: int | None = None, x_init: torch.Tensor | None = None,
                          t_start: float | torch.Tensor | None = None, guidance: Any = None,
                          generator: torch.Generator | None = None, record: bool = False) -> SampleResult:
        """As `ChunkPolicy.sample_normalized` for a condition from `encode_obs` (no `record`)."""
        if not isinstance(cond, RemoteCondition):
            raise InvalidTypeError(f"RemotePolicy.sample_normalized: cond must come from RemotePolicy.encode_obs, "
                                   f"got {type(cond).__name__}")
        if record:
            raise InvalidTypeError("RemotePolicy.sample_normalized: record=True (the sampling chain) is not served")
        x0 = self._sample(cond, steps, x_init, t_start, guidance, generator, normalized=True)
        return SampleResult(x0=x0, chain=None)

    def _sample(self, cond: RemoteCondition, steps, x_init, t_start, guidance, generator, normalized: bool):
        body: dict[str, Any] = {"obs": {k: encode_array(v) for k, v in cond.obs.items()}, "steps": steps,
                                "normalized": normalized, "guidance": _guidance_spec(guidance),
                                "x_init": None if x_init is None else encode_array(x_init.detach().cpu().numpy())}
        if isinstance(t_start, torch.Tensor):
            body["t_start"] = encode_array(t_start.detach().cpu().numpy())
        else:
            body["t_start"] = None if t_start is None else float(t_start)
        body["rng_state"] = None if generator is None else encode_array(generator.get_state().numpy())
        reply = self.client.request("sample", body)
        if set(reply) != {"chunk", "rng_state"} or (generator is not None) != (reply["rng_state"] is not None):
            raise WireError(f"sample reply: expected the fields 'chunk' and 'rng_state', got {sorted(reply)}")
        if generator is not None:
            generator.set_state(torch.from_numpy(decode_array(reply["rng_state"], "reply.rng_state")))
        return torch.from_numpy(decode_array(reply["chunk"], "reply.chunk"))


def _guidance_spec(guidance: Any) -> dict[str, Any] | None:
    if guidance is None:
        return None
    if isinstance(guidance, PrefixInpainting):
        return {"kind": "prefix", "prefix": encode_array(guidance.prefix.detach().cpu().numpy())}
    if isinstance(guidance, GuidedInpainting):
        return {"kind": "guided", "target": encode_array(guidance.target.detach().cpu().numpy()),
                "weights": encode_array(guidance.weights.detach().cpu().numpy()), "max_weight": guidance.max_weight}
    raise InvalidTypeError(f"RemotePolicy: guidance {type(guidance).__name__} cannot be sent to a server; "
                           "expected None, PrefixInpainting or GuidedInpainting")

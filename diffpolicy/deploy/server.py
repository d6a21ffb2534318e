"""The policy server: a ZeroMQ ROUTER socket in front of an inference worker thread.

    server = PolicyServer(policy, ServerConfig(port=0))
    server.start()                  # the socket thread and the worker thread
    server.address                  # "tcp://127.0.0.1:PORT"
    server.stop()

The socket thread owns the ROUTER socket: it reads every message, checks it against the wire
schema, answers health and metadata requests itself, and queues sample requests for the worker.
The worker runs the policy and hands the reply back over an inproc socket, so a slow inference
never blocks the socket: health requests are answered while it runs, and queued requests learn
their queue wait (`queue_ms`) and inference time (`infer_ms`) in the reply. A request that cannot
be used gets an error reply naming what was wrong; nothing a client sends stops the server.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth.thread

from diffpolicy.deploy.auth import ServerKeys
from diffpolicy.deploy.config import ServerConfig
from diffpolicy.deploy.errors import WireError
from diffpolicy.deploy.runner import metadata_of, run_sample
from diffpolicy.deploy.wire import VERSION, check_request, decode_sample, make_reply, pack, request_id_of, unpack
from diffpolicy.errors import InvalidStateError

RESULTS = "inproc://diffpolicy-results-{}"
POLL_MS = 50


class ServerBusyError(InvalidStateError):
    """The inference queue is full; the client should retry later."""


@dataclass
class _Job:
    identity: bytes
    request_id: int
    request: dict[str, Any]
    received: float


class PolicyServer:
    """Serves `policy` (a `ChunkPolicy`) over ZeroMQ (module docstring).

    Args:
        policy: the policy; only its public methods are used (`sample`, `encode_obs`,
            `sample_normalized`, `config`, `normalizer`, `metadata`).
        config: a `ServerConfig` (host, port, keys, limits).
        infer: replaces the policy call `(policy, decoded sample request) -> reply body`
            (default `runner.run_sample`); tests slow it down.
    """

    def __init__(self, policy: Any, config: ServerConfig | None = None,
                 infer: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None):
        self.policy, self.config = policy, config or ServerConfig()
        self.keys = ServerKeys.load(self.config.curve_keys) if self.config.curve_keys else None
        self._infer = infer or run_sample
        self._metadata = metadata_of(policy)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=self.config.max_pending)
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._authenticator: zmq.auth.thread.ThreadAuthenticator | None = None
        self._results = RESULTS.format(id(self))
        self.address: str | None = None
        self.started = time.monotonic()
        self.counts = {"served": 0, "errors": 0, "busy": 0}
        self._counts_lock = threading.Lock()
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> PolicyServer:
        """Bind and start the socket and worker threads; returns once the socket is bound."""
        socket_thread = threading.Thread(target=self._serve, name="diffpolicy-server", daemon=True)
        worker = threading.Thread(target=self._work, name="diffpolicy-server-worker", daemon=True)
        self._threads = [socket_thread, worker]
        socket_thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise InvalidStateError(f"policy server failed to start on {self.config.host}:{self.config.port}: "
                                    f"{self._error}")
        worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def request_stop(self) -> None:
        """Ask the threads to finish (safe from a signal handler); `stop()` then joins them."""
        self._stop.set()

    def wait(self) -> None:
        """Block until `request_stop()` or `stop()` (from a signal handler or another thread)."""
        while not self._stop.wait(0.5):
            pass

    # ------------------------------------------------------------------ socket thread
    def _bind(self) -> tuple[zmq.Socket, zmq.Socket]:
        router = self._context.socket(zmq.ROUTER)
        router.linger = 0
        router.maxmsgsize = 4 * self.config.max_message_bytes
        router.router_mandatory = False
        if self.keys is not None:
            self._authenticator = zmq.auth.thread.ThreadAuthenticator(self._context)
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=str(self.keys.clients_dir))
            router.curve_server = True
            router.curve_publickey, router.curve_secretkey = self.keys.public, self.keys.secret
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        router.bind(f"tcp://{host}:{self.config.port or '*'}")
        self.address = router.last_endpoint.decode()
        results = self._context.socket(zmq.PULL)
        results.bind(self._results)
        return router, results

    def _serve(self) -> None:
        try:
            router, results = self._bind()
        except Exception as err:  # a taken port, a bad host: reported by start()
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if results in events:
                    while results.poll(0):
                        identity, reply = results.recv_multipart()
                        router.send_multipart([identity, reply])
                if router in events:
                    while router.poll(0):
                        self._handle(router, router.recv_multipart())
        finally:
            router.close(0)
            results.close(0)

    def _handle(self, router: zmq.Socket, frames: list[bytes]) -> None:
        """One incoming message: reply now (health, metadata, errors) or queue it for the worker."""
        received = time.perf_counter()
        identity, payload = frames[0], frames[-1]
        message: Any = None
        try:
            if len(frames) != 2:
                raise WireError(f"expected one message frame (DEALER socket), got {len(frames) - 1}")
            message = unpack(payload, self.config.max_message_bytes)
            request_id, op, body = check_request(message)
            if op == "health":
                reply = make_reply(request_id, self._health())
            elif op == "metadata":
                reply = make_reply(request_id, self._metadata)
            else:
                job = _Job(identity, request_id, decode_sample(body), received)
                try:
                    self._jobs.put_nowait(job)
                except queue.Full:
                    self._count("busy")
                    raise ServerBusyError(f"inference queue full ({self.config.max_pending} requests waiting); "
                                          "retry later") from None
                return
        except Exception as err:  # every bad message gets an error reply; the loop goes on
            self._count("errors")
            reply = make_reply(request_id_of(message), error=err)
        router.send_multipart([identity, pack(reply)])

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self.counts[name] += 1

    def _health(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self.counts)
        return {"status": "ok", "schema": VERSION, "pending": self._jobs.qsize(),
                "uptime_s": time.monotonic() - self.started, **counts}

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        sender = self._context.socket(zmq.PUSH)
        sender.linger = 0
        sender.connect(self._results)
        try:
            while not self._stop.is_set():
                job = self._jobs.get()
                if job is None:
                    return
                start = time.perf_counter()
                try:
                    body = self._infer(self.policy, job.request)
                    error = None
                    self._count("served")
                except Exception as err:  # a failing inference is that request's error, not the server's
                    body, error = None, err
                    self._count("errors")
                end = time.perf_counter()
                reply = make_reply(job.request_id, body, error, queue_ms=(start - job.received) * 1e3,
                                   infer_ms=(end - start) * 1e3)
                sender.send_multipart([job.identity, pack(reply)])
        finally:
            sender.close(0)

"""The policy server: a ZeroMQ ROUTER socket in front of an inference worker thread.

    server = PolicyServer(policy, ServerConfig(port=0))
    server.start()                  # the socket thread and the worker thread
    server.address                  # "tcp://127.0.0.1:PORT"
    server.stop()

The socket thread reads every message, checks it against the wire schema, answers health and
metadata requests itself, and queues sample requests for the worker. The worker runs the policy
and sends the reply on the ROUTER socket itself, so a reply goes out without waking the socket
thread; a slow inference never blocks the socket: health requests are answered while it runs,
and queued requests learn their queue wait (`queue_ms`) and inference time (`infer_ms`) in the
reply. A request that cannot be used gets an error reply naming what was wrong; nothing a client
sends stops the server.

Sharing the socket: a ZeroMQ socket may be used by one thread at a time, with a memory barrier
between users, so every receive and send holds `_router_lock` (a send on a ROUTER never blocks:
the lock is held for microseconds). The socket thread waits outside ZeroMQ, on the socket's file
descriptor (`zmq.FD`), and after every wake-up reads `zmq.EVENTS` until no message is waiting.
That descriptor only signals new socket activity, and a worker's send may consume the signal of a
message that arrived meanwhile, so after sending the worker checks `zmq.EVENTS` too and, if a
message is waiting, wakes the socket thread over an inproc socket.
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

WAKE = "inproc://diffpolicy-wake-{}"
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
        self._wake = WAKE.format(id(self))
        self._router: zmq.Socket | None = None
        self._router_lock = threading.Lock()
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
        if self._threads and self._threads[0].is_alive():  # wake the socket thread now, not at its poll timeout
            poke = self._context.socket(zmq.PUSH)
            poke.linger = 0
            poke.connect(self._wake)
            try:
                poke.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass
            poke.close(0)
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
    def _bind(self) -> zmq.Socket:
        router = self._context.socket(zmq.ROUTER)
        try:
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
        except Exception:
            router.close(0)  # an open socket would make stop()'s context.term() wait forever
            raise
        self.address = router.last_endpoint.decode()
        return router

    def _serve(self) -> None:
        wake = self._context.socket(zmq.PULL)
        try:
            wake.bind(self._wake)
            self._router = router = self._bind()
        except Exception as err:  # a taken port, a bad host: reported by start()
            wake.close(0)
            self._error = err
            self._ready.set()
            return
        poller = zmq.Poller()
        poller.register(router.getsockopt(zmq.FD), zmq.POLLIN)  # a plain descriptor: waiting needs no lock
        poller.register(wake, zmq.POLLIN)
        self._ready.set()  # the worker starts now: from here on every use of the router holds the lock
        try:
            while not self._stop.is_set():
                if wake in dict(poller.poll(POLL_MS)):  # drain before reading the router's EVENTS
                    while wake.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        wake.recv()
                while (frames := self._receive(router)) is not None:
                    reply = self._handle(frames)
                    if reply is not None:
                        with self._router_lock:
                            router.send_multipart([frames[0], reply])
        finally:
            with self._router_lock:
                self._router = None
                router.close(0)
            wake.close(0)

    def _receive(self, router: zmq.Socket) -> list[bytes] | None:
        """The next waiting message's frames, or None when none is waiting."""
        with self._router_lock:
            if router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return router.recv_multipart()
        return None

    def _handle(self, frames: list[bytes]) -> bytes | None:
        """One incoming message: the reply to send now (health, metadata, errors), or None when it
        went to the worker."""
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
                return None
        except Exception as err:  # every bad message gets an error reply; the loop goes on
            self._count("errors")
            reply = make_reply(request_id_of(message), error=err)
        return pack(reply)

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
        wake = self._context.socket(zmq.PUSH)
        wake.linger = 0
        wake.connect(self._wake)
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
                reply = pack(make_reply(job.request_id, body, error, queue_ms=(start - job.received) * 1e3,
                                        infer_ms=(end - start) * 1e3))
                self._send_reply(job.identity, reply, wake)
        finally:
            wake.close(0)

    def _send_reply(self, identity: bytes, reply: bytes, wake: zmq.Socket) -> None:
        """Send on the ROUTER (module docstring: sharing the socket); wake the socket thread if a
        message is waiting, since this send may have taken its signal."""
        with self._router_lock:
            router = self._router
            if router is None:  # stopping: the socket thread has closed it
                return
            router.send_multipart([identity, reply])
            waiting = router.getsockopt(zmq.EVENTS) & zmq.POLLIN
        if waiting:
            try:
                wake.send(b"", zmq.NOBLOCK)
            except zmq.Again:  # wake-ups already queued: the socket thread will look anyway
                pass

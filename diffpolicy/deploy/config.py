"""Configuration of the policy server, read with the package's strict config reader."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from diffpolicy.config import check_int, fail

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, "localhost")."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the policy server listens.

    host: interface to bind ("127.0.0.1" by default; anything beyond loopback needs `curve_keys`).
    port: TCP port (0: a free one, read back from `PolicyServer.address`).
    curve_keys: directory made by `deploy.auth.make_keys` (server secret key and the authorized
        clients' public keys); None serves without authentication (loopback only).
    max_message_bytes: larger requests get an error reply (and ZeroMQ drops those 4 times larger).
    max_pending: sample requests queued for the inference worker before "busy" replies.
    """

    host: str = "127.0.0.1"
    port: int = 5555
    curve_keys: str | None = None
    max_message_bytes: int = 64 * 2 ** 20
    max_pending: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise fail("server.host", "a host name or IP address", self.host)
        check_int("server.port", self.port, minimum=0)
        if self.port > 65535:
            raise fail("server.port", "a TCP port in [0, 65535]", self.port)
        check_int("server.max_message_bytes", self.max_message_bytes, minimum=1024)
        check_int("server.max_pending", self.max_pending, minimum=1)
        if self.curve_keys is None and not is_loopback(self.host):
            raise fail("server.curve_keys", f"a key directory (binding to {self.host!r} reaches beyond loopback, "
                       "which requires CURVE authentication; make keys with `diffpolicy serve --make-keys DIR`)",
                       self.curve_keys)

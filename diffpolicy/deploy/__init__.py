"""Deployment: a policy server and its client over ZeroMQ (msgpack, never pickle), and ROS bridges.

See docs/ARCHITECTURE.md ("deploy/"): `wire` (the versioned message schema), `server`
(`PolicyServer`), `client` (`PolicyClient`, `RemotePolicy`), `auth` (CurveZMQ keys), `ros` (the
bridge and its transports). The names below load on first use, so `deploy.ros` works without the
server's extra (pyzmq, msgpack) and the server without ROS.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"PolicyClient": "client", "RemotePolicy": "client", "ServerConfig": "config", "PolicyServer": "server"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffpolicy.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffpolicy.deploy.{_LAZY[name]}"), name)

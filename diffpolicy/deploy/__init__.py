"""Deployment: a policy server and its client over ZeroMQ (msgpack, never pickle), and ROS bridges.

See docs/ARCHITECTURE.md ("deploy/"): `wire` (the versioned message schema), `server`
(`PolicyServer`), `client` (`PolicyClient`, `RemotePolicy`), `auth` (CurveZMQ keys), `ros` (the
bridge and its transports, optional extras).
"""

from diffpolicy.deploy.client import PolicyClient, RemotePolicy
from diffpolicy.deploy.config import ServerConfig
from diffpolicy.deploy.server import PolicyServer

__all__ = ["PolicyClient", "PolicyServer", "RemotePolicy", "ServerConfig"]

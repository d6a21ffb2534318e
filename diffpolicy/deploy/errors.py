"""Errors of the deployment layer (server, client, wire schema, ROS bridge)."""

from __future__ import annotations

from diffpolicy.errors import InvalidStateError, InvalidValueError


class WireError(InvalidValueError):
    """A message that does not follow the wire schema (bad bytes, wrong version, wrong field, bad array)."""


class RemoteError(InvalidStateError):
    """The policy server answered a request with an error reply (its type and message are in the text)."""


class ServerUnavailableError(InvalidStateError):
    """No reply from the policy server in time (down, unreachable, or the CURVE handshake was refused)."""


class AuthenticationError(InvalidStateError):
    """The server refused this client's credentials (CURVE handshake failed)."""


class BridgeError(InvalidValueError):
    """A ROS bridge configuration or message that cannot be used (names the topic and field)."""

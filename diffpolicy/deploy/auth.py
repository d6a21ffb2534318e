"""CurveZMQ keys: the server's key pair and the public keys of the clients it accepts.

A key directory made by `make_keys(directory, clients=("client",))`:

    server.key            server public key      (give it to every client)
    server.key_secret     server secret key      (stays on the server)
    clients/<name>.key    authorized client public keys (the server accepts exactly these)
    <name>.key_secret     a client's key pair    (copy to that client; never to the server's clients/)

CURVE (not a shared secret with an HMAC) because it authenticates both ends *and* encrypts every
message, with per-connection keys and replay protection built into libzmq; an HMAC scheme would
need its own nonces and would still send observations in the clear.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from diffpolicy.deploy.errors import AuthenticationError
from diffpolicy.errors import MissingFileError

SERVER = "server"
CLIENTS_DIR = "clients"


def require_curve() -> None:
    if not zmq.has("curve"):
        raise AuthenticationError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE (libsodium); "
                                  "authentication beyond loopback is unavailable")


def make_keys(directory: str | os.PathLike, clients: tuple[str, ...] = ("client",)) -> Path:
    """Write a server key pair and one key pair per client name; authorize those clients."""
    require_curve()
    root = Path(directory)
    (root / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(root), SERVER)
    for name in clients:
        public, _ = zmq.auth.create_certificates(str(root), name)
        shutil.copy(public, root / CLIENTS_DIR / Path(public).name)
    os.chmod(root, 0o700)
    return root


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise MissingFileError(f"CURVE key file {path} not found (make keys with `diffpolicy serve --make-keys DIR`)")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except Exception as err:  # zmq raises ValueError / OSError for a malformed certificate
        raise AuthenticationError(f"CURVE key file {path}: not a valid certificate: {err}") from None
    if secret and secret_key is None:
        raise AuthenticationError(f"CURVE key file {path}: has no secret key (expected a *.key_secret file)")
    return public, secret_key


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    clients_dir: Path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ServerKeys:
        require_curve()
        root = Path(directory)
        public, secret = _load(root / f"{SERVER}.key_secret", secret=True)
        clients = root / CLIENTS_DIR
        if not clients.is_dir() or not any(clients.glob("*.key")):
            raise MissingFileError(f"{clients}: no authorized client keys (*.key); the server would accept nobody")
        return cls(public, secret, clients)


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the server public key it expects."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, client_secret_file: str | os.PathLike, server_public_file: str | os.PathLike) -> ClientKeys:
        require_curve()
        public, secret = _load(Path(client_secret_file), secret=True)
        server_public, _ = _load(Path(server_public_file), secret=False)
        return cls(public, secret, server_public)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_publickey, socket.curve_secretkey = self.public, self.secret
        socket.curve_serverkey = self.server_public

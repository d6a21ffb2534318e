"""`diffpolicy serve`: serve a trained policy over ZeroMQ (msgpack, never pickle).

    diffpolicy serve --checkpoint runs/pusht_diffusion                          # 127.0.0.1:5555
    diffpolicy serve --make-keys deploy/keys                                    # CURVE keys, once
    diffpolicy serve --checkpoint runs/pusht_diffusion --host 0.0.0.0 --keys deploy/keys

Binding beyond loopback requires `--keys` (CurveZMQ: the server's secret key and the authorized
clients' public keys). SIGTERM or Ctrl-C stops the server after the inference that is running.
"""

from __future__ import annotations

import argparse
import signal

import torch

from diffpolicy.deploy.auth import make_keys
from diffpolicy.deploy.config import ServerConfig
from diffpolicy.deploy.server import PolicyServer
from diffpolicy.errors import UsageError
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="run, checkpoint or save_pretrained directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (beyond loopback needs --keys)")
    parser.add_argument("--port", type=int, default=5555, help="TCP port (0: a free one, printed)")
    parser.add_argument("--keys", default=None, help="CURVE key directory (from --make-keys)")
    parser.add_argument("--make-keys", metavar="DIR", default=None,
                        help="write a server key pair and a client key pair into DIR, then exit")
    parser.add_argument("--clients", nargs="+", default=["client"], help="client names for --make-keys")
    parser.add_argument("--inference-steps", type=int, default=None, help="denoising steps (default: the policy's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the inference worker")


def run(args: argparse.Namespace) -> int:
    if args.make_keys:
        root = make_keys(args.make_keys, tuple(args.clients))
        print(f"keys in {root}: give {root}/server.key and a <client>.key_secret to each client; "
              f"serve with --keys {root}")
        return 0
    if not args.checkpoint:
        raise UsageError("diffpolicy serve: --checkpoint DIR is required (or --make-keys DIR)")
    torch.set_num_threads(args.threads)
    config = ServerConfig(host=args.host, port=args.port, curve_keys=args.keys)
    policy = ChunkPolicy.from_pretrained(resolve_policy_dir(args.checkpoint))
    if args.inference_steps is not None:
        policy.set_sampling(inference_steps=args.inference_steps)
    server = PolicyServer(policy, config).start()
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    print(f"serving {args.checkpoint} on {server.address} ({'CURVE' if args.keys else 'no authentication'})",
          flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print("policy server stopped", flush=True)
    return 0

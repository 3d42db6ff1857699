"""Write a CurveZMQ key pair for a non-loopback endpoint (docs/security.md).

    flexkv keygen /etc/flexkv/keys                  # server.key (public) and server.key_secret (0600)
    flexkv keygen /etc/flexkv/keys --name node-b    # one pair per client, named after it

Never overwrites an existing key. The work is ``flexkv.security.keygen`` (also ``python -m flexkv.security
keygen``).
"""

from __future__ import annotations

import argparse
import sys

from flexkv.security import keygen
from flexkv.types import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="directory for the key files (created if missing)")
    p.add_argument("--name", default="server", help="key name (default: server; one per client, e.g. its host)")


def run(args: argparse.Namespace) -> int:
    try:
        public, secret = keygen(args.dir, args.name)
    except ConfigError as e:
        print(f"flexkv keygen: {e}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret}")
    return 0

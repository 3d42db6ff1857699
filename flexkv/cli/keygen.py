"""Write a CurveZMQ key pair for a non-loopback endpoint (docs/security.md).

    flexkv keygen /etc/flexkv/keys                  # server.key (public) and server.key_secret (0600)
    flexkv keygen /etc/flexkv/keys --name node-b    # one pair per client, named after it

Never overwrites an existing key. The work is ``flexkv.security.keygen`` (also ``python -m flexkv.security
keygen``).
"""

from __future__ import annotations

import argparse

from flexkv import security


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="directory for the key files (created if missing)")
    p.add_argument("--name", default="server", help="key name (default: server; one per client, e.g. its host)")


def run(args: argparse.Namespace) -> int:
    return security.main(["keygen", args.dir, "--name", args.name])

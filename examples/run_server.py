#!/usr/bin/env python3
"""Run a flexkv server in the foreground until Ctrl-C: the same code and flags as ``flexkv serve``.

    python examples/run_server.py                      # embedded defaults: Llama-3-8B shape, 512 MiB CPU pool
    python examples/run_server.py --cpu-cache-gb 16 --enable-ssd --ssd-cache-dir /nvme0/flexkv;/nvme1/flexkv \
        --ssd-cache-gb 500 --tp-size 2 --server-address tcp://127.0.0.1:5555
    python examples/run_server.py --config flexkv.yaml # the user config (see docs/config.md)

Engines connect with ``KVManager(model, cache, server_address=...)`` (one per DP rank) and register
their KV buffers with ``KVTPClient(server_address, dp_client_id, tp_rank, device_id).register(...)``.
"""

from __future__ import annotations

import argparse
import sys

from flexkv.cli import serve


def main() -> int:
    p = argparse.ArgumentParser(prog="run_server.py", description=__doc__.split("\n")[0])
    serve.add_arguments(p)
    return serve.run(p.parse_args(), prog="run_server.py")


if __name__ == "__main__":
    sys.exit(main())

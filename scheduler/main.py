"""Server entry point: ``python -m flexkv.scheduler.main --configs-json ... [--address ...]``.

Library mode (KVManager) starts this as a child process; ``examples/run_server.py`` runs the same
server in the foreground.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flexkv.common.config import configs_from_json
from flexkv.scheduler.server import SchedulerServer
from flexkv.types import FlexKVError

STARTUP_ERROR_FILE = "startup-error"


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("FLEXKV_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="flexkv scheduler server (internal entry point)")
    p.add_argument("--configs-json", required=True)
    p.add_argument("--address", default=None)
    p.add_argument("--runtime-dir", default=None)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    setup_logging()
    try:
        model, cache = configs_from_json(args.configs_json)
        server = SchedulerServer(model, cache, args.address, args.runtime_dir, args.parent_pid)
    except (FlexKVError, OSError) as e:
        logging.getLogger("flexkv.server").error("cannot start: %s", e)
        if args.runtime_dir:  # library mode: the KVManager that started us reports this
            with open(os.path.join(args.runtime_dir, STARTUP_ERROR_FILE), "w", encoding="utf-8") as f:
                f.write(f"{type(e).__name__}: {e}")
        return 2
    server.install_signal_handlers()
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

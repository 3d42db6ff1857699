"""Entry point of a worker process: ``python -m flexkv.workers.main '<json spec>'``.

The worker's credential (the secret its hellos carry) arrives as the first line on stdin, never on the
command line, where every local user could read it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from flexkv.workers.base import Worker


def make_worker(spec: dict[str, object]) -> Worker:
    kind = spec.get("kind")
    if kind == "device":
        from flexkv.workers.device_worker import DeviceWorker

        return DeviceWorker(spec)
    if kind == "ssd":
        from flexkv.workers.ssd_worker import SSDWorker

        return SSDWorker(spec)
    if kind == "remote":
        from flexkv.workers.remote_worker import RemoteWorker

        return RemoteWorker(spec)
    raise ValueError(f"unknown worker kind {kind!r}; allowed: device, ssd, remote")


def main() -> int:
    logging.basicConfig(level=os.environ.get("FLEXKV_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    spec = json.loads(sys.argv[1])
    spec["credential"] = sys.stdin.readline().strip()
    worker = make_worker(spec)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

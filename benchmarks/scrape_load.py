"""A thread that scrapes a /metrics endpoint every ``interval_s``: the load a Prometheus server adds.

Used by the ``--metrics`` runs of benchmarks/control_latency.py, throughput.py and trace_replay.py to
measure the server with metrics on (and scraped 15x more often than Prometheus' default) beside off.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Scraper:
    def __init__(self, port: int, interval_s: float = 1.0) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.num_scrapes = 0
        self.last_bytes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    body = resp.read()
            except (urllib.error.URLError, ConnectionError) as e:
                self.errors.append(str(e))  # the server still starting, or already stopped
                continue
            if b"flexkv_up 1.0" not in body:
                self.errors.append("the server loop did not answer a scrape")
            self.num_scrapes += 1
            self.last_bytes = len(body)

    def close(self) -> int:
        """Stop; returns the number of scrapes done."""
        self._stop.set()
        self._thread.join(timeout=15)
        return self.num_scrapes

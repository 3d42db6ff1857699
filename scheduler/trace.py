"""The request trace: one JSON line per finished task, in a file rotated by size.

Off by default; the config key ``trace_path`` turns it on (``trace_max_mb``, ``trace_backups`` bound
it; docs/operations.md lists the fields). Lines are written by the server thread when a task leaves
the control plane and flushed every server tick (0.1 s) and at shutdown, so a reader sees a task
within a tick of its end. Rotation: ``trace.jsonl`` -> ``trace.jsonl.1`` -> ... ``.<backups>`` (the
oldest is dropped). Server process only.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any


class TraceWriter:
    """Appends JSON lines to ``path``; past ``max_bytes`` the file is rotated (``backups`` kept)."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError(f"trace: max_bytes must be > 0 and backups >= 0, got {max_bytes}, {backups}")
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self._size = self._file.tell()
        self.num_lines = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._size += len(line)
        self.num_lines += 1

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._file = open(self.path, "a", encoding="utf-8")
        self._size = 0

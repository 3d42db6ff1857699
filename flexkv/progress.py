"""Progress of long start-up work, shown the same way everywhere.

Pool pre-faulting, SSD file preallocation, cudaHostRegister of the pool and the SSD index rebuild can
each take tens of seconds on a large cache. They report through :class:`Progress`, a callable with the
``(done, total)`` signature their loops already take:

* on a terminal (stderr is a TTY): one bar redrawn in place, ended with a newline;
* otherwise (a log file, systemd, a test): one log line (logger ``flexkv.progress``) every few seconds.

Work that ends within ``min_s`` (1 s) shows nothing, so small pools and tests stay quiet.
``FLEXKV_PROGRESS`` overrides the choice: ``bar``, ``lines`` or ``off``. Runs in whichever process does
the work; not thread-safe (one piece of work, one caller).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger("flexkv.progress")

MODES = ("bar", "lines", "off")
_BAR_WIDTH = 30
_BAR_REDRAW_S = 0.1


def _fmt(amount: float, unit: str) -> str:
    if unit != "bytes":
        return f"{amount:,.0f} {unit}"
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if amount >= scale:
            return f"{amount / scale:.1f} {name}"
    return f"{amount:.0f} B"


def _mode(stream: TextIO) -> str:
    forced = os.environ.get("FLEXKV_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


class Progress:
    """Progress of one piece of work of ``total`` units (``unit="bytes"`` prints GiB/MiB).

    Call it with ``(done, total)`` as the work advances and :meth:`finish` at the end (also as a
    context manager). ``stream`` (default stderr) decides bar versus lines; ``clock`` is for tests.
    """

    def __init__(self, label: str, total: int, unit: str = "bytes", *, stream: TextIO | None = None,
                 interval_s: float = 5.0, min_s: float = 1.0, mode: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self._stream = stream if stream is not None else sys.stderr
        self.mode = mode if mode in MODES else _mode(self._stream)
        self._interval_s, self._min_s, self._clock = interval_s, min_s, clock
        self._start = clock()
        self._last_shown = -1.0
        self.done = 0
        self.shown = False  # something was printed (a finish line follows)

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(0, int(total))
        self.done = int(done)
        if self.mode == "off":
            return
        now = self._clock()
        if now - self._start < self._min_s:
            return
        gap = _BAR_REDRAW_S if self.mode == "bar" else self._interval_s
        if self._last_shown >= 0 and now - self._last_shown < gap:
            return
        self._last_shown = now
        self.shown = True
        if self.mode == "bar":
            self._stream.write("\r" + self._bar(now))
            self._stream.flush()
        else:
            log.info("%s", self._line(now))

    def finish(self) -> None:
        """End the report: the bar gets its final state and a newline; lines get a closing line."""
        if not self.shown or self.mode == "off":
            return
        now = self._clock()
        self.done = max(self.done, self.total)
        took = f"done in {now - self._start:.1f} s"
        if self.mode == "bar":
            self._stream.write("\r" + self._bar(now) + f"  {took}\n")
            self._stream.flush()
        else:
            log.info("%s: %s %s", self.label, _fmt(self.total, self.unit), took)
        self.shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.finish()

    def _fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def _rate(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        return f"{_fmt(self.done / elapsed, self.unit)}/s"

    def _bar(self, now: float) -> str:
        filled = int(self._fraction() * _BAR_WIDTH)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        return (f"{self.label} [{bar}] {self._fraction():4.0%} {_fmt(self.done, self.unit)} / "
                f"{_fmt(self.total, self.unit)}  {self._rate(now)}")

    def _line(self, now: float) -> str:
        return (f"{self.label}: {_fmt(self.done, self.unit)} / {_fmt(self.total, self.unit)} "
                f"({self._fraction():.0%}), {self._rate(now)}, {now - self._start:.0f} s")

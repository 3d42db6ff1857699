"""Per-hop timestamps of tasks, for latency breakdowns of small ops (any process; off by default).

With ``FLEXKV_HOP_TRACE=<directory>`` in the environment (the server and its workers inherit it),
each process appends ``(CLOCK_MONOTONIC ns, hop, task id)`` at fixed points of an op's way (the
``HOPS`` below) and writes them to ``<directory>/<pid>.hops`` when it exits (and every 64K marks).
CLOCK_MONOTONIC is one clock for every process of a machine, so marks of one task from the client,
the server and the worker line up. Call sites guard with ``if hoptrace.ENABLED`` so an untraced
process pays one attribute read per hop. ``summarize`` prints the median time between hops.

Task ids are the engine's (one session per trace: several clients' ids would collide).
"""

from __future__ import annotations

import atexit
import collections
import glob
import itertools
import os
import threading
import time

import numpy as np

DIRECTORY = os.environ.get("FLEXKV_HOP_TRACE", "")
ENABLED = bool(DIRECTORY)

# In the order an op passes them (a hop a process does not reach is left out of that task's row).
HOPS = (
    "client_send",       # KVManager: put_async/get_async about to send
    "server_request",    # server: the async message decoded, before the match
    "server_dispatched",  # server: its op planned, about to be sent to the worker
    "server_wait",       # server: the client's WaitMsg parked
    "worker_received",   # worker: the ExecuteOpMsg decoded
    "copy_started",      # worker: the copy begins (loop or lane thread)
    "copy_done",         # worker: the copy returned (or its event completed)
    "worker_reported",   # worker: OpsDoneMsg encoded, about to be sent
    "server_completed",  # server: OpsDoneMsg decoded, before complete_op
    "server_replied",    # server: WaitReplyMsg about to be sent
    "client_replied",    # KVManager: wait's reply decoded
    "client_landed",     # KVManager: a GET's landing seen in every rank's progress table (landing waits)
)

_marks: list[tuple[int, str, int]] = []
_lock = threading.Lock()
_FLUSH_EVERY = 1 << 16


def mark_kind(is_put: bool, task_id: int) -> None:
    """Record whether ``task_id`` is a put or a get (the client, beside ``client_send``)."""
    mark("put" if is_put else "get", task_id)


def mark(hop: str, task_id: int) -> None:
    """Record that ``task_id`` passed ``hop`` now (call only when ENABLED)."""
    _marks.append((time.monotonic_ns(), hop, task_id))
    if len(_marks) >= _FLUSH_EVERY:
        flush()


def flush() -> None:
    """Append the marks so far to this process's file."""
    if not ENABLED:
        return
    with _lock:
        taken = _marks[:]
        del _marks[: len(taken)]
    if taken:
        with open(os.path.join(DIRECTORY, f"{os.getpid()}.hops"), "a", encoding="ascii") as f:
            f.writelines(f"{ns}\t{hop}\t{tid}\n" for ns, hop, tid in taken)


def enable(directory: str) -> None:
    """Trace this process, and the processes it starts from now on (they inherit the variable)."""
    global DIRECTORY, ENABLED
    os.environ["FLEXKV_HOP_TRACE"] = DIRECTORY = directory
    if not ENABLED:
        atexit.register(flush)
    ENABLED = True


def disable() -> None:
    """Write what was recorded and stop tracing (processes started from now on are not traced)."""
    global ENABLED
    flush()
    ENABLED = False
    os.environ.pop("FLEXKV_HOP_TRACE", None)


if ENABLED:
    atexit.register(flush)


def load(directory: str) -> dict[int, dict[str, int]]:
    """task id -> hop -> ns (the first mark of each hop) from every file in ``directory``."""
    tasks: dict[int, dict[str, int]] = collections.defaultdict(dict)
    for path in glob.glob(os.path.join(directory, "*.hops")):
        with open(path, encoding="ascii") as f:
            for line in f:
                ns, hop, tid = line.split("\t")
                tasks[int(tid)].setdefault(hop, int(ns))
    return tasks


def summarize(directory: str) -> list[str]:
    """Lines: per hop the median microseconds since the previous hop, over tasks that passed both. GETs whose
    wait ended from the progress tables ("landing") are their own group: their server reply travels while
    the copy runs, and the copy's end is what the client sees."""
    lines: list[str] = []
    traced = load(directory).values()
    for kind, landing in (("put", False), ("get", False), ("get", True)):
        tasks = [h for h in traced if kind in h and "client_replied" in h and ("client_landed" in h) == landing]
        if landing and not tasks:
            continue
        what = f"{kind} (landing)" if landing else kind
        lines.append(f"{what}: hop breakdown over {len(tasks)} traced tasks (median us since the previous hop)")
        lines += _rows(tasks, _LANDING_HOPS if landing else HOPS[:-1])
    return lines


# The hop each one is timed from: the one before it, except where two run in parallel.
_SINCE = {"server_wait": "server_request", "worker_received": "server_dispatched", "client_landed": "copy_done"}
# A landing GET's way to its client: the server's reply and the worker's report run beside it.
_LANDING_HOPS = ("client_send", "server_request", "server_dispatched", "worker_received", "copy_started", "copy_done",
                 "client_landed")


def _rows(complete: list[dict[str, int]], hops: tuple[str, ...]) -> list[str]:
    lines = []
    for prev, hop in itertools.pairwise(hops):
        base = _SINCE.get(hop, prev)
        deltas = [h[hop] - h[base] for h in complete if hop in h and base in h]
        if deltas:
            lines.append(f"  {base:>18} -> {hop:<18} {np.median(deltas) / 1e3:8.1f} us  ({len(deltas)} tasks)")
    end = hops[-1]
    total = [h[end] - h["client_send"] for h in complete if "client_send" in h and end in h]
    if total:
        lines.append(f"  {'client_send':>18} -> {end:<18} {np.median(total) / 1e3:8.1f} us total")
    return lines

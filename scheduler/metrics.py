"""Prometheus metrics of one flexkv server: an HTTP ``/metrics`` endpoint (prometheus-client).

Off by default; ``metrics_port`` (``FLEXKV_METRICS_PORT``, ``flexkv serve --metrics-port``) turns it
on, bound to ``metrics_address`` (127.0.0.1 unless given). Workers' figures arrive in the messages they
already send, so the server is the one scrape target. The hot path pays nothing for the exporter: a
scrape asks the server thread for one snapshot (:func:`flexkv.scheduler.telemetry.build_snapshot`)
over an inproc socket that the server loop polls, and the HTTP thread turns it into metric families.
Imported only when metrics are on. The names are listed in docs/operations.md and used by
docs/grafana-dashboard.json.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import zmq
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from flexkv.protocol.client_msgs import QueryMsg
from flexkv.scheduler.telemetry import OP_SECONDS_BUCKETS, REQUEST_NAMES
from flexkv.types import OpType, TaskStatus

log = logging.getLogger("flexkv.server")

_SCRAPE_TIMEOUT_MS = 5000
_SEQ = struct.Struct("<Q")
_TASK_STATUSES = [s.name.lower() for s in (TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELLED,
                                           TaskStatus.NOTFOUND)]
_REQUEST_TYPES = sorted(set(REQUEST_NAMES.values()))
assert QueryMsg in REQUEST_NAMES


class MetricsExporter:
    """The HTTP endpoint (daemon threads) and the server side of the snapshot socket.

    The server thread registers :attr:`sock` in its poller and calls :meth:`serve` when it is readable;
    nothing else of the server is touched from the HTTP threads."""

    def __init__(self, ctx: zmq.Context[Any], address: str, port: int) -> None:
        endpoint = f"inproc://flexkv-metrics-{id(self):x}"
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self._client: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self._client.setsockopt(zmq.LINGER, 0)
        self._client.connect(endpoint)
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_FlexKVCollector(self._fetch))
        try:
            self._httpd, self._thread = start_http_server(port, addr=address, registry=registry)
        except OSError:
            self.sock.close()
            self._client.close()
            raise
        self.address, self.port = address, int(self._httpd.server_port)
        log.info("metrics at http://%s:%d/metrics", address, self.port)

    def serve(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Server thread: answer every pending scrape with one snapshot."""
        while True:
            try:
                seq = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.sock.send_multipart([seq, msgspec.json.encode(snapshot())])

    def _fetch(self) -> dict[str, Any] | None:
        """HTTP thread: the server's snapshot, or None if the server loop did not answer in time."""
        with self._lock:
            seq = _SEQ.pack(next(self._seq))
            self._client.send(seq)
            while self._client.poll(_SCRAPE_TIMEOUT_MS):
                got, payload = self._client.recv_multipart()
                if got == seq:  # an older, timed-out scrape's answer is dropped
                    result: dict[str, Any] = msgspec.json.decode(payload)
                    return result
            return None

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._client.close()
        self.sock.close()


class _FlexKVCollector(Collector):
    def __init__(self, fetch: Callable[[], dict[str, Any] | None]) -> None:
        self._fetch = fetch

    def collect(self) -> Iterator[Metric]:
        snap = self._fetch()
        up = GaugeMetricFamily("flexkv_up", "1 when the server loop answered this scrape")
        up.add_metric([], 1.0 if snap is not None else 0.0)
        yield up
        if snap is not None:
            yield from families(snap)


def _counter(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        fam.add_metric(list(key), value)
    return fam


def _gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    fam = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        fam.add_metric(list(key), value)
    return fam


def _split(table: dict[str, int], first: list[str], second: list[str]) -> dict[tuple[str, ...], float]:
    """``{"a|b": n}`` -> ``{("a", "b"): n}``, with every (first x second) pair present (0 if unseen)."""
    out: dict[tuple[str, ...], float] = {(a, b): 0.0 for a in first for b in second}
    for key, value in table.items():
        a, _, b = key.partition("|")
        out[(a, b)] = float(value)
    return out


def families(snap: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one snapshot (every name the dashboard may use)."""
    c = snap["counters"]
    ops = [t.name for t in OpType]
    yield _counter("flexkv_requests", "client requests handled, by message type and outcome", ["type", "status"],
                   _split(c["requests"], _REQUEST_TYPES, ["ok", "error"]))
    yield _counter("flexkv_tasks", "tasks finished, by type and final status", ["type", "status"],
                   _split(c["tasks"], ["get", "put", "unknown"], _TASK_STATUSES))
    tok = c["tokens"]
    yield _counter("flexkv_query_tokens", "tokens asked for by matches", ["type"],
                   {("get",): tok["get_query"], ("put",): tok["put_query"]})
    yield _counter("flexkv_matched_tokens", "tokens GET matches found cached (to load)", [], {(): tok["matched"]})
    yield _counter("flexkv_loaded_tokens", "tokens GETs loaded into the engine", [], {(): tok["loaded"]})
    yield _counter("flexkv_stored_tokens", "tokens PUTs stored from the engine", [], {(): tok["stored"]})
    yield from _tier_families(snap)
    yield _counter("flexkv_ops", "transfer ops finished, by op type and outcome", ["op", "status"],
                   _split(c["op_counts"], ops, ["ok", "error"]))
    yield _counter("flexkv_op_bytes", "bytes moved by ops, as workers report them (all TP ranks)", ["op"],
                   {(op,): float(c["op_bytes"].get(op, 0)) for op in ops})
    yield _op_seconds(c["op_seconds"], ops)
    yield from _worker_families(snap)
    yield _counter("flexkv_client_connects", "client connections said hello", [], {(): c["clients"]["connects"]})
    yield _counter("flexkv_client_disconnects", "clients noticed gone", [], {(): c["clients"]["disconnects"]})
    yield _gauge("flexkv_clients", "live client connections, by role", ["role"],
                 {(role,): float(n) for role, n in snap["clients"].items()})
    yield _counter("flexkv_remote_errors", "remote store ops (REMOTE2H, H2REMOTE) that failed", [],
                   {(): c["remote_errors"]})
    yield _counter("flexkv_remote_outages", "times the remote store became unreachable for lookups", [],
                   {(): snap["remote_outages"]})
    yield _counter("flexkv_checksum_failures", "blocks read back whose checksum did not match", ["tier"],
                   {(tier,): float(n) for tier, n in snap["checksum_failures"].items()})
    rates = snap.get("read_rates", {})
    yield _gauge("flexkv_tier_read_bytes_per_second", "each tier's read rate that get_match_info reports (an EWMA of "
                 "completed reads; the configured prior before any)", ["tier"],
                 {(k.removeprefix("read_bps_"),): float(v) for k, v in rates.items() if k.startswith("read_bps_")})
    yield _gauge("flexkv_tasks_in_flight", "tasks in the control plane", [], {(): snap["num_tasks"]})
    yield _gauge("flexkv_ops_in_flight", "ops handed to workers, not yet reported", [],
                 {(): snap["num_ops_in_flight"]})


def _tier_families(snap: dict[str, Any]) -> Iterator[Metric]:
    tiers = snap["tiers"]
    pool: dict[tuple[str, ...], float] = {}
    for tier, t in tiers.items():
        pool[(tier, "used")] = t["used_blocks"]
        pool[(tier, "free")] = t["free_blocks"]
    yield _gauge("flexkv_pool_blocks", "blocks per tier, used and free", ["tier", "state"], pool)
    yield _gauge("flexkv_pool_block_bytes", "bytes of one block (all layers, K and V, all TP shards)", [],
                 {(): snap["block_bytes"]})
    yield _counter("flexkv_evicted_blocks", "blocks evicted, per tier", ["tier"],
                   {(tier,): t["evicted_blocks"] for tier, t in tiers.items()})
    yield _counter("flexkv_get_query_blocks", "whole blocks GET matches asked for", [], {(): snap["get_query_blocks"]})
    yield _counter("flexkv_get_hit_blocks", "blocks GETs loaded, by the tier that held them", ["tier"],
                   {(tier,): t["hit_blocks"] for tier, t in tiers.items()})
    query = snap["get_query_blocks"]
    ratios: dict[tuple[str, ...], float] = {(tier,): (t["hit_blocks"] / query if query else 0.0)
                                            for tier, t in tiers.items()}
    ratios[("any",)] = snap["get_hit_blocks"] / query if query else 0.0
    yield _gauge("flexkv_hit_ratio", "GET blocks found per block asked, since start (tier 'any': cached anywhere)",
                 ["tier"], ratios)


def _op_seconds(hists: dict[str, Any], ops: list[str]) -> Metric:
    fam = HistogramMetricFamily("flexkv_op_duration_seconds", "seconds from dispatch to completion of an op",
                                labels=["op"])
    for op in ops:
        h = hists.get(op)
        counts = h["counts"] if h is not None else [0] * (len(OP_SECONDS_BUCKETS) + 1)
        running, buckets = 0, []
        for bound, n in zip([*OP_SECONDS_BUCKETS, float("inf")], counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        fam.add_metric([op], buckets, sum_value=h["sum"] if h is not None else 0.0)
    return fam


def _worker_families(snap: dict[str, Any]) -> Iterator[Metric]:
    workers, c = snap["workers"], snap["counters"]
    yield _gauge("flexkv_worker_queue_depth", "ops sent to (or queued for) a worker, not yet reported", ["worker"],
                 {(w,): float(i["queue_depth"]) for w, i in workers.items()})
    yield _gauge("flexkv_worker_ready", "1 when the worker said hello and takes ops", ["worker"],
                 {(w,): float(i["ready"]) for w, i in workers.items()})
    busy: dict[tuple[str, ...], float] = {(w,): 0.0 for w in workers}
    busy.update({(w,): float(s) for w, s in c["worker_busy_s"].items()})
    yield _counter("flexkv_worker_busy_seconds", "seconds workers spent running batches (lanes may overlap)",
                   ["worker"], busy)
    ops: dict[tuple[str, ...], float] = {(w,): 0.0 for w in workers}
    ops.update({(w,): float(n) for w, n in c["worker_ops"].items()})
    yield _counter("flexkv_worker_ops", "ops a worker reported done (a batched op of several tasks counts once)",
                   ["worker"], ops)
    restarts: dict[tuple[str, ...], float] = {(w,): 0.0 for w in workers}
    restarts.update({(w,): float(n) for w, n in c["worker_restarts"].items()})
    yield _counter("flexkv_worker_restarts", "times a dead worker was restarted", ["worker"], restarts)

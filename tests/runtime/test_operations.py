"""Operating a server: `flexkv serve` with /metrics and the request trace, `flexkv stats`, a scrape over HTTP.

One scenario through the real command: puts, gets, a cancelled match, a miss, an eviction, a bad query,
a put whose slot mapping is refused at launch, a client that comes and goes, a device worker killed and restarted. Every
counter must move by exactly what the scenario did; the trace must hold one line per task.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.types import FlexKVError, TaskStatus
from tests.redis_server import free_port
from tests.runtime.kvtest import T, block_bytes, host_buffers, poison, slots_for, small_cache, small_model, tokens
from tests.runtime.opstest import Samples, flexkv_command, flexkv_serve, scrape, value

pytestmark = pytest.mark.timeout(180)

MODEL = small_model()
BLOCK = MODEL.block_bytes(T)
SERVE_FLAGS = ["--num-layers", "3", "--num-kv-heads", "4", "--head-size", "8", "--dtype", "float16",
               "--tokens-per-block", str(T), "--num-cpu-blocks", "8"]
_CLIENT = ("import sys; from flexkv.kvmanager import KVManager; from tests.runtime.kvtest import small_model, "
           "small_cache; k = KVManager(small_model(), small_cache(), server_address=sys.argv[1]); k.start(); "
           "print('connected', flush=True)")


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def _put(kvm: KVManager, toks: object, blocks: list[int]) -> None:
    tid = kvm.put_async(toks, slots_for(blocks, len(toks)))  # type: ignore[arg-type]
    res = kvm.wait([tid])[tid]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.sum() == 3 * T, res


def _scenario(kvm: KVManager, bufs: object) -> None:
    """What the counters must show: see test_metrics_count_exactly_what_the_server_did."""
    a, b, c, miss = (tokens(3 * T + 1, seed=s) for s in (1, 2, 3, 4))
    _put(kvm, a, [0, 1, 2, 3])
    bad = slots_for([0, 1, 2, 3], 3 * T + 1) + 1  # no block's slots start at a block boundary
    tid = kvm.put_async(tokens(3 * T + 1, seed=5), bad)  # matched, refused at launch: FAILED at wait
    assert kvm.wait([tid])[tid].status is TaskStatus.FAILED
    poison(bufs, [8, 9, 10, 11])  # type: ignore[arg-type]
    tid = kvm.get_async(a, slots_for([8, 9, 10, 11], len(a)))
    res = kvm.wait([tid])[tid]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.sum() == 3 * T
    for s, d in zip([0, 1, 2], [8, 9, 10], strict=True):
        assert block_bytes(bufs, d) == block_bytes(bufs, s)  # type: ignore[arg-type]
    tid, mask = kvm.get_match(miss)
    assert not mask.any()
    kvm.cancel([tid])
    tid = kvm.get_async(miss, slots_for([12, 13, 14, 15], len(miss)))
    res = kvm.wait([tid])[tid]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and not res.return_mask.any(), res
    _put(kvm, b, [4, 5, 6, 7])
    _put(kvm, c, [0, 1, 2, 3])  # 9 blocks into an 8-block pool: one eviction
    with pytest.raises(FlexKVError, match="unknown query"):
        kvm._query("bogus")


def _settled(port: int, before: Samples, deadline_s: float = 60.0) -> Samples:
    """Scrape until the client that left and the restarted worker show up (both need a server tick)."""
    deadline = time.monotonic() + deadline_s
    while True:
        now = scrape(port)
        if (delta(now, before, "flexkv_client_disconnects_total") >= 1
                and delta(now, before, "flexkv_worker_restarts_total", worker="device-0-0") >= 1
                and value(now, "flexkv_worker_ready", worker="device-0-0") == 1
                and delta(now, before, "flexkv_tasks_total", type="put", status="failed") >= 1):
            return now
        assert time.monotonic() < deadline, "the disconnect / restart never showed in /metrics"
        time.sleep(0.2)


def test_metrics_count_exactly_what_the_server_did(tmp_path: Path) -> None:
    port, address, trace = free_port(), f"ipc://{tmp_path}/server.sock", tmp_path / "trace.jsonl"
    flags = [*SERVE_FLAGS, "--server-address", address, "--metrics-port", str(port), "--trace-path", str(trace)]
    with flexkv_serve(flags) as (_, banner):
        assert f"metrics at http://127.0.0.1:{port}/metrics" in banner
        bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, 16, seed=9)
        kvm = KVManager(MODEL, small_cache(), server_address=address)
        try:
            kvm.start()
            kvm.register_kv_buffers(bufs, bufs.layout)
            kvm.wait_ready()
            worker_pid = int(kvm.stats()["pid:device-0-0"])
            before = scrape(port)
            _scenario(kvm, bufs)
            client = subprocess.run([sys.executable, "-c", _CLIENT, address], capture_output=True, text=True,
                                    timeout=60, cwd=Path(__file__).parents[2], check=True)
            assert client.stdout.strip() == "connected", client.stderr
            os.kill(worker_pid, signal.SIGKILL)
            after = _settled(port, before)
            _check_counters(after, before)
            _check_stats_command(address)
        finally:
            kvm.shutdown()
            bufs.close()
    _check_trace(trace)


def _check_counters(after: Samples, before: Samples) -> None:
    d = lambda name, **labels: delta(after, before, name, **labels)  # noqa: E731
    for kind, n in {"put_async": 4, "get_async": 2, "get_match": 1, "cancel": 1, "wait": 6, "launch": 0,
                    "hello": 1, "register": 0, "query": 0}.items():
        assert d("flexkv_requests_total", type=kind, status="ok") == n, kind
    assert d("flexkv_requests_total", type="query", status="error") == 1
    assert d("flexkv_requests_total", type="get_async", status="error") == 0
    assert d("flexkv_tasks_total", type="put", status="success") == 3
    assert d("flexkv_tasks_total", type="get", status="success") == 2
    assert d("flexkv_tasks_total", type="get", status="cancelled") == 1
    assert d("flexkv_tasks_total", type="get", status="failed") == 0
    assert d("flexkv_tasks_total", type="put", status="failed") == 1
    whole = 3 * T
    assert d("flexkv_query_tokens_total", type="get") == 3 * (whole + 1)
    assert d("flexkv_query_tokens_total", type="put") == 4 * (whole + 1)
    assert d("flexkv_matched_tokens_total") == whole
    assert d("flexkv_loaded_tokens_total") == whole
    assert d("flexkv_stored_tokens_total") == 3 * whole
    assert d("flexkv_ops_total", op="D2H", status="ok") == 3 and d("flexkv_ops_total", op="H2D", status="ok") == 1
    assert d("flexkv_ops_total", op="D2H", status="error") == 0
    assert d("flexkv_op_bytes_total", op="D2H") == 9 * BLOCK and d("flexkv_op_bytes_total", op="H2D") == 3 * BLOCK
    assert d("flexkv_op_duration_seconds_count", op="D2H") == 3
    assert d("flexkv_op_duration_seconds_bucket", op="D2H", le="+Inf") == 3
    assert d("flexkv_op_duration_seconds_count", op="DISK2H") == 0
    assert d("flexkv_get_query_blocks_total") == 9 and d("flexkv_get_hit_blocks_total", tier="cpu") == 3
    assert value(after, "flexkv_hit_ratio", tier="cpu") == pytest.approx(3 / 9)
    assert value(after, "flexkv_pool_blocks", tier="cpu", state="used") == 8
    assert value(after, "flexkv_pool_blocks", tier="cpu", state="free") == 0
    assert value(after, "flexkv_pool_block_bytes") == BLOCK
    assert d("flexkv_evicted_blocks_total", tier="cpu") == 1
    assert d("flexkv_client_connects_total") == 1 and d("flexkv_client_disconnects_total") == 1
    assert value(after, "flexkv_clients", role="manager") == 1 and value(after, "flexkv_clients", role="tp") == 1
    assert d("flexkv_worker_restarts_total", worker="device-0-0") == 1
    assert value(after, "flexkv_worker_queue_depth", worker="device-0-0") == 0
    assert d("flexkv_worker_busy_seconds_total", worker="device-0-0") > 0
    assert d("flexkv_remote_errors_total") == 0
    assert d("flexkv_checksum_failures_total", tier="ssd") == 0
    assert value(after, "flexkv_tasks_in_flight") == 0 and value(after, "flexkv_ops_in_flight") == 0
    assert value(after, "flexkv_up") == 1


def _check_stats_command(address: str) -> None:
    out = subprocess.run([*flexkv_command(), "stats", "--address", address], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["cpu"][1:4] == ["8", "0", "100.0%"], out  # used, free, use
    assert rows["cpu"][5:8] == ["1", "3", "33.3%"], out  # evicted, GET hits, hit rate
    assert rows["device-0-0"][2:5] == ["yes", "0", "1"], out  # ready, queue, restarts
    assert "tokens: matched 12, loaded 12, stored 36" in out
    snap = json.loads(subprocess.run([*flexkv_command(), "stats", "--address", address, "--json"],
                                     capture_output=True, text=True, timeout=30, check=True).stdout)
    assert snap["tiers"]["cpu"]["used_blocks"] == 8 and snap["workers"]["device-0-0"]["restarts"] == 1


def _check_trace(path: Path) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = sorted((r["type"], r["status"]) for r in lines)
    assert kinds == sorted([("put", "SUCCESS")] * 3 + [("get", "SUCCESS")] * 2 + [("get", "CANCELLED"),
                                                                                    ("put", "FAILED")])
    hit = next(r for r in lines if r["type"] == "get" and r["matched_tokens"] == 3 * T) if lines else None
    assert hit is not None and [op["op"] for op in hit["ops"]] == ["H2D"]
    op = hit["ops"][0]
    assert op["blocks"] == 3 and op["bytes"] == 3 * BLOCK and op["error"] == "" and op["seconds"] >= op["queue_s"] >= 0
    assert hit["match_s"] >= 0 and hit["engine_s"] >= 0 and hit["total_s"] >= hit["engine_s"]
    assert hit["wait_s"] is None or hit["wait_s"] >= 0
    puts = [r for r in lines if r["type"] == "put" and r["status"] == "SUCCESS"]
    assert len(puts) == 3
    assert all([o["op"] for o in r["ops"]] == ["D2H"] and r["ops"][0]["bytes"] == 3 * BLOCK for r in puts)


def test_the_metrics_port_is_off_by_default_and_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    with flexkv_serve([*SERVE_FLAGS, "--server-address", address]) as (_, banner):
        assert "metrics at" not in banner
    port = free_port()
    with flexkv_serve([*SERVE_FLAGS, "--server-address", address, "--metrics-port", str(port)]):
        taken = subprocess.run([*flexkv_command(), "serve", *SERVE_FLAGS, "--server-address",
                                f"ipc://{tmp_path}/other.sock", "--metrics-port", str(port)],
                               capture_output=True, text=True, timeout=60, check=False)
    assert taken.returncode == 2
    assert f"metrics_port: cannot listen on 127.0.0.1:{port}" in taken.stderr, taken.stderr


def test_flexkv_stats_names_an_address_that_does_not_answer(tmp_path: Path) -> None:
    res = subprocess.run([*flexkv_command(), "stats", "--address", f"ipc://{tmp_path}/none.sock", "--timeout", "0.5"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1 and "did not answer within 0.5 s" in res.stderr, res.stderr


DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel["targets"]]


def test_every_dashboard_expression_names_metrics_and_labels_the_server_exports(tmp_path: Path) -> None:
    port, address = free_port(), f"ipc://{tmp_path}/s.sock"
    with flexkv_serve([*SERVE_FLAGS, "--server-address", address, "--metrics-port", str(port)]):
        bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, 4, seed=1)
        kvm = KVManager(MODEL, small_cache(), server_address=address)
        try:
            kvm.start()
            kvm.register_kv_buffers(bufs, bufs.layout)  # a worker, so per-worker series exist
            kvm.wait_ready()
            samples = scrape(port)
        finally:
            kvm.shutdown()
            bufs.close()
    labels: dict[str, set[str]] = {}
    for name, label_set in samples:
        labels.setdefault(name, set()).update(k for k, _ in label_set)
    exprs = _dashboard_exprs()
    assert len(exprs) >= 16
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\bflexkv_[a-z0-9_]+", expr))
        assert names, f"{expr!r} names no flexkv metric"
        missing = names - set(labels)
        assert not missing, f"{expr!r} uses {sorted(missing)}, which the server does not export"
        keys = {k.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for k in group.split(",")}
        keys |= set(re.findall(r"[{,]\s*([a-z_]+)\s*=", expr))
        known = set().union(*(labels[n] for n in names))
        assert keys <= known, f"{expr!r} uses labels {sorted(keys - known)} its metrics lack"
        used |= names
    base = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in labels}
    assert {n for n in base if n.startswith("flexkv_")} - {n.removesuffix("_bucket").removesuffix("_sum")
                                                            .removesuffix("_count") for n in used} == set(), (
        "every exported metric has a panel")


def test_flexkv_metrics_port_from_the_environment_and_in_library_mode(tmp_path: Path) -> None:
    port = free_port()
    env_before = os.environ.get("FLEXKV_METRICS_PORT")
    os.environ["FLEXKV_METRICS_PORT"] = str(port)
    try:
        with flexkv_serve([*SERVE_FLAGS, "--server-address", f"ipc://{tmp_path}/s.sock"]) as (_, banner):
            assert f"metrics at http://127.0.0.1:{port}/metrics" in banner
            assert value(scrape(port), "flexkv_up") == 1
    finally:
        if env_before is None:
            del os.environ["FLEXKV_METRICS_PORT"]
        else:
            os.environ["FLEXKV_METRICS_PORT"] = env_before
    port = free_port()
    kvm = KVManager(MODEL, small_cache(metrics_port=port))  # library mode: the config travels to the server
    try:
        kvm.start()
        samples = scrape(port)
        assert value(samples, "flexkv_client_connects_total") == 1
        assert value(samples, "flexkv_pool_blocks", tier="cpu", state="free") == 64
    finally:
        kvm.shutdown()

"""Show a running server's pool use per tier, hit rates, tasks, clients and workers (with restarts).

    flexkv stats --address ipc:///tmp/flexkv-abc/server.sock
    flexkv stats --address tcp://127.0.0.1:5555 --json      # the whole snapshot, for scripts

Read-only: a "monitor" session (which may only query) and one ``snapshot`` query.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from flexkv.protocol import client_msgs as cm
from flexkv.transport import ServerConnection
from flexkv.types import FlexKVError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("FLEXKV_SERVER_ADDRESS"),
                   help="the server's ZeroMQ address, as `flexkv serve` printed it (default $FLEXKV_SERVER_ADDRESS)")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON instead of tables")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server (default 5)")


def fetch_snapshot(address: str, timeout_s: float) -> dict[str, Any]:
    conn = ServerConnection(address, client_id=0, role="monitor", timeout_s=timeout_s)
    try:
        conn.hello(timeout_s)
        reply, _ = conn.request(lambda rid: cm.QueryMsg(client_id=0, req_id=rid, what="snapshot"))
    finally:
        conn.close()
    assert isinstance(reply, cm.OkReplyMsg)
    snap: dict[str, Any] = json.loads(str(reply.info["json"]))
    return snap


def run(args: argparse.Namespace) -> int:
    if not args.address:
        print("flexkv stats: --address is required (or set FLEXKV_SERVER_ADDRESS)", file=sys.stderr)
        return 2
    try:
        snap = fetch_snapshot(args.address, args.timeout)
    except FlexKVError as e:
        print(f"flexkv stats: {e}", file=sys.stderr)
        return 1
    print(json.dumps(snap, indent=2, sort_keys=True) if args.json else render(snap, args.address))
    return 0


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*r) for r in rows)]


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def render(snap: dict[str, Any], address: str) -> str:
    """The snapshot as readable tables."""
    c = snap["counters"]
    block_mib = snap["block_bytes"] / 2**20
    out = [f"flexkv server at {address}  (blocks of {snap['tokens_per_block']} tokens, {block_mib:.2f} MiB)", ""]
    query = snap["get_query_blocks"]
    rows = []
    for tier, t in snap["tiers"].items():
        total = t["used_blocks"] + t["free_blocks"]
        rows.append([tier, str(t["used_blocks"]), str(t["free_blocks"]), _pct(t["used_blocks"], total),
                     f"{t['used_blocks'] * snap['block_bytes'] / 2**30:.2f}", str(t["evicted_blocks"]),
                     str(t["hit_blocks"]), _pct(t["hit_blocks"], query)])
    out += _table(["tier", "used", "free", "use", "used GiB", "evicted", "GET hits", "hit rate"], rows)
    out.append(f"GET blocks asked {query}, cached anywhere {snap['get_hit_blocks']} "
               f"({_pct(snap['get_hit_blocks'], query)})")
    tok = c["tokens"]
    out.append(f"tokens: matched {tok['matched']}, loaded {tok['loaded']}, stored {tok['stored']}")
    out += ["", f"tasks in flight {snap['num_tasks']}, ops in flight {snap['num_ops_in_flight']}"]
    finished: dict[str, dict[str, int]] = {}
    for key, n in c["tasks"].items():
        kind, _, status = key.partition("|")
        finished.setdefault(kind, {})[status] = n
    statuses = ["success", "failed", "cancelled", "notfound"]
    out += _table(["finished", *statuses], [[k, *(str(v.get(s, 0)) for s in statuses)]
                                           for k, v in sorted(finished.items())])
    clients = ", ".join(f"{role} {n}" for role, n in sorted(snap["clients"].items())) or "none"
    out += ["", f"clients: {clients} (connects {c['clients']['connects']}, disconnects "
                f"{c['clients']['disconnects']})", ""]
    rows = [[w, str(i["pid"]), "yes" if i["ready"] else "no", str(i["queue_depth"]),
             str(c["worker_restarts"].get(w, i["restarts"])), f"{c['worker_busy_s'].get(w, 0.0):.2f}"]
            for w, i in sorted(snap["workers"].items())]
    out += _table(["worker", "pid", "ready", "queue", "restarts", "busy s"], rows) if rows else ["workers: none"]
    failures = snap["checksum_failures"]
    out += ["", f"remote errors {c['remote_errors']}, remote outages {snap['remote_outages']}, checksum failures "
                f"ssd {failures['ssd']} remote {failures['remote']}"]
    return "\n".join(out)

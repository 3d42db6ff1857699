"""Run a flexkv server in the foreground until Ctrl-C (SIGINT) or SIGTERM.

    flexkv serve                                    # embedded defaults: Llama-3-8B shape, 512 MiB CPU pool
    flexkv serve --cpu-cache-gb 16 --enable-ssd --ssd-cache-dir "/nvme0/flexkv;/nvme1/flexkv" \\
        --ssd-cache-gb 500 --tp-size 2 --server-address tcp://127.0.0.1:5555 --metrics-port 9400
    flexkv serve --config flexkv.yaml               # the user config (see docs/config.md)

Engines connect with ``KVManager(model, cache, server_address=...)`` (one per DP rank) and register
their KV buffers with ``KVTPClient(server_address, dp_client_id, tp_rank, device_id).register(...)``.
``examples/run_server.py`` runs this same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from flexkv.common.config import GIB, CacheConfig, ModelConfig, RemoteConfig, cache_config_from_user, read_user_config
from flexkv.types import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (the engine's KV shape)")
    m.add_argument("--num-layers", type=int, default=32)
    m.add_argument("--num-kv-heads", type=int, default=8)
    m.add_argument("--head-size", type=int, default=128)
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--use-mla", action="store_true")
    m.add_argument("--tp-size", type=int, default=1)
    m.add_argument("--dp-size", type=int, default=1)
    c = p.add_argument_group("cache")
    c.add_argument("--config", help="user config file (YAML/JSON, sizes in GiB); same as FLEXKV_CONFIG_PATH")
    c.add_argument("--tokens-per-block", type=int, default=16)
    c.add_argument("--num-cpu-blocks", type=int, default=None, help="CPU pool size in blocks (default 256)")
    c.add_argument("--cpu-cache-gb", type=float, default=None, help="CPU pool size in GiB")
    c.add_argument("--enable-ssd", action="store_true")
    c.add_argument("--ssd-cache-dir", default="", help="';'-separated directories, one per drive")
    c.add_argument("--ssd-cache-gb", type=float, default=None)
    c.add_argument("--num-ssd-blocks", type=int, default=None)
    c.add_argument("--ssd-clean", action="store_true", help="delete flexkv's SSD cache files before starting")
    c.add_argument("--enable-remote", action="store_true")
    c.add_argument("--remote-host", default="127.0.0.1")
    c.add_argument("--remote-port", type=int, default=6379)
    o = p.add_argument_group("operations (docs/operations.md)")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (config key metrics_port, FLEXKV_METRICS_PORT; "
                        "default off)")
    o.add_argument("--metrics-address", default=None, help="address /metrics binds to (default 127.0.0.1)")
    o.add_argument("--trace-path", default=None,
                   help="write one JSON line per finished task to this file (config key trace_path; default off)")
    p.add_argument("--server-address", default=None,
                   help="ZeroMQ address to listen on, e.g. tcp://127.0.0.1:5555 (default: an ipc socket in a "
                        "private temp dir, printed at start)")


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, CacheConfig]:
    """The configs the flags, the user config (file or FLEXKV_* variables) and the defaults give."""
    model = ModelConfig(args.num_layers, args.num_kv_heads, args.head_size, args.dtype, args.use_mla,
                        args.tp_size, args.dp_size)
    env = dict(os.environ)
    if args.config:
        env["FLEXKV_CONFIG_PATH"] = args.config
    values, _ = read_user_config(env)
    values.setdefault("tokens_per_block", args.tokens_per_block)
    if args.cpu_cache_gb is not None:
        values["cpu_cache_gb"] = args.cpu_cache_gb
    if args.enable_ssd:
        values["ssd_cache_dir"] = args.ssd_cache_dir or values.get("ssd_cache_dir", "")
        values.setdefault("ssd_cache_gb", args.ssd_cache_gb if args.ssd_cache_gb is not None else 4.0)
    for flag in ("metrics_port", "metrics_address", "trace_path"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    cache = cache_config_from_user(model, values)
    updates: dict[str, Any] = {}
    if args.num_cpu_blocks is not None:
        updates["num_cpu_blocks"] = args.num_cpu_blocks
    elif "cpu_cache_gb" not in values:
        updates["num_cpu_blocks"] = 256
    if args.enable_ssd and args.num_ssd_blocks is not None:
        updates["num_ssd_blocks"] = args.num_ssd_blocks
    if args.enable_remote:
        updates["enable_remote"] = True
        updates["remote"] = RemoteConfig(host=args.remote_host, port=args.remote_port)
    if updates:
        cache = dataclasses.replace(cache, **updates)
    return model, cache


def run(args: argparse.Namespace, prog: str = "flexkv serve") -> int:
    from flexkv.scheduler.main import setup_logging
    from flexkv.scheduler.server import SchedulerServer

    setup_logging()
    try:
        model, cache = build_configs(args)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    if args.ssd_clean and cache.enable_ssd:
        from flexkv.workers.ssd_store import SSDStore

        SSDStore.remove_files(list(cache.ssd_cache_dir))
        print(f"removed flexkv SSD cache files in {';'.join(cache.ssd_cache_dir)}", flush=True)
    try:
        server = SchedulerServer(model, cache, client_address=args.server_address)
    except (ConfigError, OSError) as e:
        print(f"{prog}: cannot start: {e}", file=sys.stderr)
        return 2
    server.install_signal_handlers()
    metrics = (f"; metrics at http://{server.metrics.address}:{server.metrics.port}/metrics"
               if server.metrics is not None else "")
    print(f"flexkv server listening on {server.client_address}  (CPU pool {cache.num_cpu_blocks} blocks, "
          f"{cache.num_cpu_blocks * model.block_bytes(cache.tokens_per_block) / GIB:.2f} GiB{metrics})"
          "  -- Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    print("flexkv server stopped cleanly", flush=True)
    return 0

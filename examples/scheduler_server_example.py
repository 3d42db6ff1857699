#!/usr/bin/env python3
"""End-to-end example: a server, one process per TP rank holding KV buffers, puts, gets, byte checks.

    python examples/scheduler_server_example.py                 # starts its own server (library mode)
    python examples/scheduler_server_example.py --tp-size 2 --layout sglang
    python examples/scheduler_server_example.py --server-address tcp://127.0.0.1:5555   # a running server

Each TP rank process allocates KV buffers (CUDA tensors when a GPU is present, host shared memory
otherwise), fills them with known data and registers them. The main process then stores a set of
prompts (puts), restores them into other GPU blocks (gets, waited both blocking and with try_wait),
and each rank verifies every restored byte. Exits 0 only if everything matched.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from typing import Any

import numpy as np

from flexkv.client import KVTPClient, allocate_host_kv_buffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.types import TaskStatus


def rank_layout(model: ModelConfig, kind: LayoutKind, num_blocks: int, tpb: int) -> KVCacheLayout:
    heads = 1 if model.use_mla else model.num_kv_heads // model.tp_size
    return KVCacheLayout(kind=kind, num_layers=model.num_layers, num_blocks=num_blocks, tokens_per_block=tpb,
                         num_heads=heads, head_size=model.head_size, itemsize=model.itemsize)


class RankBuffers:
    """One rank's KV tensors (torch CUDA tensors, or numpy arrays in host shared memory)."""

    def __init__(self, layout: KVCacheLayout, model: ModelConfig, use_cuda: bool, device_id: int) -> None:
        self.layout = layout
        self.host = None
        if use_cuda:
            import torch

            dtype = getattr(torch, model.dtype.value)  # type: ignore[union-attr]
            self.tensors: list[Any] = [torch.empty(layout.tensor_shape(i), dtype=dtype, device=f"cuda:{device_id}")
                                       for i in range(layout.num_tensors)]
        else:
            self.host = allocate_host_kv_buffers(layout, model.dtype, tag="example")
            self.tensors = self.host.arrays

    def chunk(self, i: int, offset: int, nbytes: int) -> bytes:
        """Bytes [offset, offset + nbytes) of tensor i (sliced on the GPU first: only the chunk moves)."""
        t = self.tensors[i]
        if self.host is not None:
            return t.reshape(-1).view(np.uint8)[offset: offset + nbytes].tobytes()
        import torch

        return bytes(t.view(torch.uint8).reshape(-1)[offset: offset + nbytes].cpu().numpy())

    def fill(self, seed: int) -> None:
        for i, t in enumerate(self.tensors):
            data = np.random.default_rng(seed + i).integers(0, 256, self.layout.tensor_bytes(i), dtype=np.uint8)
            if self.host is not None:
                t.reshape(-1).view(np.uint8)[:] = data
            else:
                import torch

                t.view(torch.uint8).reshape(-1).copy_(torch.from_numpy(data))

    def block(self, block_id: int) -> bytes:
        lay, parts = self.layout, []
        for layer in range(lay.num_layers):
            for kv in range(lay.kv_dim):
                t, off = lay.chunk_offset(layer, kv, block_id)
                parts.append(self.chunk(t, off, lay.chunk_bytes))
        return b"".join(parts)


def rank_main(address: str, model: ModelConfig, kind: str, num_blocks: int, tpb: int, rank: int,
              use_cuda: bool, conn: Any) -> None:
    """One TP rank: allocate, fill, register; then answer byte-check requests until told to stop."""
    device_id = rank
    if use_cuda:
        import torch

        device_id = rank % torch.cuda.device_count()  # fewer GPUs than ranks: ranks share a GPU
    bufs = RankBuffers(rank_layout(model, LayoutKind(kind), num_blocks, tpb), model, use_cuda, device_id)
    bufs.fill(seed=1000 if model.use_mla else 1000 * (rank + 1))  # MLA: every rank holds the same latent
    client = KVTPClient(address, dp_client_id=0, tp_rank=rank, device_id=device_id)
    client.register(bufs.tensors, bufs.layout)
    conn.send("registered")
    while True:
        req = conn.recv()
        if req == "stop":
            break
        src, dst = req
        if use_cuda:
            import torch

            torch.cuda.synchronize()
        conn.send(sum(bufs.block(s) != bufs.block(d) for s, d in zip(src, dst, strict=True)))
    client.close()
    if bufs.host is not None:
        bufs.host.close()


def main() -> int:
    p = argparse.ArgumentParser(description="flexkv end-to-end example")
    p.add_argument("--server-address", default=None)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--layout", default="vllm_kv_first",
                   choices=[k.value for k in LayoutKind if k is not LayoutKind.BLOCK_FIRST])
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--num-layers", type=int, default=8, help="model layers (32 = Llama-3-8B shape)")
    p.add_argument("--cpu", action="store_true", help="use host buffers even when a GPU is present")
    args = p.parse_args()

    use_cuda = False
    if not args.cpu:
        try:
            import torch

            use_cuda = torch.cuda.is_available()
        except ImportError:
            pass
    use_mla = args.layout == "mla"
    # A server holds one block format: the packed vLLM layouts (K|V in the last dim) need theirs.
    model = ModelConfig(num_layers=args.num_layers, num_kv_heads=1 if use_mla else 8, head_size=128, dtype="bfloat16",
                        use_mla=use_mla, tp_size=args.tp_size, block_format=LayoutKind(args.layout).block_format)
    tpb = 16
    blocks_per_prompt = -(-args.prompt_tokens // tpb)
    num_blocks = 2 * args.num_prompts * blocks_per_prompt
    cache = CacheConfig(tokens_per_block=tpb, num_cpu_blocks=args.num_prompts * blocks_per_prompt + 16)
    kvm = KVManager(model, cache, server_address=args.server_address)
    kvm.start()
    ctx = mp.get_context("spawn")
    ranks = []
    for rank in range(args.tp_size):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=rank_main, args=(kvm.server_address, model, args.layout, num_blocks, tpb, rank,
                                                   use_cuda, child))
        proc.start()
        ranks.append((proc, parent))
    ok = True
    try:
        for _, conn in ranks:
            if not conn.poll(120) or conn.recv() != "registered":
                raise RuntimeError("a TP rank did not register")
        kvm.wait_ready(60)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 50_000, args.prompt_tokens, dtype=np.int64) for _ in range(args.num_prompts)]
        whole = args.prompt_tokens // tpb
        rows = []
        t0 = time.perf_counter()
        puts = []
        for i, toks in enumerate(prompts):
            blocks = np.arange(i * blocks_per_prompt, (i + 1) * blocks_per_prompt)
            slots = (blocks[np.arange(len(toks)) // tpb] * tpb + np.arange(len(toks)) % tpb).astype(np.int64)
            puts.append(kvm.put_async(toks, slots))
        put_res = kvm.wait(puts, timeout=60)
        t_put = time.perf_counter() - t0
        gets, pairs = [], []
        t0 = time.perf_counter()
        for i, toks in enumerate(prompts):
            src = np.arange(i * blocks_per_prompt, i * blocks_per_prompt + whole)
            dst = src + args.num_prompts * blocks_per_prompt
            full_dst = np.arange(dst[0], dst[0] + blocks_per_prompt)
            slots = (full_dst[np.arange(len(toks)) // tpb] * tpb + np.arange(len(toks)) % tpb).astype(np.int64)
            gets.append(kvm.get_async(toks, slots))
            pairs.append((src.tolist(), dst.tolist()))
        polled = kvm.try_wait(gets)
        get_res = kvm.wait(gets, timeout=60)
        t_get = time.perf_counter() - t0
        for i, (put_id, get_id) in enumerate(zip(puts, gets, strict=True)):
            mismatched = 0
            for _, conn in ranks:
                conn.send(pairs[i])
                mismatched += conn.recv()
            pr, gr = put_res[put_id], get_res[get_id]
            good = pr.status is TaskStatus.SUCCESS and gr.status is TaskStatus.SUCCESS and mismatched == 0
            ok &= good
            loaded = int(gr.return_mask.sum()) if gr.return_mask is not None else 0
            rows.append((i, pr.status.name, gr.status.name, polled[get_id].status.name, loaded, mismatched))
        print(f"{'prompt':>6} {'put':>8} {'get':>8} {'try_wait':>9} {'tokens':>7} {'bad blocks':>10}")
        for r in rows:
            print(f"{r[0]:>6} {r[1]:>8} {r[2]:>8} {r[3]:>9} {r[4]:>7} {r[5]:>10}")
        moved = args.num_prompts * whole * model.block_bytes(tpb)
        print(f"device={'cuda' if use_cuda else 'host'} tp={args.tp_size} layout={args.layout}: "
              f"put {moved / t_put / 1e9:.2f} GB/s, get {moved / t_get / 1e9:.2f} GB/s (incl. control plane)")
        print("ALL BYTES MATCH" if ok else "MISMATCH")
    finally:
        for proc, conn in ranks:
            try:
                conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            proc.join(30)
        kvm.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

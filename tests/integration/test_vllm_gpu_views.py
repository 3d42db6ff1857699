"""vLLM's packed layer views in CUDA memory through the whole stack (no vLLM needed: the views are
built the way vLLM >= 0.26 builds them, one ``as_strided`` over one buffer). Skipped with the reason
where there is no CUDA device; run on the GPU machine by ``benchmarks/gpu_e2e_check.sh stack``.

Put three vLLM blocks (LBHNC and LBNHC, the latter with flexkv blocks half of vLLM's), poison them,
get them back through the server's GPU worker (CUDA IPC): every byte is back where it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.integration.vllm.kv_views import engine_tensors
from flexkv.kvmanager import KVManager
from flexkv.native import cudacopy
from flexkv.types import TaskStatus

CUDA_OK, WHY = cudacopy.cuda_available()
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA here: {WHY}")]
LAYERS, HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 3, 4, 64, 32, 16


def vllm_views(layout: str) -> dict[str, Any]:
    import torch

    page = HEADS * BLOCK * 2 * HEAD_DIM
    raw = torch.randint(-1000, 1000, (LAYERS * NUM_BLOCKS * page,), dtype=torch.int16, device="cuda:0")
    buf = raw.view(torch.bfloat16)
    views = {}
    for i in range(LAYERS):
        flat = buf[i * NUM_BLOCKS * page:(i + 1) * NUM_BLOCKS * page]
        views[f"layer.{i}"] = (flat.view(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM) if layout == "LBHNC"
                               else flat.view(NUM_BLOCKS, BLOCK, HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3))
    return views


@pytest.mark.parametrize("layout,tokens_per_block", [("LBHNC", BLOCK), ("LBNHC", BLOCK // 2)])
def test_packed_cuda_views_round_trip_byte_exact(layout: str, tokens_per_block: int) -> None:
    import torch

    views = vllm_views(layout)
    tensors, lay = engine_tensors(views, use_mla=False, tokens_per_block=tokens_per_block)
    model = ModelConfig(LAYERS, HEADS, HEAD_DIM, "bfloat16", block_format=lay.kind.block_format)
    with KVManager(model, CacheConfig(tokens_per_block=tokens_per_block, num_cpu_blocks=64)) as kvm:
        kvm.register_kv_buffers(tensors, lay, device_id=0)
        kvm.wait_ready(60)
        blocks = [5, 2, 11]
        tokens = np.arange(3 * BLOCK, dtype=np.int64) + 7
        pos = np.arange(len(tokens), dtype=np.int64)  # token i -> vLLM slot blocks[i // BLOCK]*BLOCK + i % BLOCK
        slots = np.asarray(blocks, dtype=np.int64)[pos // BLOCK] * BLOCK + pos % BLOCK
        want = [v[blocks].clone() for v in views.values()]
        torch.cuda.synchronize()
        put = kvm.put_async(tokens, slots)
        assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
        for v in views.values():
            v[blocks] = 0
        torch.cuda.synchronize()
        get = kvm.get_async(tokens, slots)
        res = kvm.wait(get, timeout=30)[get]
        assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
        torch.cuda.synchronize()
        for v, w in zip(views.values(), want, strict=True):
            assert torch.equal(v[blocks].view(torch.int16), w.view(torch.int16))
        kvm.check_invariants()

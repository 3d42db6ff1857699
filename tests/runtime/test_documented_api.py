"""FlexKV's documented usage text (issue 11 §2), run as a user copies it.

The text is kept verbatim below and executed; the only edits are the two a machine needs: a pool
small enough for this machine's /dev/shm, and a registration of KV buffers (host buffers here) so
the put and get move real bytes, which are then compared block by block.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.types import ConfigError, DType, FlexKVError, TaskStatus
from tests.runtime.kvtest import block_bytes, poison

pytestmark = pytest.mark.timeout(120)

DOCUMENTED = textwrap.dedent("""\
    from flexkv.kvmanager import KVManager
    from flexkv.common.config import ModelConfig, CacheConfig
    import torch
    model_config = ModelConfig(num_layers=32, num_kv_heads=32, head_size=128, dtype=torch.float16)
    cache_config = CacheConfig(tokens_per_block=16, enable_cpu=True, num_cpu_blocks=10000,
                               enable_ssd=False, enable_remote=False)
    kv_manager = KVManager(model_config, cache_config)
    kv_manager.start()
    task_id = kv_manager.get_async(token_ids, slot_mapping)
    kv_manager.launch([task_id], [slot_mapping])
    response = kv_manager.wait([task_id])
    task_id = kv_manager.put_async(token_ids, slot_mapping)
    kv_manager.launch([task_id], [slot_mapping])
    response = kv_manager.wait([task_id])
    """)
T = 16
NUM_BLOCKS = 4  # whole blocks of the request
ENGINE_BLOCKS = 2 * NUM_BLOCKS  # source blocks, then destination blocks of the read-back
REGISTER = ("from flexkv.client import allocate_host_kv_buffers\n"
            "from flexkv.layout import KVCacheLayout, LayoutKind\n"
            "layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, num_layers=32, num_blocks=ENGINE_BLOCKS, "
            "tokens_per_block=16, num_heads=32, head_size=128, itemsize=2)\n"
            "bufs = allocate_host_kv_buffers(layout, model_config.dtype, tag='doc')\n"
            "kv_manager.register_kv_buffers(bufs, bufs.layout)\n")


def _edited(num_cpu_blocks: int, register: bool) -> str:
    text = DOCUMENTED.replace("num_cpu_blocks=10000", f"num_cpu_blocks={num_cpu_blocks}")
    assert text != DOCUMENTED
    if register:
        text = text.replace("kv_manager.start()\n", "kv_manager.start()\n" + REGISTER)
    return text


def _inputs() -> dict[str, object]:
    token_ids = torch.from_numpy(np.random.default_rng(11).integers(0, 32000, NUM_BLOCKS * T, dtype=np.int64))
    slot_mapping = torch.arange(NUM_BLOCKS * T, dtype=torch.int64)  # engine blocks 0..3
    return {"token_ids": token_ids, "slot_mapping": slot_mapping, "ENGINE_BLOCKS": ENGINE_BLOCKS}


def test_the_documented_text_stores_and_loads_real_bytes() -> None:
    scope = _inputs()
    try:
        exec(compile(_edited(num_cpu_blocks=8, register=True), "<documented>", "exec"), scope)
        kvm, bufs = scope["kv_manager"], scope["bufs"]
        assert isinstance(kvm, KVManager)
        put = next(iter(scope["response"].values()))  # type: ignore[attr-defined]
        assert put.status is TaskStatus.SUCCESS, put
        assert put.return_mask is not None and int(put.return_mask.sum()) == NUM_BLOCKS * T
        rng = np.random.default_rng(5)
        for a in bufs.arrays:  # type: ignore[attr-defined]
            raw = a.reshape(-1).view(np.uint8)
            raw[:] = rng.integers(0, 256, raw.size, dtype=np.uint8)
        # The documented put already ran on zeros; store the random bytes under new tokens and load them back.
        toks = scope["token_ids"] + 1  # type: ignore[operator]
        src = torch.arange(NUM_BLOCKS * T, dtype=torch.int64)
        res = kvm.wait([tid := kvm.put_async(toks, src)])[tid]
        assert res.status is TaskStatus.SUCCESS, res
        dst_blocks = list(range(NUM_BLOCKS, 2 * NUM_BLOCKS))
        poison(bufs, dst_blocks)  # type: ignore[arg-type]
        res = kvm.wait([tid := kvm.get_async(toks, src + NUM_BLOCKS * T)])[tid]
        assert res.status is TaskStatus.SUCCESS, res
        assert res.return_mask is not None and bool(res.return_mask.all())
        for s, d in zip(range(NUM_BLOCKS), dst_blocks, strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, s), f"block {s} -> {d} differs"  # type: ignore[arg-type]
        kvm.check_invariants()
    finally:
        if "kv_manager" in scope:
            scope["kv_manager"].shutdown()  # type: ignore[attr-defined]
        if "bufs" in scope:
            scope["bufs"].close()  # type: ignore[attr-defined]


def test_without_registered_buffers_the_put_fails_saying_how_to_register() -> None:
    scope = _inputs()
    try:
        exec(compile(_edited(num_cpu_blocks=8, register=False), "<documented>", "exec"), scope)
        put = next(iter(scope["response"].values()))  # type: ignore[attr-defined]
        assert put.status is TaskStatus.FAILED, put
        assert "no worker for D2H: device-0-0 not registered" in put.error
        assert "register_kv_buffers" in put.error and "KVTPClient" in put.error, put.error
        scope["kv_manager"].check_invariants()  # type: ignore[attr-defined]
    finally:
        if "kv_manager" in scope:
            scope["kv_manager"].shutdown()  # type: ignore[attr-defined]


def test_a_pool_too_big_for_dev_shm_names_both_size_keys() -> None:
    model = ModelConfig(num_layers=32, num_kv_heads=32, head_size=128, dtype=torch.float16)
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    num_blocks = max(10000, free // model.block_bytes(16) + 16)  # 80 GiB, or more than this machine has
    kvm = KVManager(model, CacheConfig(tokens_per_block=16, num_cpu_blocks=num_blocks))
    with pytest.raises(FlexKVError) as info:
        kvm.start()
    msg = str(info.value)
    assert "/dev/shm has" in msg and "num_cpu_blocks" in msg and "cpu_cache_gb" in msg, msg


@pytest.mark.parametrize(("dtype", "want"), [
    (torch.float16, DType.FLOAT16), (torch.bfloat16, DType.BFLOAT16), (torch.float32, DType.FLOAT32),
    (torch.float8_e4m3fn, DType.FLOAT8_E4M3FN), (torch.float8_e5m2, DType.FLOAT8_E5M2), (torch.uint8, DType.UINT8),
    ("float16", DType.FLOAT16), ("bf16", DType.BFLOAT16),
])
def test_model_config_accepts_torch_dtypes_and_names(dtype: object, want: DType) -> None:
    model = ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype=dtype)  # type: ignore[arg-type]
    assert model.dtype is want
    assert model.itemsize == torch.empty(0, dtype=getattr(torch, want.value)).element_size()


def test_model_config_rejects_a_torch_dtype_it_cannot_store() -> None:
    with pytest.raises(ConfigError, match=r"dtype: unsupported torch\.int32"):
        ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.int32)  # type: ignore[arg-type]

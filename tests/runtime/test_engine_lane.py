"""Engine-side lane (DESIGN §7b): KV memory private to the engine process (torch CPU tensors, not in
shared memory) is served by the rank's device worker running as a thread of that process."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from flexkv.client import KVTPClient
from flexkv.kvmanager import KVManager
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.types import InvalidRequest, TaskStatus
from tests.runtime.kvtest import T, block_bytes, poison, rank_layout, slots_for, small_cache, small_model, tokens

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(120)
CTX = mp.get_context("spawn")


@dataclasses.dataclass
class PrivateKV:
    """Private host memory of one rank (torch CPU tensors or numpy arrays) with numpy views of it (for byte checks)."""

    layout: KVCacheLayout
    tensors: list[Any]
    arrays: list[np.ndarray]


def numpy_kv(model: Any, kind: LayoutKind, num_blocks: int, seed: int) -> PrivateKV:
    """Private numpy arrays (plain heap memory); ``tensors`` are the arrays themselves."""
    lay = rank_layout(model, kind, num_blocks)
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 2**16, lay.tensor_shape(i), dtype=np.uint16) for i in range(lay.num_tensors)]
    return PrivateKV(lay, list(arrays), arrays)


def torch_kv(model: Any, kind: LayoutKind, num_blocks: int, seed: int) -> PrivateKV:
    lay = rank_layout(model, kind, num_blocks)
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(-2**15, 2**15, lay.tensor_shape(i), dtype=torch.int16, generator=gen).view(torch.float16)
               for i in range(lay.num_tensors)]
    return PrivateKV(lay, tensors, [t.numpy() for t in tensors])


def _round_trip(kvm: KVManager, kv: PrivateKV | Any, seed: int, src: list[int], dst: list[int]) -> None:
    """Put engine blocks ``src``, poison ``dst``, get into ``dst``: byte-exact, invariants hold."""
    toks = tokens(len(src) * T, seed=seed)
    put = kvm.put_async(toks, slots_for(src, len(toks)))
    assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
    poison(kv, dst)
    get = kvm.get_async(toks, slots_for(dst, len(toks)))
    resp = kvm.wait(get, timeout=30)[get]
    assert resp.status is TaskStatus.SUCCESS and resp.return_mask is not None and resp.return_mask.all()
    for s, d in zip(src, dst, strict=True):
        assert block_bytes(kv, d) == block_bytes(kv, s), f"engine block {d} differs from {s}"
    kvm.check_invariants()


@pytest.mark.parametrize(("kind", "make"), [(LayoutKind.VLLM_BLOCK_FIRST, torch_kv), (LayoutKind.SGLANG, torch_kv),
                                            (LayoutKind.VLLM_BLOCK_FIRST, numpy_kv)],
                         ids=["vllm-torch", "sglang-torch", "vllm-numpy"])
def test_engine_side_lane_round_trips_private_host_memory_byte_exact(kind: LayoutKind, make: Any) -> None:
    model = small_model()
    kv = make(model, kind, num_blocks=24, seed=5)
    with KVManager(model, small_cache()) as kvm:
        tp = KVTPClient(kvm.server_address, dp_client_id=0, tp_rank=0)
        try:
            tp.register(kv.tensors, kv.layout, engine_side=True)
            assert kvm.is_ready(), "register returns once the server counts the rank registered"
            stats = kvm.stats()
            assert stats["pid:device-0-0"] == os.getpid(), "the device worker runs in this process, not a child"
            _round_trip(kvm, kv, seed=1, src=[0, 1, 2, 3, 4], dst=[10, 11, 12, 13, 14])
        finally:
            tp.close()
        # closed: the rank is gone, its ops fail at once instead of hanging
        deadline = time.monotonic() + 10
        while kvm.is_ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not kvm.is_ready()
        toks = tokens(3 * T, seed=2)
        put = kvm.put_async(toks, slots_for([0, 1, 2], len(toks)))
        resp = kvm.wait(put, timeout=10)[put]
        assert resp.status is TaskStatus.FAILED and "device-0-0" in resp.error
        # a second engine-side registration after close serves again
        tp2 = KVTPClient(kvm.server_address, dp_client_id=0, tp_rank=0)
        try:
            tp2.register(kv.tensors, kv.layout, engine_side=True)
            _round_trip(kvm, kv, seed=3, src=[5, 6, 7], dst=[15, 16, 17])
        finally:
            tp2.close()


def test_engine_side_registration_refuses_what_it_cannot_copy_into() -> None:
    model = small_model()
    kv = torch_kv(model, LayoutKind.VLLM_BLOCK_FIRST, num_blocks=8, seed=1)
    with KVManager(model, small_cache()) as kvm:
        tp = KVTPClient(kvm.server_address)
        try:
            with pytest.raises(InvalidRequest, match="not contiguous"):
                tp.register([t.transpose(0, 1) for t in kv.tensors], kv.layout, engine_side=True)
            with pytest.raises(InvalidRequest, match="bytes, layout needs"):
                tp.register([t[:4] for t in kv.tensors], kv.layout, engine_side=True)
            with pytest.raises(InvalidRequest, match="KV tensors given"):
                tp.register(kv.tensors[:1], kv.layout, engine_side=True)
            with pytest.raises(InvalidRequest, match="use_event is for a device worker in another process"):
                tp.register(kv.tensors, kv.layout, engine_side=True, use_event=True)
            assert not kvm.is_ready()
        finally:
            tp.close()


def lane_process(address: str, kind: str, num_blocks: int, seed: int, conn: Any) -> None:
    """An engine process with a private-memory engine-side lane; answers ("block", id), ("poison", ids), "stop"."""
    model = small_model()
    kv = torch_kv(model, LayoutKind(kind), num_blocks, seed)
    client = KVTPClient(address, dp_client_id=0, tp_rank=0)
    client.register(kv.tensors, kv.layout, engine_side=True)
    conn.send("registered")
    while (req := conn.recv()) != "stop":
        if req[0] == "block":
            conn.send(block_bytes(kv, req[1]))
        elif req[0] == "poison":
            poison(kv, req[1])
            conn.send("ok")
    client.close()


def _start_lane_process(address: str, seed: int) -> tuple[Any, Any]:
    parent, child = CTX.Pipe()
    p = CTX.Process(target=lane_process, args=(address, LayoutKind.VLLM_BLOCK_FIRST.value, 24, seed, child))
    p.start()
    assert parent.poll(60), "engine process did not register in time"
    assert parent.recv() == "registered"
    return p, parent


def _remote_bytes(conn: Any, block_id: int) -> bytes:
    conn.send(("block", block_id))
    data: bytes = conn.recv()
    return data


def test_engine_process_killed_mid_get_fails_its_ops_and_a_new_engine_registers_again() -> None:
    model = small_model()
    with KVManager(model, small_cache()) as kvm:
        proc, _conn = _start_lane_process(kvm.server_address, seed=9)
        try:
            toks = tokens(4 * T, seed=4)
            put = kvm.put_async(toks, slots_for([0, 1, 2, 3], len(toks)))
            assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
            os.kill(proc.pid, signal.SIGSTOP)  # the lane cannot run the get's H2D
            get = kvm.get_async(toks, slots_for([10, 11, 12, 13], len(toks)))
            assert kvm.wait(get, timeout=0.5)[get].status in (TaskStatus.TIMEOUT, TaskStatus.UNREADY)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            t0 = time.monotonic()
            resp = kvm.wait(get, timeout=30)[get]
            assert resp.status is TaskStatus.FAILED, resp
            assert time.monotonic() - t0 < 10, "the server noticed the dead engine within its liveness ticks"
            assert not kvm.is_ready()
            kvm.check_invariants()
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        proc2, conn2 = _start_lane_process(kvm.server_address, seed=10)
        try:
            assert kvm.is_ready()
            get = kvm.get_async(toks, slots_for([10, 11, 12, 13], len(toks)))  # from the pool into the new engine
            assert kvm.wait(get, timeout=30)[get].status is TaskStatus.SUCCESS
            toks2 = tokens(3 * T, seed=6)
            put = kvm.put_async(toks2, slots_for([4, 5, 6], len(toks2)))
            assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
            conn2.send(("poison", [20, 21, 22]))
            assert conn2.recv() == "ok"
            get = kvm.get_async(toks2, slots_for([20, 21, 22], len(toks2)))
            assert kvm.wait(get, timeout=30)[get].status is TaskStatus.SUCCESS
            for s, d in zip([4, 5, 6], [20, 21, 22], strict=True):
                assert _remote_bytes(conn2, d) == _remote_bytes(conn2, s)
            kvm.check_invariants()
        finally:
            conn2.send("stop")
            proc2.join(20)
            assert proc2.exitcode == 0


def test_engine_side_lane_with_two_lanes_reports_on_its_lane_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEXKV_HOST_LANES=2 in the engine process: gets and puts run in two lane threads, each reporting
    on its own socket after its own credentialed hello."""
    monkeypatch.setenv("FLEXKV_HOST_LANES", "2")
    model = small_model()
    kv = torch_kv(model, LayoutKind.VLLM_BLOCK_FIRST, num_blocks=24, seed=8)
    with KVManager(model, small_cache()) as kvm:
        tp = KVTPClient(kvm.server_address)
        try:
            tp.register(kv.tensors, kv.layout, engine_side=True)
            assert tp._lane is not None and tp._lane.worker.num_lanes == 2
            _round_trip(kvm, kv, seed=4, src=[0, 1, 2, 3], dst=[12, 13, 14, 15])
            assert kvm.stats()["worker_msgs_refused"] == 0
        finally:
            tp.close()

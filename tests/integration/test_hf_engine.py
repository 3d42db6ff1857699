"""The HF engine on a real (tiny, random) Llama: flexkv's restores are bit-exact and never change the output.

Everything runs on the CPU: the paged pool lives in host shared memory, the device worker is a real
process, SSD blocks are real O_DIRECT files. No weights are downloaded: a 2-layer LlamaConfig with a
fixed seed.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the HF engine needs transformers (build.sh installs it)")

from transformers import DynamicCache

from flexkv.common.config import CacheConfig
from flexkv.integration.hf import (
    HFPagedEngine,
    PagedKVPool,
    TurnStats,
    flexkv_model_config,
    random_model,
    tiny_llama_config,
)
from flexkv.integration.hf.cost import CostCheck
from flexkv.integration.hf.engine import cache_keyword, layer_kv
from flexkv.integration.hf.models import kv_shape
from flexkv.kvmanager import KVManager
from flexkv.native import cudacopy
from flexkv.shm import list_flexkv_segments
from flexkv.types import TaskStatus
from tests.runtime.kvtest import flip_byte, needs_ssd_tier, ssd_slot, start_server

pytestmark = pytest.mark.timeout(120)

T = 4
NUM_PAGES = 96
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = set(list_flexkv_segments())
    yield
    leaked = {s for s in set(list_flexkv_segments()) - before if f"-{os.getpid()}-" in s}
    assert not leaked, f"shared-memory segments leaked: {sorted(leaked)}"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels every run, and room for the worker process
    yield
    torch.set_num_threads(threads)


class Stack:
    """A library-mode flexkv server with the engine's pool registered, and engines over one model."""

    def __init__(self, dtype: torch.dtype, attn: str = "sdpa", cache: CacheConfig | None = None,
                 layerwise: bool = True, address: str | None = None, request_timeout_s: float = 60.0,
                 device: str = "cpu", engine_side: bool = False) -> None:
        self.config = tiny_llama_config(attn)
        self.dtype = dtype
        self.model = random_model(self.config, dtype, seed=0, device=device)
        layers, heads, head_dim = kv_shape(self.config)
        self.pool = PagedKVPool(layers, heads, head_dim, NUM_PAGES, T, dtype, device)
        self.ref_pool = PagedKVPool(layers, heads, head_dim, NUM_PAGES, T, dtype, device)
        self.kvm = KVManager(flexkv_model_config(self.config, dtype),
                             cache or CacheConfig(tokens_per_block=T, num_cpu_blocks=256), server_address=address,
                             request_timeout_s=request_timeout_s)
        self.kvm.start()
        self.kvm.register_kv_buffers(self.pool.register_with(), self.pool.layout, layerwise=layerwise,
                                     engine_side=engine_side)
        self.engines: list[HFPagedEngine] = []

    def engine(self, use_flexkv: bool = True, **kw: object) -> HFPagedEngine:
        # These tests prove restores: every match is restored (the cost check's choices depend on timing;
        # test_hf_cost_check.py tests them).
        kw.setdefault("cost_check", False)
        eng = HFPagedEngine(self.model, self.pool if use_flexkv else self.ref_pool,
                            self.kvm if use_flexkv else None, **kw)  # type: ignore[arg-type]
        self.engines.append(eng)
        return eng

    def close(self) -> None:
        for eng in self.engines:
            eng.close()
        self.kvm.shutdown()
        self.pool.close()
        self.ref_pool.close()


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    made: list[Stack] = []
    yield made
    for s in made:
        s.close()


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass
class Conversation:
    outs: list[list[int]]  # each turn's generated tokens
    stats: list[TurnStats]
    prompts: list[torch.Tensor]
    logits: list[torch.Tensor]  # each turn's prefill logits (of the prompt's last token)
    kv: list[list[tuple[torch.Tensor, torch.Tensor]]]  # each turn's K/V per layer right after the prefill


def converse(engine: HFPagedEngine, turns: int, seed: int, new_tokens: int = 32,
             same_split_as: Conversation | None = None) -> Conversation:
    """``turns`` turns: each prompt is the whole conversation so far plus a new user message.

    ``same_split_as`` (an engine without flexkv): the bit-exact reference of that flexkv run. Turn k
    reuses, of this engine's own turn k-1 cache, as many tokens as the flexkv run restored at turn k,
    and computes the rest: the same forwards as the flexkv run, with KV this engine computed itself."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.randint(0, 256, (29,), generator=gen)
    c = Conversation([], [], [], [], [])
    cache = None
    for k in range(turns):
        reused = same_split_as.stats[k].num_restored_tokens if same_split_as is not None else 0
        logits, cache, st, put = engine.prefill(conv, (cache, reused) if reused else None)
        kvs = (layer_kv(cache, i) for i in range(engine.num_layers))
        c.kv.append([(key.clone(), value.clone()) for key, value in kvs])
        try:
            out = engine.decode(logits, cache, conv.numel(), new_tokens)
        finally:
            engine.finish_put(put)
        c.outs.append(out)
        c.stats.append(st)
        c.prompts.append(conv)
        c.logits.append(logits)
        conv = torch.cat([conv, torch.tensor(out), torch.randint(0, 256, (11,), generator=gen)])
    return c


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_restored_prefix_is_bit_exact_kv_and_gives_bit_exact_logits(stacks: list[Stack], dtype: torch.dtype) -> None:
    s = Stack(dtype)
    stacks.append(s)
    eng = s.engine(layerwise=False)
    first = prompt(6 * T + 3, seed=1)
    _, cache, _, put = eng.prefill(first)  # computes and stores 6 whole blocks
    eng.finish_put(put)
    p = 6 * T
    computed = [tuple(x[:, :, :p].clone() for x in layer_kv(cache, i)) for i in range(s.config.num_hidden_layers)]

    # (a) what comes back into poisoned pages is exactly the KV the model computed for that prefix
    for t in s.pool.tensors:
        t.fill_(float("nan"))
    tid, mask = s.kvm.get_match(first[:p].numpy())
    assert int(mask.sum()) == p
    pages = s.pool.allocate(6)
    s.kvm.launch(tid, s.pool.slot_mapping(pages, p))
    assert s.kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
    for i, (k, v) in enumerate(computed):
        rk, rv = s.pool.read_layer(i, pages, p)
        assert torch.equal(rk, k) and torch.equal(rv, v), f"layer {i} restored KV differs"
    s.pool.free(pages)

    # (b) a prompt sharing that prefix: restore + suffix logits == prefix-then-suffix without flexkv
    for layerwise in (False, True):
        second = torch.cat([first[:p], prompt(9, seed=2 + layerwise)])  # its own suffix: only p is cached
        eng2 = s.engine(layerwise=layerwise)
        logits, _, stats, put = eng2.prefill(second)
        eng2.finish_put(put)
        assert stats.num_restored_tokens == p and stats.num_computed_tokens == 9 and not stats.fallback
        ref_cache = DynamicCache(config=s.config)
        for i, (k, v) in enumerate(computed):
            ref_cache.update(k, v, i)
        with torch.inference_mode():
            ref = s.model(input_ids=second[p:].unsqueeze(0), position_ids=torch.arange(p, len(second)).unsqueeze(0),
                          use_cache=True, logits_to_keep=1, **{eng2._cache_kw: ref_cache}).logits[0, -1].float()
        assert torch.equal(logits, ref), f"layerwise={layerwise}: max diff {(logits - ref).abs().max()}"
    s.kvm.check_invariants()


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "whole"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flexkv_sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_four_turn_conversation_is_token_identical_with_and_without_flexkv(
        stacks: list[Stack], dtype: torch.dtype, attn: str, layerwise: bool) -> None:
    s = Stack(dtype, attn)
    stacks.append(s)
    with_kv = converse(s.engine(layerwise=layerwise), 4, seed=3)
    assert with_kv.stats[0].num_restored_tokens == 0
    for prev, st in itertools.pairwise(with_kv.stats):
        assert st.num_restored_tokens == prev.num_prompt_tokens // T * T, "each turn restores the last prompt"
        assert st.num_computed_tokens == st.num_prompt_tokens - st.num_restored_tokens and not st.fallback

    # Bit-exact against the engine without flexkv making the same forwards (prefix, then suffix):
    # every turn's K/V after the prefill (restored prefix + computed suffix) and prefill logits
    # torch.equal, every token identical.
    without = converse(s.engine(use_flexkv=False), 4, seed=3, same_split_as=with_kv)
    assert all(st.num_restored_tokens == 0 and st.fallback == "no flexkv" for st in without.stats)
    for k, (a_kv, b_kv) in enumerate(zip(with_kv.kv, without.kv, strict=True)):
        for i, ((ka, va), (kb, vb)) in enumerate(zip(a_kv, b_kv, strict=True)):
            assert torch.equal(ka, kb) and torch.equal(va, vb), f"turn {k} layer {i}: K/V differ"
    for k, (a, b) in enumerate(zip(with_kv.logits, without.logits, strict=True)):
        assert torch.equal(a, b), f"turn {k}: max diff {(a - b).abs().max()}"
    assert with_kv.outs == without.outs

    # Only close to a plain recompute of each whole prompt (other kernel shapes round differently; in
    # bf16 greedy decoding of a random model may then flip a token on some CPUs): fp32 logits within 1e-4.
    if dtype == torch.float32:
        plain = s.engine(use_flexkv=False)
        for k, (p, a) in enumerate(zip(with_kv.prompts, with_kv.logits, strict=True)):
            ref, _, _, _ = plain.prefill(p)
            assert torch.allclose(a, ref, rtol=0, atol=1e-4), f"turn {k}: max diff {(a - ref).abs().max()}"
    s.kvm.check_invariants()


def _ssd_cache(tmp_path: Path, num_cpu_blocks: int) -> CacheConfig:
    needs_ssd_tier()
    d = tmp_path / "nvme0"
    d.mkdir(exist_ok=True)
    return CacheConfig(tokens_per_block=T, num_cpu_blocks=num_cpu_blocks, enable_ssd=True, num_ssd_blocks=512,
                       ssd_cache_dir=(str(d),))


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])  # fp32 restores are covered above
def test_blocks_evicted_to_ssd_come_back_and_the_output_is_unchanged(stacks: list[Stack], dtype: torch.dtype,
                                                                     tmp_path: Path) -> None:
    # 24 CPU blocks; two interleaved conversations (prompts of 8..22 blocks) push each other out to SSD
    cpu_blocks = 24
    s = Stack(dtype, cache=_ssd_cache(tmp_path, num_cpu_blocks=cpu_blocks))
    stacks.append(s)
    eng, ref = s.engine(put_completely=True), s.engine(use_flexkv=False)
    gens = {c: torch.Generator().manual_seed(10 + c) for c in (0, 1)}
    convs = {c: torch.randint(0, 256, (33,), generator=gens[c]) for c in (0, 1)}
    last_blocks = {0: 0, 1: 0}
    ref_caches: dict[int, DynamicCache] = {}
    from_ssd = 0
    for _ in range(4):
        for c in (0, 1):
            out, st = eng.generate(convs[c], 8)
            assert st.num_restored_tokens == last_blocks[c] * T and not st.fallback, st
            # token-identical to the same forwards without flexkv: reuse the reference's own last turn
            reuse = (ref_caches[c], st.num_restored_tokens) if st.num_restored_tokens else None
            logits, ref_caches[c], _, _ = ref.prefill(convs[c], reuse)
            assert out == ref.decode(logits, ref_caches[c], len(convs[c]), 8)
            # the other conversation's prompt was stored after ours and LRU keeps it: what does not fit
            # beside it in the CPU tier was read back from SSD
            from_ssd += max(0, st.num_restored_tokens // T + last_blocks[1 - c] - cpu_blocks)
            last_blocks[c] = len(convs[c]) // T
            convs[c] = torch.cat([convs[c], torch.tensor(out), torch.randint(0, 256, (11,), generator=gens[c])])
    stats = s.kvm.stats()
    assert stats["cpu_evicted_blocks"] > 0 and stats["ssd_used_blocks"] > 0
    assert from_ssd >= 10, f"only {from_ssd} restored blocks can have come from SSD"
    s.kvm.check_invariants()


def test_two_namespaces_with_the_same_prompt_never_share_blocks(stacks: list[Stack]) -> None:
    s = Stack(torch.float32)
    stacks.append(s)
    a, b = s.engine(namespace=["lora-a", "tenant-1"]), s.engine(namespace=["lora-b", "tenant-1"])
    p = prompt(10 * T + 1, seed=4)
    out_a, st_a = a.generate(p, 4)
    out_b, st_b = b.generate(p, 4)
    assert st_a.num_restored_tokens == 0 and st_b.num_restored_tokens == 0, "b must not see a's blocks"
    assert out_a == out_b
    _, again = a.generate(p, 4)
    assert again.num_restored_tokens == 10 * T
    _, plain = s.engine().generate(p, 4)
    assert plain.num_restored_tokens == 0, "no namespace is a namespace of its own"
    s.kvm.check_invariants()


@pytest.mark.parametrize("graphs", [False, True], ids=["forward", "graphs"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_a_failed_restore_is_recomputed_and_the_output_is_unchanged(stacks: list[Stack], tmp_path: Path,
                                                                     layerwise: bool, graphs: bool) -> None:
    s = Stack(torch.float32, "flexkv_sdpa" if graphs else "sdpa", cache=_ssd_cache(tmp_path, num_cpu_blocks=16))
    stacks.append(s)
    eng = s.engine(layerwise=layerwise, put_completely=True, cuda_graphs=graphs)
    ref = s.engine(use_flexkv=False)
    p = prompt(12 * T + 2, seed=5)
    eng.generate(p, 4)
    eng.generate(prompt(14 * T + 1, seed=6), 4)  # evicts p's blocks from the CPU tier to SSD
    for f in glob.glob(str(tmp_path / "nvme0" / "*")):
        if not f.endswith(".json"):
            os.truncate(f, 0)  # the drive loses its data: the restore's DISK2H fails
    longer = torch.cat([p, prompt(7, seed=7)])
    out, st = eng.generate(longer, 16)
    assert out == ref.generate(longer, 16)[0]
    assert st.num_restored_tokens == 0 and "restore failed" in st.fallback, st
    assert s.pool.num_free_pages == NUM_PAGES, "the failed task's pages came back"
    s.kvm.check_invariants()


@pytest.mark.parametrize("graphs", [False, True], ids=["forward", "graphs"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_a_restore_that_delivers_less_than_it_matched_never_feeds_the_model_the_rest(
        stacks: list[Stack], tmp_path: Path, layerwise: bool, graphs: bool) -> None:
    """A GET can end SUCCESS with a shorter mask than its match promised (a corrupt SSD block and what
    follows it are a miss, as is a key the remote store evicted). The pages past the delivered prefix
    were never written: the engine must not compute with them (poisoned here), nor store them back."""
    from flexkv.native.hasher import hash_blocks

    cache = _ssd_cache(tmp_path, num_cpu_blocks=16)
    s = Stack(torch.float32, "flexkv_sdpa", cache=cache)
    stacks.append(s)
    eng = s.engine(layerwise=layerwise, put_completely=True, cuda_graphs=graphs)
    ref = s.engine(use_flexkv=False)
    p = prompt(12 * T + 2, seed=5)
    eng.generate(p, 4)  # 12 blocks to CPU and SSD
    eng.generate(prompt(16 * T + 1, seed=6), 4)  # fills the 16-block CPU tier: p is on SSD only
    hashes = hash_blocks(p[:12 * T].numpy(), T)
    for i in range(6, 12):  # one byte in the middle of each: their checksums no longer match
        path, off = ssd_slot(cache, flexkv_model_config(s.config, s.dtype), int(hashes[i]))
        flip_byte(path, off + flexkv_model_config(s.config, s.dtype).block_bytes(T) // 2)
    for t in s.pool.tensors:
        t.fill_(float("nan"))  # pages the restore does not write hold NaN
    longer = torch.cat([p, prompt(7, seed=7)])
    out, st = eng.generate(longer, 16)
    assert out == ref.generate(longer, 16)[0], st
    assert st.num_restored_tokens in (0, 6 * T), st  # the verified prefix, or nothing (recomputed)
    assert s.kvm.stats()["ssd_corrupt_blocks"] == 1
    # what the turn stored back is the model's own KV: the whole prompt now restores, bit-exact
    for t in s.pool.tensors:
        t.fill_(float("nan"))
    again, st2 = eng.generate(longer, 16)
    assert again == out and st2.num_restored_tokens == len(longer) // T * T and not st2.fallback, st2
    assert s.pool.num_free_pages == NUM_PAGES
    s.kvm.check_invariants()


def test_an_unreachable_server_means_recompute_not_an_error(stacks: list[Stack], tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    config = tiny_llama_config()
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=64)
    server = start_server(flexkv_model_config(config, torch.float32), cache, address)
    try:
        s = Stack(torch.float32, cache=cache, address=address, request_timeout_s=1.0)
        stacks.append(s)
        eng, ref = s.engine(wait_timeout_s=2.0), s.engine(use_flexkv=False)
        p = prompt(8 * T + 1, seed=8)
        eng.generate(p, 4)
        os.kill(server.pid, signal.SIGSTOP)  # type: ignore[attr-defined]
        try:
            longer = torch.cat([p, prompt(5, seed=9)])
            out, st = eng.generate(longer, 8)
            assert out == ref.generate(longer, 8)[0]
            assert st.num_restored_tokens == 0 and "get_match" in st.fallback, st
            # get_match_launch got no reply: the server may still launch into the pages it was given, so they
            # are never handed out again; nor are the turn's put pages, whose wait timed out too
            assert eng.num_quarantined_pages == 2 * (len(longer) // T)
        finally:
            os.kill(server.pid, signal.SIGCONT)  # type: ignore[attr-defined]
        s.close()
        stacks.remove(s)
    finally:
        server.send_signal(signal.SIGINT)  # type: ignore[attr-defined]
        assert server.wait(20) == 0  # type: ignore[attr-defined]


def test_a_launch_whose_reply_the_engine_never_read_leaves_its_pages_quarantined(stacks: list[Stack]) -> None:
    """get_match_launch reached the server (it matched and launched) but the engine stopped listening
    before it had the reply (here: an exception raised right after the real call returns, as a
    KeyboardInterrupt would be): the pages it offered may be written, so they are never handed out."""
    s = Stack(torch.float32)
    stacks.append(s)
    eng, ref = s.engine(), s.engine(use_flexkv=False)
    p = prompt(8 * T + 1, seed=21)
    eng.generate(p, 4)
    real = s.kvm.get_match_launch

    def launched_then_interrupted(*args: object, **kw: object) -> object:
        real(*args, **kw)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    s.kvm.get_match_launch = launched_then_interrupted  # type: ignore[method-assign,assignment]
    longer = torch.cat([p, prompt(6, seed=22)])
    free = s.pool.num_free_pages
    with pytest.raises(KeyboardInterrupt):
        eng.generate(longer, 4)
    assert eng.num_quarantined_pages == len(longer) // T
    assert s.pool.num_free_pages == free - len(longer) // T
    s.kvm.get_match_launch = real  # type: ignore[method-assign]
    out, st = eng.generate(longer, 8)  # later turns run on other pages, with the right output
    assert out == ref.generate(longer, 8)[0] and st.num_restored_tokens > 0, st


def _cuda_why() -> str:
    ok, why = cudacopy.cuda_available()
    return "" if ok and torch.cuda.is_available() else f"no CUDA here: {why or 'torch has no CUDA'}"


@pytest.mark.skipif(bool(_cuda_why()), reason=_cuda_why() or "-")
@pytest.mark.parametrize(("attn", "engine_side", "graphs"),
                         [("sdpa", False, False), ("flexkv_sdpa", False, False), ("flexkv_sdpa", True, False),
                          ("flexkv_sdpa", False, True), ("flexkv_sdpa", True, True)],
                         ids=["sdpa", "flexkv_sdpa", "flexkv_sdpa-lane", "graphs", "graphs-lane"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_on_cuda_restores_are_bit_exact_and_the_conversation_unchanged(stacks: list[Stack], layerwise: bool,
                                                                       attn: str, engine_side: bool,
                                                                       graphs: bool) -> None:
    """The GPU path: pages are CUDA tensors the GPU worker opens by IPC, or copied by an engine-side lane in
    this process (gpu_e2e_check.sh layerwise); ``graphs``: the suffix runs as captured CUDA graphs, and so
    does the reference's (the same forwards)."""
    s = Stack(torch.bfloat16, attn, device="cuda", engine_side=engine_side)
    stacks.append(s)
    with_kv = converse(s.engine(layerwise=layerwise, cuda_graphs=graphs, graph_capture_after=1), 4, seed=3)
    without = converse(s.engine(use_flexkv=False, cuda_graphs=graphs, graph_capture_after=1), 4, seed=3,
                       same_split_as=with_kv)
    assert with_kv.outs == without.outs
    assert all(torch.equal(a, b) for a, b in zip(with_kv.logits, without.logits, strict=True))
    for turn, (a_kv, b_kv) in enumerate(zip(with_kv.kv, without.kv, strict=True)):
        for i, ((ka, va), (kb, vb)) in enumerate(zip(a_kv, b_kv, strict=True)):
            assert torch.equal(ka, kb) and torch.equal(va, vb), f"turn {turn} layer {i}: K/V differ"
    for prev, st in itertools.pairwise(with_kv.stats):
        assert st.num_restored_tokens == prev.num_prompt_tokens // T * T and not st.fallback, st
    if graphs:
        assert s.engines[0].graphs is not None and s.engines[0].graphs.num_captured == 3  # turns 2-4: 3 shapes
    eng = s.engine(layerwise=layerwise)
    first = prompt(6 * T + 3, seed=1)
    _, cache, _, put = eng.prefill(first)
    eng.finish_put(put)
    for t in s.pool.tensors:
        t.fill_(float("nan"))
    tid, mask = s.kvm.get_match(first[:6 * T].numpy())
    assert int(mask.sum()) == 6 * T
    pages = s.pool.allocate(6)
    s.kvm.launch(tid, s.pool.slot_mapping(pages, 6 * T))
    assert s.kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
    for i in range(s.config.num_hidden_layers):
        k, v = layer_kv(cache, i)
        rk, rv = s.pool.read_layer(i, pages, 6 * T)
        assert torch.equal(rk, k[:, :, :6 * T]) and torch.equal(rv, v[:, :, :6 * T]), f"layer {i}"
    s.pool.free(pages)
    s.kvm.check_invariants()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_flexkv_sdpa_computes_what_sdpa_does_for_a_suffix_over_a_cached_prefix(dtype: torch.dtype) -> None:
    """flexkv_sdpa (lower-right causal bias, no repeated K/V) against transformers' sdpa: a prefill, a
    suffix over it and a decoded token give the same logits (on the CPU both take the same kernel)."""
    from flexkv.integration.hf.attention import prefix_causal_sdpa
    ids = prompt(40, seed=11).unsqueeze(0)
    logits = {}
    for attn in ("sdpa", "flexkv_sdpa"):
        model = random_model(tiny_llama_config(attn), dtype, seed=0)
        assert model.config._attn_implementation == attn
        cache = DynamicCache(config=model.config)
        kw = {cache_keyword(model): cache}
        with torch.inference_mode():
            outs = [model(input_ids=ids[:, :30], use_cache=True, **kw).logits,
                    model(input_ids=ids[:, 30:], use_cache=True, position_ids=torch.arange(30, 40).unsqueeze(0),
                          **kw).logits,
                    model(input_ids=ids[:, :1], use_cache=True, position_ids=torch.tensor([[40]]), **kw).logits]
        assert cache.get_seq_length() == 41
        logits[attn] = outs
    for a, b in zip(logits["sdpa"], logits["flexkv_sdpa"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if dtype is torch.float32 else 0)
    q, k = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="no attention mask"):
        prefix_causal_sdpa(torch.nn.Module(), q, k, k, torch.ones(1, 1, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="queries but only"):
        prefix_causal_sdpa(torch.nn.Module(), k.repeat(1, 2, 1, 1), q[:, :2], q[:, :2], None)


def test_pool_pages_read_back_what_was_written_consecutive_or_not() -> None:
    """Consecutive pages are read as views, others gathered: both give exactly the written K/V."""
    pool = PagedKVPool(2, 2, 8, 12, T, torch.float32)
    try:
        for pages in ([3, 4, 5], [9, 2, 7], [0]):
            key = torch.randn(1, 2, len(pages) * T, 8)
            value = torch.randn(1, 2, len(pages) * T, 8)
            pool.write_layer(1, pages, key, value)
            ref = pool.page_index(pages)
            assert isinstance(ref, slice) == (pages != [9, 2, 7])
            for n in (len(pages) * T, len(pages) * T - 3):  # whole pages, and a last page in part
                rk, rv = pool.read_layer(1, pages, n)
                assert torch.equal(rk, key[:, :, :n]) and torch.equal(rv, value[:, :, :n])
                rows = pool.read_rows(1, pool.row_index(pages, n))  # the pool's own layout, [tokens, heads, dim]
                assert torch.equal(rows[0], key[0, :, :n].permute(1, 0, 2))
                assert torch.equal(rows[1], value[0, :, :n].permute(1, 0, 2))
        with pytest.raises(ValueError, match="not within"):
            pool.row_index([1, 2], 2 * T + 1)
        with pytest.raises(ValueError, match="not within"):
            pool.read_layer(0, [1], -1)
        with pytest.raises(ValueError, match="do not fill"):
            pool.write_layer(0, [1, 2], torch.zeros(1, 2, T, 8), torch.zeros(1, 2, T, 8))
    finally:
        pool.close()


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "whole"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_the_per_layer_graph_loop_computes_exactly_what_the_model_forward_does(
        stacks: list[Stack], dtype: torch.dtype, layerwise: bool) -> None:
    """``cuda_graphs=True`` walks the decoder layers itself (captured on CUDA, eagerly here): the same
    K/V, logits and tokens, bit for bit, as the engine running ``model.forward``, on two servers given the
    same conversation; and its own no-flexkv reference (reuse through the same loop) agrees too."""
    plain, graphed = Stack(dtype, "flexkv_sdpa"), Stack(dtype, "flexkv_sdpa")
    stacks += [plain, graphed]
    a = converse(plain.engine(layerwise=layerwise), 4, seed=3)
    eng = graphed.engine(layerwise=layerwise, cuda_graphs=True)
    g = converse(eng, 4, seed=3)
    assert [st.num_restored_tokens for st in g.stats] == [st.num_restored_tokens for st in a.stats]
    assert g.stats[1].num_restored_tokens > 0 and not any(st.fallback for st in g.stats)
    assert eng.graphs is not None and len(eng.graphs) == 3 and eng.graphs.num_captured == 0  # no capture off CUDA
    assert g.outs == a.outs
    assert all(torch.equal(x, y) for x, y in zip(g.logits, a.logits, strict=True))
    for k, (a_kv, g_kv) in enumerate(zip(a.kv, g.kv, strict=True)):
        for i, ((ka, va), (kg, vg)) in enumerate(zip(a_kv, g_kv, strict=True)):
            assert torch.equal(ka, kg) and torch.equal(va, vg), f"turn {k} layer {i}: K/V differ"
    ref = converse(graphed.engine(use_flexkv=False, cuda_graphs=True), 4, seed=3, same_split_as=g)
    assert ref.outs == g.outs and all(torch.equal(x, y) for x, y in zip(ref.logits, g.logits, strict=True))
    graphed.kvm.check_invariants()


def test_a_suffix_longer_than_the_graph_limit_runs_the_model_forward(stacks: list[Stack]) -> None:
    s = Stack(torch.float32, "flexkv_sdpa")
    stacks.append(s)
    eng = s.engine(cuda_graphs=True, graph_max_suffix_tokens=8, cost_check=CostCheck())
    first = prompt(6 * T + 3, seed=1)
    eng.finish_put(eng.prefill(first)[3])
    for extra, shapes in ((5, 1), (20, 1)):  # a 5-token suffix is graphed; a 20-token one is not
        _, _, st, put = eng.prefill(torch.cat([first[:6 * T], prompt(extra, seed=extra)]))
        eng.finish_put(put)
        assert st.num_restored_tokens == 6 * T and not st.fallback
        assert eng.graphs is not None and len(eng.graphs) == shapes
    # the cost check learns from the model's forwards only (a recompute is never graphed): 2 of the 3
    assert eng.cost_check is not None and eng.cost_check.model.num_samples == 2


def test_cuda_graphs_need_a_llama_like_model_with_flexkv_sdpa(stacks: list[Stack]) -> None:
    s = Stack(torch.float32, "sdpa")
    stacks.append(s)
    with pytest.raises(ValueError, match="flexkv_sdpa"):
        s.engine(cuda_graphs=True)
    from flexkv.integration.hf.graphs import llama_parts

    with pytest.raises(ValueError, match="not Llama-like"):
        llama_parts(torch.nn.Linear(2, 2))


def test_the_graph_cache_keeps_the_last_shapes() -> None:
    from flexkv.integration.hf.graphs import GraphCache

    model = random_model(tiny_llama_config("flexkv_sdpa"), torch.float32)
    cache = GraphCache(model, capture=False, size=2)
    first = cache.get(8, 4)
    assert cache.get(8, 4) is first and len(cache) == 1
    cache.get(12, 4)
    cache.get(8, 4)  # most recent again
    cache.get(16, 2)  # drops (12, 4)
    assert len(cache) == 2 and cache.get(8, 4) is first
    with pytest.raises(ValueError, match="size"):
        GraphCache(model, capture=False, size=0)
    with pytest.raises(ValueError, match="capture_after"):
        GraphCache(model, capture=False, capture_after=0)


def test_a_shape_is_captured_only_once_it_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """capture_after=2: the first time a shape is asked for there are no graphs (the engine runs the model's
    forward), the second time they are captured; a conversation, each turn a new shape, never captures."""
    from flexkv.integration.hf import graphs as g

    made: list[tuple[int, int]] = []

    class Recorded(g.SuffixGraphs):
        def __init__(self, model: torch.nn.Module, prefix: int, suffix: int, capture: bool) -> None:
            made.append((prefix, suffix))
            super().__init__(model, prefix, suffix, capture=False)  # (no CUDA here: the loop, uncaptured)

    monkeypatch.setattr(g, "SuffixGraphs", Recorded)
    model = random_model(tiny_llama_config("flexkv_sdpa"), torch.float32)
    cache = g.GraphCache(model, capture=True, size=2, capture_after=2)
    assert [cache.get(8 * k, 4) for k in range(1, 6)] == [None] * 5 and made == []
    assert cache.get(8, 4) is not None and made == [(8, 4)] and cache.num_captured == 1
    assert cache.get(8, 4) is cache.get(8, 4) and made == [(8, 4)]


def test_a_graphed_run_that_fails_midway_leaves_nothing_for_the_next() -> None:
    """A layer's prefix that cannot be had (a layer-wise restore failing at layer 1) ends the run; the next
    run of the same shape gives exactly what a fresh set of graphs gives (no K/V of the failed run kept)."""
    from flexkv.integration.hf.graphs import SuffixGraphs

    config = tiny_llama_config("flexkv_sdpa")
    model = random_model(config, torch.float32)
    layers, heads, head_dim = kv_shape(config)
    gen = torch.Generator().manual_seed(4)
    prefix = [(torch.randn(12, heads, head_dim, generator=gen), torch.randn(12, heads, head_dim, generator=gen))
              for _ in range(layers)]
    embedded = torch.randn(1, 3, config.hidden_size, generator=gen)

    def failing(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == 1:
            raise RuntimeError("layer 1 did not land")
        return prefix[layer]

    graphs = SuffixGraphs(model, 12, 3, capture=False)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="did not land"):
            graphs.run(embedded, failing)
        hidden, kvs = graphs.run(embedded, lambda layer: prefix[layer])
        ref_hidden, ref_kvs = SuffixGraphs(model, 12, 3, capture=False).run(embedded, lambda layer: prefix[layer])
    assert torch.equal(hidden, ref_hidden) and len(kvs) == layers
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(kvs, ref_kvs, strict=True))

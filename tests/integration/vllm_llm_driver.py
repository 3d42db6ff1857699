"""Runs real vLLM (``LLM()``, CPU, a tiny random Llama) in a fresh process and prints one JSON line.

A process holds one connector-carrying LLM: vLLM keeps its worker-side connector in a process-wide
global. Scenarios (``python -m tests.integration.vllm_llm_driver SCENARIO ARGS_JSON``):

* ``library``: references without any connector, then our connector (module-path form, library
  mode): A; vLLM's cache reset and its KV memory poisoned; B sharing A's prefix (loaded
  blocks compared byte for byte with A's); a multi-turn conversation replayed turn by turn.
* ``multiprocess``: vLLM's default layout (VLLM_ENABLE_V1_MULTIPROCESSING=1) in server mode: loads D.
* ``store`` / ``share_then_lose``: server mode (FLEXKV_SERVER_ADDRESS): one instance, through vLLM's
  in-tree ``kv_connector="FlexKVConnectorV1"``, stores A, loads B's shared prefix and exits; another
  (module-path form) loads D's prefix from what the first stored, then, after the test killed the
  server, still answers C (recomputing) without hanging.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch
from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer import get_kv_transfer_group

BLOCK = 32
MODULE = "flexkv.integration.vllm.connector"
# Finite: CPU attention reads whole blocks and masks by weight, and NaN * 0 would poison real tokens too.
POISON = 4096.0


def make_llm(model_dir: str, connector: str | None, **extra: Any) -> LLM:
    kw: dict[str, Any] = {}
    if connector == "module":
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector="FlexKVConnector", kv_connector_module_path=MODULE,
                                                    kv_role="kv_both", kv_load_failure_policy="recompute",
                                                    kv_connector_extra_config=extra)
    elif connector == "intree":
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector="FlexKVConnectorV1", kv_role="kv_both",
                                                    kv_load_failure_policy="recompute",
                                                    kv_connector_extra_config=extra)
    return LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, block_size=BLOCK,
               max_model_len=1024, max_num_seqs=4, seed=0, **kw)


def generate(llm: LLM, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def scheduler_side(llm: LLM) -> Any:
    """Our scheduler-side state (the connector vLLM's Scheduler made, either entry point)."""
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    impl = getattr(connector, "impl", None) or connector._flexkv_connector
    return impl.scheduler


def worker_kv(llm: LLM) -> list[torch.Tensor]:
    """vLLM's per-layer KV views as the worker-side connector was given them (same process)."""
    connector = get_kv_transfer_group()
    impl = getattr(connector, "impl", None) or connector._flexkv_connector
    return list(impl.worker._kv_caches.values())


def settle(llm: LLM) -> None:
    """Let every save end and vLLM free what it held for it, then reset vLLM's own prefix cache."""
    assert scheduler_side(llm).wait_for_saves(30), "saves did not end"
    core = llm.llm_engine.engine_core.engine_core
    for _ in range(50):
        if not core.scheduler.has_requests():
            break
        core.step_fn()
    assert not core.scheduler.has_requests(), "vLLM still holds requests"
    assert llm.reset_prefix_cache(), "vLLM's prefix cache did not reset"


def poison(llm: LLM) -> None:
    for view in worker_kv(llm):
        view.fill_(POISON)


def written_blocks(llm: LLM) -> list[dict[bytes, int]]:
    """Per layer: the bytes of every block that is not all POISON -> its block id."""
    out = []
    for view in worker_kv(llm):
        flat = view.reshape(view.shape[0], -1)
        ids = (flat != POISON).any(dim=1).nonzero().flatten().tolist()
        out.append({flat[i].view(torch.int16).numpy().tobytes(): int(i) for i in ids})
    return out


def conversation(llm: LLM, first: list[int], turns: int, user_len: int) -> list[list[int]]:
    """Prompts of a multi-turn chat: each turn's prompt is the last prompt + its answer + new user tokens."""
    prompts, prompt = [], list(first)
    for t in range(turns):
        prompts.append(prompt)
        if t + 1 < turns:
            answer = generate(llm, [prompt])[0]
            prompt = prompt + answer + [(t * 37 + i * 11) % 400 + 5 for i in range(user_len)]
    return prompts


def scenario_library(args: dict[str, Any]) -> dict[str, Any]:
    a, b = args["a"], args["b"]
    ref_llm = make_llm(args["model"], None)
    conv = conversation(ref_llm, args["conv"], 3, 20)
    ref = generate(ref_llm, [a, b, *conv, *args["more"]])
    del ref_llm
    gc.collect()

    llm = make_llm(args["model"], "module")
    side = scheduler_side(llm)
    poison(llm)
    out_a = generate(llm, [a])[0]
    settle(llm)
    a_blocks = written_blocks(llm)
    poison(llm)
    loaded0 = side.num_loaded_tokens
    out_b = generate(llm, [b])[0]
    b_loaded = side.num_loaded_tokens - loaded0
    b_blocks = written_blocks(llm)
    shared = [len(set(a_blocks[i]) & set(b_blocks[i])) for i in range(len(a_blocks))]
    turns = []
    for prompt in conv:
        settle(llm)
        poison(llm)
        before = side.num_loaded_tokens
        turns.append({"out": generate(llm, [prompt])[0], "loaded": side.num_loaded_tokens - before})
    stats = side.link.kvm.stats()
    side.link.kvm.check_invariants()
    return {"ref": ref, "conv": conv, "out_a": out_a, "out_b": out_b, "b_loaded": b_loaded,
            "shared_blocks_per_layer": shared, "turns": turns, "server": stats}


def scenario_store(args: dict[str, Any]) -> dict[str, Any]:
    llm = make_llm(args["model"], "intree", flexkv_dp_client_id=args["dp"])
    side = scheduler_side(llm)
    out_a = generate(llm, [args["a"]])[0]
    settle(llm)
    poison(llm)
    out_b = generate(llm, [args["b"]])[0]
    settle(llm)
    return {"out_a": out_a, "out_b": out_b, "b_loaded": side.num_loaded_tokens, "saved": side.num_saved_tokens,
            "impl": type(llm.llm_engine.engine_core.engine_core.scheduler.connector).__name__}


def scenario_share_then_lose(args: dict[str, Any]) -> dict[str, Any]:
    llm = make_llm(args["model"], "module", flexkv_dp_client_id=args["dp"], flexkv_request_timeout_s=3.0)
    side = scheduler_side(llm)
    poison(llm)
    out_d = generate(llm, [args["d"]])[0]
    d_loaded = side.num_loaded_tokens
    settle(llm)
    print("READY-FOR-KILL", flush=True)
    assert sys.stdin.readline().strip() == "killed"
    poison(llm)
    start = time.monotonic()
    out_c = generate(llm, [args["c"]])[0]
    return {"out_d": out_d, "d_loaded": d_loaded, "out_c": out_c, "c_seconds": time.monotonic() - start,
            "c_loaded": side.num_loaded_tokens - d_loaded, "lost": side.link.lost}


def scenario_multiprocess(args: dict[str, Any]) -> dict[str, Any]:
    """vLLM's default process layout (the engine core in a child process): only outputs are visible."""
    llm = make_llm(args["model"], "intree", flexkv_dp_client_id=args["dp"])
    out = generate(llm, [args["d"]])[0]
    llm.llm_engine.engine_core.shutdown()
    return {"out_d": out}


SCENARIOS = {"library": scenario_library, "store": scenario_store, "multiprocess": scenario_multiprocess,
             "share_then_lose": scenario_share_then_lose}

if __name__ == "__main__":  # the guard matters: vLLM's engine core process is spawned
    result = SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)

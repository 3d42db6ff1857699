"""A multi-turn conversation on the HF engine with flexkv: each turn's prompt is the whole conversation so far.

    python examples/hf_chat.py                                   # a tiny random Llama on the CPU
    python examples/hf_chat.py --model-dir /path/to/llama --device cuda --dtype bfloat16 --layerwise
    python examples/hf_chat.py --random llama3-8b --device cuda --dtype bfloat16 --user-tokens 2000

Prints per turn: tokens restored from flexkv, tokens computed, time to first token, the cost check's
choice (restore all / only the CPU prefix / recompute; ``--no-cost-check`` restores every match), and
the same turn recomputed without flexkv. With ``--model-dir`` (a local HF checkpoint; nothing is downloaded)
the user messages are text and the replies are decoded; with ``--random`` they are random token ids.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from flexkv.common.config import CacheConfig
from flexkv.integration.hf import (
    HFPagedEngine,
    PagedKVPool,
    flexkv_model_config,
    llama3_8b_config,
    random_model,
    tiny_llama_config,
)
from flexkv.integration.hf.models import kv_shape
from flexkv.kvmanager import KVManager

MESSAGES = ["Tell me about the history of the printing press.", "Why did it spread so fast in Europe?",
            "How does that compare with the spread of the internet?", "Summarise our conversation in three points."]


def load(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Any, Any]:
    if args.model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype=dtype,
                                                     attn_implementation=args.attn).to(args.device).eval()
        return model, tok
    config = llama3_8b_config(args.attn) if args.random == "llama3-8b" else tiny_llama_config(args.attn)
    return random_model(config, dtype, seed=0, device=args.device), None


def user_turn(args: argparse.Namespace, tok: Any, turn: int, gen: torch.Generator, vocab: int) -> torch.Tensor:
    if tok is None:
        return torch.randint(0, vocab, (args.user_tokens,), generator=gen)
    text = MESSAGES[turn % len(MESSAGES)]
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True) \
        if getattr(tok, "chat_template", None) else tok(text)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="a local HF causal LM checkpoint (else --random)")
    ap.add_argument("--random", choices=["tiny", "llama3-8b"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attn", default="flexkv_sdpa", choices=["flexkv_sdpa", "sdpa", "eager"],
                    help="attention (flexkv_sdpa: SDPA whose suffix over a restored prefix takes the flash kernel)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--user-tokens", type=int, default=48, help="tokens per user message (random models)")
    ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--pages", type=int, default=512, help="engine pages (blocks) registered with flexkv")
    ap.add_argument("--cpu-blocks", type=int, default=2048)
    ap.add_argument("--layerwise", action="store_true", help="restore layer by layer (compute during the restore)")
    ap.add_argument("--no-cost-check", action="store_true", help="restore every match, even when recomputing is faster")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="a short suffix after a restored prefix runs one CUDA graph per layer (needs --attn "
                         "flexkv_sdpa; on the CPU the same per-layer loop runs uncaptured)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)
    model, tok = load(args, dtype)
    layers, heads, head_dim = kv_shape(model.config)
    pool = PagedKVPool(layers, heads, head_dim, args.pages, args.tokens_per_block, dtype, args.device)
    kvm = KVManager(flexkv_model_config(model.config, dtype),
                    CacheConfig(tokens_per_block=args.tokens_per_block, num_cpu_blocks=args.cpu_blocks))
    kvm.start()
    try:
        device_id = torch.device(args.device).index or 0
        # A progress table either way: restores end from it (docs/layerwise.md); --layerwise also copies them
        # layer by layer so the forward starts before the restore is done.
        kvm.register_kv_buffers(pool.register_with(), pool.layout, device_id=device_id, layerwise=True)
        engine = HFPagedEngine(model, pool, kvm, layerwise=args.layerwise, cost_check=not args.no_cost_check,
                               cuda_graphs=args.cuda_graphs)
        plain = HFPagedEngine(model, pool, None)
        gen = torch.Generator().manual_seed(0)
        conv = torch.empty(0, dtype=torch.long)
        print(f"{'turn':>4} {'prompt':>7} {'restored':>8} {'computed':>8} {'TTFT ms':>8} {'recompute ms':>12} "
              f"{'choice':>10}  same")
        for turn in range(args.turns):
            conv = torch.cat([conv, user_turn(args, tok, turn, gen, model.config.vocab_size)])
            out, st = engine.generate(conv, args.new_tokens)
            ref, ref_st = plain.generate(conv, args.new_tokens)
            print(f"{turn + 1:>4} {st.num_prompt_tokens:>7} {st.num_restored_tokens:>8} {st.num_computed_tokens:>8} "
                  f"{1e3 * st.ttft_s:>8.1f} {1e3 * ref_st.ttft_s:>12.1f} "
                  f"{st.choice.value if st.choice else '-':>10}  {out == ref}"
                  + (f"  (recomputed: {st.fallback})" if st.fallback else ""))
            if tok is not None:
                print("     assistant:", tok.decode(out, skip_special_tokens=True).strip()[:200])
            conv = torch.cat([conv, torch.tensor(out, dtype=torch.long)])
        engine.close()
        plain.close()
    finally:
        kvm.shutdown()
        pool.close()


if __name__ == "__main__":
    main()

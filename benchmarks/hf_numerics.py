"""Is a difference between the HF engine with and without flexkv numerics or wrong KV? Prints one row per case.

For each dtype x attention x (layer-wise | whole) restore, a 4-turn greedy conversation on the tiny random
Llama (CPU, one thread) runs three ways: with flexkv; without flexkv making the same forwards (turn k
reuses its own turn k-1 KV for the prefix flexkv restored, then computes the suffix); without flexkv
recomputing every whole prompt. Wrong KV shows as ``KV==split False``; numerics as a nonzero
``|dlogits|`` vs the full recompute while everything against the split reference is equal.

    python benchmarks/hf_numerics.py            # exit status 1 if any split comparison is unequal
"""

from __future__ import annotations

import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from tests.integration.test_hf_engine import Conversation, Stack, converse


def _kv_equal(a: Conversation, b: Conversation) -> bool:
    return all(torch.equal(x, y) for ta, tb in zip(a.kv, b.kv, strict=True)
               for la, lb in zip(ta, tb, strict=True) for x, y in zip(la, lb, strict=True))


def _kv_diff(a: Conversation, b: Conversation) -> float:
    """Largest |K/V difference| over the turns whose prompts are still the same in both."""
    same = [k for k, (p, q) in enumerate(zip(a.prompts, b.prompts, strict=True)) if torch.equal(p, q)]
    return max((float((x.float() - y.float()).abs().max()) for k in same
                for la, lb in zip(a.kv[k], b.kv[k], strict=True) for x, y in zip(la, lb, strict=True)), default=0.0)


def one_case(dtype: torch.dtype, attn: str, layerwise: bool) -> bool:
    s = Stack(dtype, attn)
    try:
        a = converse(s.engine(layerwise=layerwise), 4, seed=3)
        split = converse(s.engine(use_flexkv=False), 4, seed=3, same_split_as=a)
        full = converse(s.engine(use_flexkv=False), 4, seed=3)
        plain = s.engine(use_flexkv=False)
        dfull = max(float((lg - plain.prefill(p)[0]).abs().max()) for p, lg in zip(a.prompts, a.logits, strict=True))
        kv_eq = _kv_equal(a, split)
        lg_eq = all(torch.equal(x, y) for x, y in zip(a.logits, split.logits, strict=True))
        tok_eq = a.outs == split.outs
        print(f"{str(dtype).removeprefix('torch.'):9} {attn:5} {'layerwise' if layerwise else 'whole':9} "
              f"KV==split {kv_eq!s:5} logits==split {lg_eq!s:5} tokens==split {tok_eq!s:5} | "
              f"vs full recompute: max|dlogits| {dfull:.2e} max|dKV| {_kv_diff(a, full):.2e} "
              f"tokens== {a.outs == full.outs}", flush=True)
        return kv_eq and lg_eq and tok_eq
    finally:
        s.close()


def main() -> int:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} on {platform.processor() or platform.machine()}: "
          f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}")
    ok = [one_case(d, attn, lw) for d in (torch.float32, torch.bfloat16) for attn in ("sdpa", "eager")
          for lw in (True, False)]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

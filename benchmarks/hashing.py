"""Block hashing speed: chained per-block XXH3-64 digests vs one raw XXH3 pass over the same bytes.

For each tokens-per-block size and each C implementation this CPU runs, prints ns per block and
us per prompt, beside the ceiling measured in the same run: the Python ``xxhash`` package hashing
the prompt's bytes once (``xxh3_64_intdigest``), i.e. raw hashing speed without per-block digests.

    python benchmarks/hashing.py                       # 128K-token prompt, 16 and 64 tokens/block
    python benchmarks/hashing.py --tokens 1048576 --tokens-per-block 16 32 64 128 --seconds 2
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from collections.abc import Callable

import numpy as np
import xxhash

from flexkv.native.hasher import encode_namespace, hash_blocks, hash_impls


def best_time_s(fn: Callable[[], object], seconds: float) -> float:
    """Best time of one call over batches filling about ``seconds`` (min of batch means)."""
    fn()
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    batch = max(1, int(0.05 / one))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        best = min(best, (time.perf_counter() - start) / batch)
        if time.perf_counter() > deadline:
            return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128 * 1024, help="prompt length in tokens")
    parser.add_argument("--tokens-per-block", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=0.5, help="measuring time per row")
    parser.add_argument("--namespace", default="", help="a namespace part fed before the tokens")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 200_000, size=args.tokens, dtype=np.int64)
    namespace = encode_namespace([args.namespace]) if args.namespace else b""
    raw = namespace + tokens.tobytes()
    ceiling_s = best_time_s(lambda: xxhash.xxh3_64_intdigest(raw), args.seconds)

    print(f"# {platform.processor() or platform.machine()}, {args.tokens} tokens ({len(raw) / 2**20:.2f} MiB), "
          f"xxhash {xxhash.XXHASH_VERSION}")
    print(f"{'tokens/block':>12} {'impl':>8} {'ns/block':>9} {'us/prompt':>10} {'GB/s':>6} "
          f"{'ceiling us':>11} {'ceiling GB/s':>13} {'x ceiling':>10}")
    for tokens_per_block in args.tokens_per_block:
        num_blocks = args.tokens // tokens_per_block
        for impl in (*hash_impls(), None):
            call = functools.partial(hash_blocks, tokens, tokens_per_block, namespace, impl=impl)
            seconds = best_time_s(call, args.seconds)
            print(f"{tokens_per_block:>12} {impl or 'default':>8} {seconds / num_blocks * 1e9:>9.2f} "
                  f"{seconds * 1e6:>10.1f} {len(raw) / seconds / 1e9:>6.1f} {ceiling_s * 1e6:>11.1f} "
                  f"{len(raw) / ceiling_s / 1e9:>13.1f} {seconds / ceiling_s:>10.2f}")


if __name__ == "__main__":
    main()

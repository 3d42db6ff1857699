"""Block hashes: bit-exact with the Python ``xxhash`` package's streaming XXH3-64, on every C implementation.

The reference is the definition itself: one ``xxhash.xxh3_64()`` state, fed the encoded namespace and
then each block's int64 token bytes, ``intdigest()`` after every block.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv.native.hasher import as_token_array, encode_namespace, hash_blocks, hash_impls

IMPLS = hash_impls()


def reference(tokens: npt.NDArray[np.int64], tokens_per_block: int, namespace: bytes = b"") -> list[int]:
    state = xxhash.xxh3_64()
    state.update(namespace)
    raw = tokens.tobytes()
    block_bytes = tokens_per_block * 8
    out = []
    for i in range(len(tokens) // tokens_per_block):
        state.update(raw[i * block_bytes : (i + 1) * block_bytes])
        out.append(state.intdigest())
    return out


def random_tokens(rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
    return rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n, dtype=np.int64)


def assert_matches(tokens: npt.NDArray[np.int64], tokens_per_block: int, namespace: bytes = b"") -> None:
    expected = reference(tokens, tokens_per_block, namespace)
    for impl in (*IMPLS, None):
        got = hash_blocks(tokens, tokens_per_block, namespace, impl=impl)
        assert got.dtype == np.uint64
        assert got.tolist() == expected, f"impl={impl} n={len(tokens)} T={tokens_per_block} ns={len(namespace)}B"


def test_every_cpu_has_a_portable_and_a_default_implementation() -> None:
    assert IMPLS[0] == "scalar"
    assert len(set(IMPLS)) == len(IMPLS)
    with pytest.raises(ValueError, match="unknown hash implementation 'nope'"):
        hash_blocks(np.arange(32, dtype=np.int64), 16, impl="nope")


@pytest.mark.parametrize("tokens_per_block", [1, 2, 3, 7, 8, 16, 30, 31, 64, 128])
def test_random_lengths_match_the_package(tokens_per_block: int) -> None:
    # lengths 0, under one block, exact multiples and ragged tails, around the 240-byte short-input
    # limit and the 1024-byte scramble period of XXH3's long loop
    rng = np.random.default_rng(tokens_per_block)
    lengths = {0, 1, tokens_per_block - 1, tokens_per_block, 29, 30, 31, 127, 128, 129, 1000}
    lengths |= {int(n) for n in rng.integers(0, 3000, size=6)}
    for n in sorted(x for x in lengths if x >= 0):
        assert_matches(random_tokens(rng, n), tokens_per_block)


@pytest.mark.parametrize("prefix_len", [1, 5, 8, 63, 64, 65, 100, 239, 240, 241, 300, 1100])
def test_namespace_bytes_of_any_length_are_fed_first(prefix_len: int) -> None:
    # a prefix that is not a multiple of 64 makes every stripe straddle token boundaries, and one
    # longer than 240 bytes puts whole stripes before the first token
    rng = np.random.default_rng(prefix_len)
    namespace = rng.bytes(prefix_len)
    for tokens_per_block, n in [(1, 40), (3, 101), (16, 700), (64, 1500)]:
        assert_matches(random_tokens(rng, n), tokens_per_block, namespace)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 1200),
    tokens_per_block=st.integers(1, 80),
    parts=st.lists(st.text(max_size=20), max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_any_input_matches_the_package(n: int, tokens_per_block: int, parts: list[str], seed: int) -> None:
    tokens = random_tokens(np.random.default_rng(seed), n)
    assert_matches(tokens, tokens_per_block, encode_namespace(parts))


def test_a_128k_token_prompt_matches_at_16_and_64_tokens_per_block() -> None:
    tokens = random_tokens(np.random.default_rng(7), 128 * 1024 + 5)
    for tokens_per_block in (16, 64):
        assert_matches(tokens, tokens_per_block)


def test_block_hash_names_the_whole_prefix() -> None:
    # a shared prefix gives shared leading hashes; one changed token changes its block and every later one
    rng = np.random.default_rng(3)
    tokens = random_tokens(rng, 160)
    full = hash_blocks(tokens, 16)
    assert hash_blocks(tokens[:80], 16).tolist() == full[:5].tolist()
    changed = tokens.copy()
    changed[50] += 1
    other = hash_blocks(changed, 16)
    assert other[:3].tolist() == full[:3].tolist()
    assert all(a != b for a, b in zip(other[3:], full[3:], strict=True))


def test_namespaces_never_share_hashes() -> None:
    tokens = random_tokens(np.random.default_rng(4), 640)
    namespaces = [None, ["lora-a"], ["lora-b"], ["tenant-1", "lora-a"], ["ab", "c"], ["a", "bc"], [""], ["", ""]]
    seen: dict[int, object] = {}
    for ns in namespaces:
        for h in hash_blocks(tokens, 16, encode_namespace(ns)).tolist():
            assert h not in seen, f"namespace {ns} shares a hash with {seen[h]}"
            seen[h] = ns
    assert len(seen) == len(namespaces) * 40


def test_empty_namespace_is_the_default_namespace() -> None:
    tokens = random_tokens(np.random.default_rng(5), 64)
    assert encode_namespace(None) == encode_namespace([]) == b""
    assert hash_blocks(tokens, 16, encode_namespace([])).tolist() == hash_blocks(tokens, 16).tolist()


def test_namespace_parts_are_length_prefixed() -> None:
    assert encode_namespace(["ab", "c"]) != encode_namespace(["a", "bc"])
    assert encode_namespace(["é"]) == b"\x02\x00\x00\x00\xc3\xa9"
    with pytest.raises(TypeError, match="not a str"):
        encode_namespace("lora")
    with pytest.raises(TypeError, match="parts must be str"):
        encode_namespace(["a", 3])  # type: ignore[list-item]


def test_torch_tensors_hash_like_numpy_arrays() -> None:
    tokens = random_tokens(np.random.default_rng(6), 300)
    expected = hash_blocks(tokens, 16).tolist()
    assert hash_blocks(torch.from_numpy(tokens), 16).tolist() == expected  # type: ignore[arg-type]
    strided = torch.from_numpy(np.repeat(tokens, 2))[::2]  # a non-contiguous view is copied, not misread
    assert not strided.is_contiguous()
    assert hash_blocks(strided, 16).tolist() == expected  # type: ignore[arg-type]
    assert hash_blocks(np.repeat(tokens, 2)[::2], 16).tolist() == expected


@pytest.mark.parametrize(
    ("token_ids", "error", "match"),
    [
        (np.arange(32, dtype=np.int32), TypeError, "must be int64, got int32"),
        (np.arange(32, dtype=np.uint64), TypeError, "must be int64, got uint64"),
        (np.arange(32, dtype=np.float64), TypeError, "must be int64, got float64"),
        (np.zeros((2, 16), dtype=np.int64), ValueError, r"must be 1-D, got shape \(2, 16\)"),
        (list(range(32)), TypeError, "numpy array or torch tensor, got list"),
        (torch.arange(32, dtype=torch.int32), TypeError, "must be int64, got int32"),
        (torch.zeros((2, 16), dtype=torch.int64), ValueError, "must be 1-D"),
        (torch.arange(32, dtype=torch.int64, device="meta"), ValueError, "must be on the CPU, got device meta"),
    ],
)
def test_bad_tokens_raise_errors_naming_the_problem(token_ids: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        hash_blocks(token_ids, 16)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        as_token_array(token_ids)


def test_bad_block_size_or_namespace_raise_errors_naming_the_problem() -> None:
    tokens = np.arange(32, dtype=np.int64)
    with pytest.raises(ValueError, match="tokens_per_block must be positive, got 0"):
        hash_blocks(tokens, 0)
    with pytest.raises(ValueError, match="tokens_per_block must be positive, got -16"):
        hash_blocks(tokens, -16)
    with pytest.raises(TypeError, match="tokens_per_block must be an int, got float"):
        hash_blocks(tokens, 16.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="namespace must be bytes"):
        hash_blocks(tokens, 16, "lora")  # type: ignore[arg-type]
    assert hash_blocks(tokens, np.int64(16)).tolist() == hash_blocks(tokens, 16).tolist()  # type: ignore[arg-type]

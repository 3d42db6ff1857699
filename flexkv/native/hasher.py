"""Chained block hashes over int64 token ids (wraps ``c_src/hasher.c``).

Block i's hash is the XXH3-64 digest of ``namespace || tokens[: (i + 1) * tokens_per_block]``
taken from one streaming state, so equal hashes mean equal prefixes (up to 64-bit collisions).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from flexkv.native._hasher import ffi, lib

HashArray = npt.NDArray[np.uint64]


def encode_namespace(namespace: Sequence[str] | None) -> bytes:
    """Encode a namespace (LoRA name, tenant, cache salt, ...) as the bytes fed before the tokens.

    Each part is length-prefixed so ``["ab", "c"]`` and ``["a", "bc"]`` never collide. An empty or
    missing namespace encodes to ``b""`` (the default namespace).
    """
    if namespace is None:
        return b""
    if isinstance(namespace, str):
        raise TypeError("namespace must be a list of strings, not a str")
    out = bytearray()
    for part in namespace:
        if not isinstance(part, str):
            raise TypeError(f"namespace parts must be str, got {type(part).__name__}")
        raw = part.encode("utf-8")
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def as_token_array(token_ids: object) -> npt.NDArray[np.int64]:
    """Return ``token_ids`` as a contiguous 1-D int64 ndarray without copying when possible.

    Accepts numpy arrays and torch tensors (CPU). Raises TypeError/ValueError naming the problem.
    """
    if hasattr(token_ids, "detach") and hasattr(token_ids, "numpy"):  # torch.Tensor
        device = getattr(token_ids, "device", None)
        if device is not None and str(device) != "cpu":
            raise ValueError(f"token_ids must be on the CPU, got device {device}")
        token_ids = token_ids.detach().numpy()
    if not isinstance(token_ids, np.ndarray):
        raise TypeError(f"token_ids must be a numpy array or torch tensor, got {type(token_ids).__name__}")
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {token_ids.shape}")
    if token_ids.dtype != np.int64:
        raise TypeError(f"token_ids must be int64, got {token_ids.dtype}")
    return np.ascontiguousarray(token_ids)


def hash_impls() -> tuple[str, ...]:
    """Names of the C implementations this CPU can run, slowest first (the last one is the default).

    All of them give identical output; tests and ``benchmarks/hashing.py`` use this to cover each.
    """
    names = []
    impl = 0
    while (name := lib.flexkv_hash_impl_name(impl)) != ffi.NULL:
        if lib.flexkv_hash_impl_supported(impl) == 1:
            names.append(ffi.string(name).decode())
        impl += 1
    return tuple(names)


def _impl_number(impl: str) -> int:
    number = 0
    while (name := lib.flexkv_hash_impl_name(number)) != ffi.NULL:
        if ffi.string(name).decode() == impl:
            return number
        number += 1
    raise ValueError(f"unknown hash implementation {impl!r}; this build has {hash_impls()} on this CPU")


def hash_blocks(
    token_ids: npt.NDArray[np.int64], tokens_per_block: int, namespace: bytes = b"", *, impl: str | None = None
) -> HashArray:
    """Hashes of every whole block of ``token_ids`` (the trailing partial block is ignored).

    ``namespace`` is the output of :func:`encode_namespace`. ``impl`` picks one implementation by
    name (see :func:`hash_impls`; default: the fastest this CPU runs). Pure function; runs in any
    process. Raises TypeError/ValueError for bad input, OSError if the C code rejects it.
    """
    tokens = as_token_array(token_ids)
    if isinstance(tokens_per_block, bool) or not isinstance(tokens_per_block, int | np.integer):
        raise TypeError(f"tokens_per_block must be an int, got {type(tokens_per_block).__name__}")
    if tokens_per_block <= 0:
        raise ValueError(f"tokens_per_block must be positive, got {tokens_per_block}")
    if not isinstance(namespace, bytes):
        raise TypeError(f"namespace must be bytes (see encode_namespace), got {type(namespace).__name__}")
    num_blocks = tokens.shape[0] // tokens_per_block
    out = np.empty(num_blocks, dtype=np.uint64)
    tok_ptr = ffi.from_buffer("int64_t[]", tokens) if tokens.size else ffi.NULL
    out_ptr = ffi.from_buffer("uint64_t[]", out, require_writable=True) if num_blocks else ffi.NULL
    ns_ptr = ffi.from_buffer("uint8_t[]", namespace) if namespace else ffi.NULL
    args = (tok_ptr, tokens.shape[0], int(tokens_per_block), ns_ptr, len(namespace), out_ptr)
    if impl is None:
        rc = lib.flexkv_hash_blocks(*args)
    else:
        rc = lib.flexkv_hash_blocks_impl(_impl_number(impl), *args)
    if rc < 0:
        raise OSError(-rc, f"flexkv_hash_blocks: {os.strerror(-rc)}")
    assert rc == num_blocks
    return out

"""cffi build script (API mode, out-of-line) for the block hasher -> flexkv.native._hasher."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int64_t flexkv_hash_blocks(const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
                               const uint8_t *prefix, size_t prefix_len, uint64_t *out);
    int64_t flexkv_hash_blocks_impl(int impl, const int64_t *tokens, size_t num_tokens, size_t tokens_per_block,
                                    const uint8_t *prefix, size_t prefix_len, uint64_t *out);
    const char *flexkv_hash_impl_name(int impl);
    int flexkv_hash_impl_supported(int impl);
    """
)
ffibuilder.set_source(
    "flexkv.native._hasher",
    '#include "hasher.h"',
    sources=[os.path.join(HERE, "hasher.c")],
    include_dirs=[HERE],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

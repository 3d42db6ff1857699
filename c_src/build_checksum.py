"""cffi build script (API mode, out-of-line) for block checksums -> flexkv.native._checksum."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define FLEXKV_CHECKSUM_MAX_THREADS 64
    int flexkv_checksum_blocks(const uint64_t *addrs, size_t n, uint64_t len, const uint64_t *seeds,
                               uint64_t *out, uint32_t num_threads, uint64_t parallel_bytes);
    int64_t flexkv_checksum_verify(const uint64_t *addrs, size_t n, uint64_t len, const uint64_t *seeds,
                                   const uint64_t *expected, uint32_t num_threads, uint64_t parallel_bytes);
    """
)
ffibuilder.set_source(
    "flexkv.native._checksum",
    '#include "checksum.h"',
    sources=[os.path.join(HERE, "checksum.c")],
    include_dirs=[HERE],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

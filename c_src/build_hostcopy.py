"""cffi build script (API mode, out-of-line) for the host copy engine -> flexkv.native._hostcopy."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define FLEXKV_COPY_TO_POOL ...
    #define FLEXKV_COPY_FROM_POOL ...
    #define FLEXKV_HOSTCOPY_MIN_BYTES_PER_THREAD ...
    #define FLEXKV_HOSTCOPY_MAX_THREADS ...
    #define FLEXKV_HOSTCOPY_STREAM_MIN_BYTES ...
    int flexkv_host_copy(int direction, const uint64_t *engine_bases, size_t num_chunks,
                         uint64_t engine_block_stride, int64_t engine_num_blocks, uint8_t *pool_base,
                         uint64_t pool_block_bytes, const uint64_t *pool_chunk_offsets, int64_t pool_num_blocks,
                         uint64_t chunk_bytes, const int64_t *engine_ids, const int64_t *pool_ids,
                         size_t num_blocks, int num_threads);
    """
)
ffibuilder.set_source(
    "flexkv.native._hostcopy",
    '#include "hostcopy.h"',
    sources=[os.path.join(HERE, "hostcopy.c")],
    include_dirs=[HERE],
    depends=[os.path.join(HERE, "hostcopy.h")],  # rebuild when only the header changes
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

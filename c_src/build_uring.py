"""cffi build script (API mode, out-of-line) for the io_uring block I/O engine -> flexkv.native._uring."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define FLEXKV_URING_READ ...
    #define FLEXKV_URING_WRITE ...
    #define FLEXKV_URING_FIXED_FILE ...
    #define FLEXKV_URING_MAX_DEPTH ...
    struct flexkv_uring;
    int flexkv_uring_create(uint32_t depth, uint32_t setup_flags, struct flexkv_uring **out);
    void flexkv_uring_destroy(struct flexkv_uring *ring);
    int flexkv_uring_register_files(struct flexkv_uring *ring, const int *fds, uint32_t n);
    int flexkv_uring_unregister_files(struct flexkv_uring *ring);
    int64_t flexkv_uring_rw(struct flexkv_uring *ring, uint32_t op, size_t n, const int *fds,
                            const uint64_t *offsets, const uint64_t *addrs, uint64_t len, int32_t *results);
    """
)
ffibuilder.set_source(
    "flexkv.native._uring",
    '#include "uring.h"',
    sources=[os.path.join(HERE, "uring.c")],
    include_dirs=[HERE],
    libraries=["uring"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

/* Block I/O engine on io_uring: whole batches of reads/writes between memory and (fd, offset). */
#ifndef FLEXKV_URING_H
#define FLEXKV_URING_H
#include <stddef.h>
#include <stdint.h>

/* `op` bits of flexkv_uring_rw(). */
#define FLEXKV_URING_READ 0u
#define FLEXKV_URING_WRITE 1u
#define FLEXKV_URING_FIXED_FILE 2u /* fds[] are indices into the registered file table */

#define FLEXKV_URING_MAX_DEPTH 32768u

struct flexkv_uring;

/*
 * Create an engine: one ring of `depth` submission entries (1..FLEXKV_URING_MAX_DEPTH) plus
 * `depth` I/O contexts, allocated here once. `setup_flags` are IORING_SETUP_* flags passed to the
 * kernel unchanged (0 is the usual choice). On success stores the handle in *out and returns 0,
 * else -EINVAL / -ENOMEM / the kernel's -errno (e.g. -ENOSYS or -EPERM where io_uring is off).
 */
int flexkv_uring_create(uint32_t depth, uint32_t setup_flags, struct flexkv_uring **out);

/* Free the engine and close its ring. NULL is accepted. */
void flexkv_uring_destroy(struct flexkv_uring *ring);

/* Register `n` file descriptors so FLEXKV_URING_FIXED_FILE requests can name them by index. */
int flexkv_uring_register_files(struct flexkv_uring *ring, const int *fds, uint32_t n);

/* Drop the registered file table (no-op returning 0 when none is registered). */
int flexkv_uring_unregister_files(struct flexkv_uring *ring);

/*
 * Run a whole batch to completion: request i moves `len` bytes between memory at addrs[i] and
 * file fds[i] at offsets[i] (read: file -> memory; write: memory -> file). Up to `depth` requests
 * are in flight at once; short transfers are resubmitted for their remainder, -EAGAIN/-EINTR
 * completions are retried a bounded number of times.
 *
 * results[i] is set for every request: 0 when all `len` bytes moved, else a negative errno
 * (-ENODATA: a read hit end of file; -EIO: a write made no progress; -EBADF: bad fd or index;
 * anything the kernel reported, e.g. -EINVAL for O_DIRECT misalignment, -ENOSPC, -EIO).
 *
 * Returns the number of failed requests (>= 0), or a negative errno when the engine itself failed
 * (bad arguments: -EINVAL, nothing was submitted; a failed io_uring_enter: the engine is marked
 * broken, some results are unset, and it must be destroyed). Blocking; one thread per engine.
 */
int64_t flexkv_uring_rw(struct flexkv_uring *ring, uint32_t op, size_t n, const int *fds,
			const uint64_t *offsets, const uint64_t *addrs, uint64_t len, int32_t *results);

#endif

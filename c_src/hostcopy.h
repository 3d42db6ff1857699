/* Host copy engine: scatter/gather KV chunks between engine tensors and a block-first pool in host memory. */
#ifndef FLEXKV_HOSTCOPY_H
#define FLEXKV_HOSTCOPY_H
#include <stddef.h>
#include <stdint.h>

/* Engine -> pool (D2H / put). */
#define FLEXKV_COPY_TO_POOL 0
/* Pool -> engine (H2D / get). */
#define FLEXKV_COPY_FROM_POOL 1

/* Below this many bytes per thread extra threads cost more than they save; see flexkv_host_copy. */
#define FLEXKV_HOSTCOPY_MIN_BYTES_PER_THREAD (1u << 20)
#define FLEXKV_HOSTCOPY_MAX_THREADS 64
/* From this many bytes per call, long segments use non-temporal stores (x86-64): the result is not in cache. */
#define FLEXKV_HOSTCOPY_STREAM_MIN_BYTES (1u << 20)

/*
 * For each i < num_blocks and each c < num_chunks (= num_layers * kv_dim):
 *   engine chunk at engine_bases[c] + engine_ids[i] * engine_block_stride
 *   pool chunk   at pool_base + pool_ids[i] * pool_block_bytes + pool_chunk_offsets[c]
 * copy chunk_bytes, from engine to pool (direction 0) or pool to engine (direction 1).
 *
 * Every id is range-checked against engine_num_blocks / pool_num_blocks first: -ERANGE and nothing is
 * copied. -EINVAL for a bad direction, thread count, NULL array, zero chunk_bytes, an engine stride
 * smaller than a chunk, or a pool chunk that does not fit inside its block. Chunks that are adjacent on
 * both sides (consecutive ids, K and V side by side) are merged into one copy. Calls of at least
 * FLEXKV_HOSTCOPY_STREAM_MIN_BYTES write with non-temporal stores (fenced before returning).
 * Work is split over up to num_threads threads (the caller is one of them; 1..FLEXKV_HOSTCOPY_MAX_THREADS),
 * each given at least FLEXKV_HOSTCOPY_MIN_BYTES_PER_THREAD; threads are started per call (~20 us each)
 * and a thread that cannot be started has its share done by the caller. Blocks must not overlap on the
 * destination side. Returns 0 or -errno.
 */
int flexkv_host_copy(int direction, const uint64_t *engine_bases, size_t num_chunks, uint64_t engine_block_stride,
		     int64_t engine_num_blocks, uint8_t *pool_base, uint64_t pool_block_bytes,
		     const uint64_t *pool_chunk_offsets, int64_t pool_num_blocks, uint64_t chunk_bytes,
		     const int64_t *engine_ids, const int64_t *pool_ids, size_t num_blocks, int num_threads);

#endif

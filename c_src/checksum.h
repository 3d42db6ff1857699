/* Block checksums: XXH3-64 of each block's bytes, seeded per block, over several threads. */
#ifndef FLEXKV_CHECKSUM_H
#define FLEXKV_CHECKSUM_H
#include <stddef.h>
#include <stdint.h>

#define FLEXKV_CHECKSUM_MAX_THREADS 64

/*
 * out[i] = XXH3_64bits_withSeed(addrs[i], len, seeds[i]) for every i < n. Batches of at least
 * `parallel_bytes` in total are split over up to `num_threads` threads (1 = the calling thread
 * only). Returns 0, or -EINVAL (num_threads outside 1..FLEXKV_CHECKSUM_MAX_THREADS, a NULL array
 * with n > 0). A thread that cannot be started leaves its share to the calling thread.
 */
int flexkv_checksum_blocks(const uint64_t *addrs, size_t n, uint64_t len, const uint64_t *seeds, uint64_t *out,
			   uint32_t num_threads, uint64_t parallel_bytes);

/*
 * Like flexkv_checksum_blocks, but compares with expected[]: returns the index of the first block
 * whose checksum differs (n when all match) or -EINVAL.
 */
int64_t flexkv_checksum_verify(const uint64_t *addrs, size_t n, uint64_t len, const uint64_t *seeds,
			       const uint64_t *expected, uint32_t num_threads, uint64_t parallel_bytes);

#endif

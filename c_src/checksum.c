/*
 * Block checksums for the SSD tier (see checksum.h). One XXH3-64 per block, seeded with the
 * block's hash so a slot holding another block's bytes never verifies. XXH3 runs at memory speed
 * on one core; threads only help when a batch is large and several cores are free.
 */
#define XXH_INLINE_ALL
#include <errno.h>
#include <pthread.h>
#include <xxhash.h>

#include "checksum.h"

struct share {
	const uint64_t *addrs;
	const uint64_t *seeds;
	uint64_t *out;
	size_t begin;
	size_t end;
	uint64_t len;
};

static void hash_range(const struct share *s)
{
	for (size_t i = s->begin; i < s->end; i++)
		s->out[i] = XXH3_64bits_withSeed((const void *)(uintptr_t)s->addrs[i], s->len, s->seeds[i]);
}

static void *hash_thread(void *arg)
{
	hash_range(arg);
	return NULL;
}

int flexkv_checksum_blocks(const uint64_t *addrs, size_t n, uint64_t len, const uint64_t *seeds, uint64_t *out,
			   uint32_t num_threads, uint64_t parallel_bytes)
{
	struct share shares[FLEXKV_CHECKSUM_MAX_THREADS];
	pthread_t threads[FLEXKV_CHECKSUM_MAX_THREADS];
	int started[FLEXKV_CHECKSUM_MAX_THREADS] = {0};

	if (num_threads < 1 || num_threads > FLEXKV_CHECKSUM_MAX_THREADS)
		return -EINVAL;
	if (n == 0)
		return 0;
	if (!addrs || !seeds || !out)
		return -EINVAL;
	if ((uint64_t)n * len < parallel_bytes || n < 2)
		num_threads = 1;
	if (num_threads > n)
		num_threads = (uint32_t)n;
	for (uint32_t t = 0; t < num_threads; t++) {
		shares[t] = (struct share){addrs, seeds, out, n * t / num_threads, n * (t + 1) / num_threads, len};
		if (t > 0)
			started[t] = pthread_create(&threads[t], NULL, hash_thread, &shares[t]) == 0;
	}
	hash_range(&shares[0]);
	for (uint32_t t = 1; t < num_threads; t++) {
		if (started[t])
			pthread_join(threads[t], NULL);
		else
			hash_range(&shares[t]);
	}
	return 0;
}

int64_t flexkv_checksum_verify(const uint64_t *addrs, size_t n, uint64_t len, const uint64_t *seeds,
			       const uint64_t *expected, uint32_t num_threads, uint64_t parallel_bytes)
{
	/* Small stack chunks keep this allocation-free; each chunk may still fan out over threads. */
	enum { CHUNK = 256 };
	uint64_t got[CHUNK];

	if (num_threads < 1 || num_threads > FLEXKV_CHECKSUM_MAX_THREADS || (n > 0 && !expected))
		return -EINVAL;
	for (size_t base = 0; base < n; base += CHUNK) {
		size_t m = n - base < CHUNK ? n - base : CHUNK;
		int rc = flexkv_checksum_blocks(addrs + base, m, len, seeds + base, got, num_threads, parallel_bytes);

		if (rc < 0)
			return rc;
		for (size_t i = 0; i < m; i++)
			if (got[i] != expected[base + i])
				return (int64_t)(base + i);
	}
	return (int64_t)n;
}

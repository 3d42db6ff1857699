/*
 * Host copy engine: move KV chunks between an engine's tensors and flexkv's block-first pool, both in
 * host memory. The caller's thread does one share of the blocks and short-lived pthreads do the rest;
 * runs of chunks that are adjacent on both sides are merged into one copy. Large jobs use streaming
 * (non-temporal) stores on x86-64: the destination is not read back soon, and skipping the
 * read-for-ownership of every destination line measured ~20% faster per thread than memcpy.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "hostcopy.h"

/* Segments shorter than this go through memcpy even in a streaming job. */
#define STREAM_MIN_SEG_BYTES 4096

struct copy_job {
	int direction;
	int streaming; /* non-temporal stores for long segments */
	const uint64_t *engine_bases;
	size_t num_chunks;
	uint64_t engine_block_stride;
	uint8_t *pool_base;
	uint64_t pool_block_bytes;
	const uint64_t *pool_chunk_offsets;
	uint64_t chunk_bytes;
	const int64_t *engine_ids;
	const int64_t *pool_ids;
};

/* One thread's share: blocks [begin, end) of the job. */
struct copy_part {
	const struct copy_job *job;
	size_t begin;
	size_t end;
};

/* A pending copy that grows while the next chunk continues it on both sides. */
struct copy_seg {
	uint8_t *engine;
	uint8_t *pool;
	size_t len;
};

#if defined(__x86_64__)
/* memcpy with 16-byte non-temporal stores (SSE2 is part of x86-64); the caller fences. */
static void stream_copy(uint8_t *dst, const uint8_t *src, size_t len)
{
	const size_t head = (16 - ((uintptr_t)dst & 15)) & 15;

	memcpy(dst, src, head);
	dst += head;
	src += head;
	len -= head;
	for (; len >= 64; len -= 64, src += 64, dst += 64) {
		__m128i a = _mm_loadu_si128((const __m128i *)src);
		__m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
		__m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
		__m128i d = _mm_loadu_si128((const __m128i *)(src + 48));

		_mm_stream_si128((__m128i *)dst, a);
		_mm_stream_si128((__m128i *)(dst + 16), b);
		_mm_stream_si128((__m128i *)(dst + 32), c);
		_mm_stream_si128((__m128i *)(dst + 48), d);
	}
	memcpy(dst, src, len);
}
#endif

static void copy_bytes(int streaming, uint8_t *dst, const uint8_t *src, size_t len)
{
#if defined(__x86_64__)
	if (streaming && len >= STREAM_MIN_SEG_BYTES) {
		stream_copy(dst, src, len);
		return;
	}
#endif
	(void)streaming;
	memcpy(dst, src, len);
}

static void flush_seg(const struct copy_job *job, const struct copy_seg *seg)
{
	if (!seg->len)
		return;
	if (job->direction == FLEXKV_COPY_TO_POOL)
		copy_bytes(job->streaming, seg->pool, seg->engine, seg->len);
	else
		copy_bytes(job->streaming, seg->engine, seg->pool, seg->len);
}

static void copy_range(const struct copy_job *job, size_t begin, size_t end)
{
	struct copy_seg seg = { NULL, NULL, 0 };
	const size_t len = (size_t)job->chunk_bytes;
	size_t i, c;

	for (i = begin; i < end; i++) {
		const uint64_t engine_off = (uint64_t)job->engine_ids[i] * job->engine_block_stride;
		uint8_t *pool_block = job->pool_base + (uint64_t)job->pool_ids[i] * job->pool_block_bytes;

		for (c = 0; c < job->num_chunks; c++) {
			uint8_t *engine = (uint8_t *)(uintptr_t)(job->engine_bases[c] + engine_off);
			uint8_t *pool = pool_block + job->pool_chunk_offsets[c];

			if (seg.len && engine == seg.engine + seg.len && pool == seg.pool + seg.len) {
				seg.len += len;
				continue;
			}
			flush_seg(job, &seg);
			seg.engine = engine;
			seg.pool = pool;
			seg.len = len;
		}
	}
	flush_seg(job, &seg);
#if defined(__x86_64__)
	if (job->streaming)
		_mm_sfence(); /* streaming stores are weakly ordered: make them visible before we report done */
#endif
}

static void *copy_part_main(void *arg)
{
	const struct copy_part *part = arg;

	copy_range(part->job, part->begin, part->end);
	return NULL;
}

static int check_ids(const int64_t *ids, size_t n, int64_t limit)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= limit)
			return -ERANGE;
	return 0;
}

static int check_pool_offsets(const uint64_t *offsets, size_t n, uint64_t chunk_bytes, uint64_t block_bytes)
{
	size_t c;

	if (chunk_bytes > block_bytes)
		return -EINVAL;
	for (c = 0; c < n; c++)
		if (offsets[c] > block_bytes - chunk_bytes)
			return -EINVAL;
	return 0;
}

/* How many threads are worth starting: at least MIN_BYTES_PER_THREAD each, at most one per block. */
static size_t count_parts(uint64_t total, size_t num_blocks, int num_threads)
{
	uint64_t parts = total / FLEXKV_HOSTCOPY_MIN_BYTES_PER_THREAD;

	if (parts > (uint64_t)num_threads)
		parts = (uint64_t)num_threads;
	if (parts > num_blocks)
		parts = num_blocks;
	return parts ? (size_t)parts : 1;
}

static void run_parts(const struct copy_job *job, size_t num_blocks, size_t num_parts)
{
	struct copy_part parts[FLEXKV_HOSTCOPY_MAX_THREADS];
	pthread_t threads[FLEXKV_HOSTCOPY_MAX_THREADS];
	int started[FLEXKV_HOSTCOPY_MAX_THREADS];
	size_t p;

	for (p = 0; p < num_parts; p++) {
		parts[p].job = job;
		parts[p].begin = num_blocks * p / num_parts;
		parts[p].end = num_blocks * (p + 1) / num_parts;
	}
	for (p = 1; p < num_parts; p++)
		started[p] = pthread_create(&threads[p], NULL, copy_part_main, &parts[p]) == 0;
	copy_range(job, parts[0].begin, parts[0].end);
	for (p = 1; p < num_parts; p++) {
		if (started[p])
			pthread_join(threads[p], NULL);
		else /* no thread to spare: do its share here */
			copy_range(job, parts[p].begin, parts[p].end);
	}
}

int flexkv_host_copy(int direction, const uint64_t *engine_bases, size_t num_chunks, uint64_t engine_block_stride,
		     int64_t engine_num_blocks, uint8_t *pool_base, uint64_t pool_block_bytes,
		     const uint64_t *pool_chunk_offsets, int64_t pool_num_blocks, uint64_t chunk_bytes,
		     const int64_t *engine_ids, const int64_t *pool_ids, size_t num_blocks, int num_threads)
{
	struct copy_job job = {
		.direction = direction,
		.engine_bases = engine_bases,
		.num_chunks = num_chunks,
		.engine_block_stride = engine_block_stride,
		.pool_base = pool_base,
		.pool_block_bytes = pool_block_bytes,
		.pool_chunk_offsets = pool_chunk_offsets,
		.chunk_bytes = chunk_bytes,
		.engine_ids = engine_ids,
		.pool_ids = pool_ids,
	};
	uint64_t total;
	int ret;

	if (direction != FLEXKV_COPY_TO_POOL && direction != FLEXKV_COPY_FROM_POOL)
		return -EINVAL;
	if (num_threads < 1 || num_threads > FLEXKV_HOSTCOPY_MAX_THREADS || chunk_bytes == 0)
		return -EINVAL;
	if (num_blocks == 0 || num_chunks == 0)
		return 0;
	if (!engine_bases || !pool_base || !pool_chunk_offsets || !engine_ids || !pool_ids)
		return -EINVAL;
	if (engine_block_stride < chunk_bytes)
		return -EINVAL;
	ret = check_pool_offsets(pool_chunk_offsets, num_chunks, chunk_bytes, pool_block_bytes);
	if (ret)
		return ret;
	ret = check_ids(engine_ids, num_blocks, engine_num_blocks);
	if (!ret)
		ret = check_ids(pool_ids, num_blocks, pool_num_blocks);
	if (ret)
		return ret;
	total = (uint64_t)num_blocks * num_chunks * chunk_bytes;
	job.streaming = total >= FLEXKV_HOSTCOPY_STREAM_MIN_BYTES;
	run_parts(&job, num_blocks, count_parts(total, num_blocks, num_threads));
	return 0;
}

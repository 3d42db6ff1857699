/*
 * CUDA copy engine for flexkv (see cudacopy.h and docs/gpu.md). Library loading, CUDA errors and the
 * engine-less helpers (registration, IPC, events) live in cuda_runtime.c.
 *
 * Three paths move (engine chunk <-> pool chunk) pairs:
 *   BATCH  - coalesce adjacent runs, then cudaMemcpyBatchAsync (or cudaMemcpyAsync per run).
 *   STAGED - a gather/scatter kernel packs the engine's chunks into a device staging buffer in
 *            block-first order; whole shard blocks then cross PCIe with the batch API. Two staging
 *            halves and a second stream overlap the kernels with the DMA.
 *   KERNEL - one SM copy kernel reads/writes the registered host pool directly.
 * Every copy is enqueued on the engine's own non-blocking stream; work on the helper kernel stream
 * is always joined back into it, so synchronizing or recording an event on the main stream covers
 * everything a call enqueued.
 */
#define _GNU_SOURCE
#include "cudacopy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define FKV_BATCH_MAX 1024
#define FKV_RING 4
#define FKV_PROF_MAX 256
#define FKV_THREADS 512
#define FKV_DEFAULT_CTAS 64

/* ---------------------------------------------------------------- engine state */

struct fkv_desc_slot {
	void *host;       /* pinned, uploaded to dev on the main stream */
	void *dev;
	size_t cap;
	cuda_event_t done; /* recorded on the main stream when the call using this slot ends */
};

struct fkv_engine {
	int device;
	cuda_stream_t stream;  /* every copy and the join of all work */
	cuda_stream_t kstream; /* STAGED gather/scatter kernels */
	struct fkv_engine_info info;
	struct cuda_memcpy_attrs attrs;
	void *dsts[FKV_BATCH_MAX];
	void *srcs[FKV_BATCH_MAX];
	size_t sizes[FKV_BATCH_MAX];
	size_t num_batched;
	uint64_t run_dst, run_src, run_bytes; /* the run being coalesced */
	uint64_t piece_base, piece_bytes;     /* registration pieces of the pool: runs never span two */
	void *staging;
	cuda_event_t ev_up, ev_dma[2], ev_kern[2];
	struct fkv_desc_slot ring[FKV_RING];
	unsigned int ring_next;
	cu_module_t module;
	cu_function_t fn_copy;
	uint32_t kernel_ctas;
	int profile;
	cuda_event_t prof_ev[FKV_PROF_MAX][2];
	uint32_t prof_ctas[FKV_PROF_MAX];
	unsigned int prof_n;
	struct fkv_engine_stats stats;
};

static int engine_events(struct fkv_engine *e, struct fkv_err *err)
{
	const unsigned int fl = CUDA_EVENT_DISABLE_TIMING;
	int i;

	RT("cudaEventCreateWithFlags", cu.EventCreateWithFlags(&e->ev_up, fl));
	for (i = 0; i < 2; i++) {
		RT("cudaEventCreateWithFlags", cu.EventCreateWithFlags(&e->ev_dma[i], fl));
		RT("cudaEventCreateWithFlags", cu.EventCreateWithFlags(&e->ev_kern[i], fl));
	}
	for (i = 0; i < FKV_RING; i++)
		RT("cudaEventCreateWithFlags", cu.EventCreateWithFlags(&e->ring[i].done, fl));
	for (i = 0; i < FKV_PROF_MAX; i++) {
		RT("cudaEventCreateWithFlags", cu.EventCreateWithFlags(&e->prof_ev[i][0], 0));
		RT("cudaEventCreateWithFlags", cu.EventCreateWithFlags(&e->prof_ev[i][1], 0));
	}
	return 0;
}

static int engine_query(struct fkv_engine *e, struct fkv_err *err)
{
	struct fkv_engine_info *in = &e->info;
	int d = e->device;

	in->device = d;
	in->runtime_version = cu.runtime_version;
	RT("cudaDriverGetVersion", cu.DriverGetVersion(&in->driver_version));
	RT("cudaDeviceGetAttribute", cu.DeviceGetAttribute(&in->num_sms, CUDA_ATTR_MULTIPROCESSOR_COUNT, d));
	RT("cudaDeviceGetAttribute", cu.DeviceGetAttribute(&in->cc_major, CUDA_ATTR_CC_MAJOR, d));
	RT("cudaDeviceGetAttribute", cu.DeviceGetAttribute(&in->cc_minor, CUDA_ATTR_CC_MINOR, d));
	RT("cudaDeviceGetAttribute",
	   cu.DeviceGetAttribute(&in->host_ptr_registered, CUDA_ATTR_HOST_PTR_FOR_REGISTERED, d));
	in->has_batch_api = cu.MemcpyBatchAsync_v12 || cu.MemcpyBatchAsync_v13;
	return 0;
}

static int engine_init(struct fkv_engine *e, struct fkv_err *err)
{
	int rc;

	RT("cudaSetDevice", cu.SetDevice(e->device));
	RT("cudaFree(0)", cu.Free(NULL)); /* makes the primary context current for the driver API */
	rc = engine_query(e, err);
	if (rc)
		return rc;
	RT("cudaStreamCreateWithFlags", cu.StreamCreateWithFlags(&e->stream, CUDA_STREAM_NON_BLOCKING));
	RT("cudaStreamCreateWithFlags", cu.StreamCreateWithFlags(&e->kstream, CUDA_STREAM_NON_BLOCKING));
	rc = engine_events(e, err);
	if (rc)
		return rc;
	e->attrs.src_access_order = CUDA_SRC_ACCESS_ORDER_STREAM;
	e->kernel_ctas = FKV_DEFAULT_CTAS;
	if (e->info.staging_bytes) {
		RT("cudaMalloc(staging)", cu.Malloc(&e->staging, e->info.staging_bytes));
	}
	return 0;
}

int fkv_engine_create(int device, uint64_t staging_bytes, struct fkv_engine **out, struct fkv_err *err)
{
	struct fkv_engine *e;
	int rc;

	NEED_LOADED();
	if (!out || device < 0)
		return -EINVAL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->device = device;
	e->info.staging_bytes = staging_bytes & ~(uint64_t)0xFFF;
	rc = engine_init(e, err);
	if (rc) {
		fkv_engine_destroy(e, NULL);
		return rc;
	}
	*out = e;
	return 0;
}

static void destroy_event(cuda_event_t ev)
{
	if (ev)
		cu.EventDestroy(ev);
}

int fkv_engine_destroy(struct fkv_engine *e, struct fkv_err *err)
{
	int i, rc = 0;

	if (!e)
		return 0;
	cu.SetDevice(e->device);
	if (e->stream && cu.StreamSynchronize(e->stream) != 0)
		rc = fail(err, cu.GetLastError(), 0, "cudaStreamSynchronize");
	if (e->kstream)
		cu.StreamSynchronize(e->kstream);
	for (i = 0; i < FKV_RING; i++) {
		if (e->ring[i].host)
			cu.HostUnregister(e->ring[i].host);
		free(e->ring[i].host);
		if (e->ring[i].dev)
			cu.Free(e->ring[i].dev);
		destroy_event(e->ring[i].done);
	}
	for (i = 0; i < FKV_PROF_MAX; i++) {
		destroy_event(e->prof_ev[i][0]);
		destroy_event(e->prof_ev[i][1]);
	}
	for (i = 0; i < 2; i++) {
		destroy_event(e->ev_dma[i]);
		destroy_event(e->ev_kern[i]);
	}
	destroy_event(e->ev_up);
	if (e->staging)
		cu.Free(e->staging);
	if (e->module)
		cu.cuModuleUnload(e->module);
	if (e->stream)
		cu.StreamDestroy(e->stream);
	if (e->kstream)
		cu.StreamDestroy(e->kstream);
	cu.GetLastError();
	free(e);
	return rc;
}

int fkv_engine_load_kernels(struct fkv_engine *e, const char *ptx, struct fkv_err *err)
{
	if (!e || !ptx)
		return -EINVAL;
	RT("cudaSetDevice", cu.SetDevice(e->device));
	if (e->module)
		return 0;
	DRV("cuModuleLoadData", cu.cuModuleLoadData(&e->module, ptx));
	DRV("cuModuleGetFunction(fkv_copy_chunks)", cu.cuModuleGetFunction(&e->fn_copy, e->module, "fkv_copy_chunks"));
	e->info.has_kernels = 1;
	return 0;
}

int fkv_engine_get_info(struct fkv_engine *e, struct fkv_engine_info *out)
{
	if (!e || !out)
		return -EINVAL;
	*out = e->info;
	return 0;
}

int fkv_engine_set_profile(struct fkv_engine *e, int on, uint32_t kernel_ctas)
{
	if (!e)
		return -EINVAL;
	e->profile = on;
	if (kernel_ctas)
		e->kernel_ctas = kernel_ctas;
	return 0;
}

static int flush_profile(struct fkv_engine *e, struct fkv_err *err)
{
	unsigned int i;
	float ms;

	for (i = 0; i < e->prof_n; i++) {
		RT("cudaEventSynchronize", cu.EventSynchronize(e->prof_ev[i][1]));
		RT("cudaEventElapsedTime", cu.EventElapsedTime(&ms, e->prof_ev[i][0], e->prof_ev[i][1]));
		e->stats.kernel_ms += ms;
		e->stats.cta_ms += ms * (double)e->prof_ctas[i];
	}
	e->prof_n = 0;
	return 0;
}

int fkv_engine_get_stats(struct fkv_engine *e, struct fkv_engine_stats *out, struct fkv_err *err)
{
	int rc;

	if (!e || !out)
		return -EINVAL;
	RT("cudaSetDevice", cu.SetDevice(e->device));
	rc = flush_profile(e, err);
	if (rc)
		return rc;
	*out = e->stats;
	memset(&e->stats, 0, sizeof(e->stats));
	return 0;
}

int fkv_engine_wait_event(struct fkv_engine *e, uintptr_t event, struct fkv_err *err)
{
	if (!e || !event)
		return -EINVAL;
	RT("cudaSetDevice", cu.SetDevice(e->device));
	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->stream, (cuda_event_t)event, 0));
	return 0;
}

int fkv_engine_record_event(struct fkv_engine *e, uintptr_t event, struct fkv_err *err)
{
	if (!e || !event)
		return -EINVAL;
	RT("cudaSetDevice", cu.SetDevice(e->device));
	RT("cudaEventRecord", cu.EventRecord((cuda_event_t)event, e->stream));
	return 0;
}

int fkv_engine_synchronize(struct fkv_engine *e, struct fkv_err *err)
{
	if (!e)
		return -EINVAL;
	RT("cudaSetDevice", cu.SetDevice(e->device));
	RT("cudaStreamSynchronize", cu.StreamSynchronize(e->stream));
	return 0;
}

uintptr_t fkv_engine_stream(struct fkv_engine *e)
{
	return e ? (uintptr_t)e->stream : 0;
}

/* ---------------------------------------------------------------- BATCH: coalesce + batch API */

static int issue_batch(struct fkv_engine *e, struct fkv_err *err)
{
	size_t n = e->num_batched, i, idx0 = 0, fail_idx = 0;

	if (n == 0)
		return 0;
	e->num_batched = 0;
	e->stats.num_copies += n;
	if (cu.MemcpyBatchAsync_v13) {
		e->stats.num_batch_calls++;
		RT("cudaMemcpyBatchAsync", cu.MemcpyBatchAsync_v13(e->dsts, (const void *const *)e->srcs, e->sizes, n,
								    &e->attrs, &idx0, 1, e->stream));
		return 0;
	}
	if (cu.MemcpyBatchAsync_v12) {
		e->stats.num_batch_calls++;
		RT("cudaMemcpyBatchAsync", cu.MemcpyBatchAsync_v12(e->dsts, e->srcs, e->sizes, n, &e->attrs, &idx0, 1,
								    &fail_idx, e->stream));
		return 0;
	}
	for (i = 0; i < n; i++)
		RT("cudaMemcpyAsync",
		   cu.MemcpyAsync(e->dsts[i], e->srcs[i], e->sizes[i], CUDA_MEMCPY_DEFAULT, e->stream));
	return 0;
}

static int flush_run(struct fkv_engine *e, struct fkv_err *err)
{
	if (e->run_bytes == 0)
		return 0;
	e->dsts[e->num_batched] = (void *)(uintptr_t)e->run_dst;
	e->srcs[e->num_batched] = (void *)(uintptr_t)e->run_src;
	e->sizes[e->num_batched] = e->run_bytes;
	e->num_batched++;
	e->run_bytes = 0;
	return e->num_batched == FKV_BATCH_MAX ? issue_batch(e, err) : 0;
}

/* A DMA spanning two separately registered host ranges is refused by CUDA (invalid argument). */
static int spans_pieces(const struct fkv_engine *e, uint64_t start, uint64_t end)
{
	if (!e->piece_bytes)
		return 0;
	return (start - e->piece_base) / e->piece_bytes != (end - 1 - e->piece_base) / e->piece_bytes;
}

/* Append one copy; extend the current run when both sides continue it within one host piece. */
static int emit(struct fkv_engine *e, uint64_t dst, uint64_t src, uint64_t bytes, int pool_is_dst,
		struct fkv_err *err)
{
	uint64_t pool_start = pool_is_dst ? e->run_dst : e->run_src;
	int rc;

	if (e->run_bytes && dst == e->run_dst + e->run_bytes && src == e->run_src + e->run_bytes &&
	    !spans_pieces(e, pool_start, pool_start + e->run_bytes + bytes)) {
		e->run_bytes += bytes;
		return 0;
	}
	rc = flush_run(e, err);
	e->run_dst = dst;
	e->run_src = src;
	e->run_bytes = bytes;
	return rc;
}

static int emit_pair(struct fkv_engine *e, int to_pool, uint64_t eng, uint64_t pool, uint64_t bytes,
		     struct fkv_err *err)
{
	return to_pool ? emit(e, pool, eng, bytes, 1, err) : emit(e, eng, pool, bytes, 0, err);
}

static int finish_emits(struct fkv_engine *e, struct fkv_err *err)
{
	int rc = flush_run(e, err);

	return rc ? rc : issue_batch(e, err);
}

static void set_hints(struct fkv_engine *e, int to_pool)
{
	struct cuda_mem_location dev = { CUDA_MEM_LOCATION_DEVICE, e->device };
	struct cuda_mem_location host = { CUDA_MEM_LOCATION_HOST, 0 };

	e->attrs.src_loc_hint = to_pool ? dev : host;
	e->attrs.dst_loc_hint = to_pool ? host : dev;
}

static int64_t copy_batch(struct fkv_engine *e, const struct fkv_copy_desc *d, struct fkv_err *err)
{
	uint64_t i, c;
	int rc;

	set_hints(e, d->to_pool);
	e->num_batched = 0;
	e->run_bytes = 0;
	for (i = 0; i < d->num_pairs; i++) {
		uint64_t eng_off = (uint64_t)d->engine_ids[i] * d->block_stride;
		uint64_t pool_blk = d->pool_addr + (uint64_t)d->pool_ids[i] * d->pool_block_bytes;

		for (c = 0; c < d->num_chunks; c++) {
			rc = emit_pair(e, d->to_pool, d->bases[c] + eng_off, pool_blk + d->pool_offsets[c],
				       d->chunk_bytes, err);
			if (rc)
				return rc;
		}
	}
	rc = finish_emits(e, err);
	return rc ? rc : 0;
}

/* ---------------------------------------------------------------- descriptors for kernels */

/* Upload [bases][offsets][engine_ids][pool_ids] to the next ring slot; *slot gets its index. */
static int upload_desc(struct fkv_engine *e, const struct fkv_copy_desc *d, uint64_t off_bias, unsigned int *slot,
		       struct fkv_err *err)
{
	struct fkv_desc_slot *s = &e->ring[e->ring_next];
	size_t nc = d->num_chunks, np = d->num_pairs, need = 8 * (2 * nc + 2 * np), i;
	uint64_t *h;

	*slot = e->ring_next;
	e->ring_next = (e->ring_next + 1) % FKV_RING;
	RT("cudaEventSynchronize(desc slot)", cu.EventSynchronize(s->done));
	if (need > s->cap) {
		size_t cap = need < 65536 ? 65536 : need * 2;

		if (s->host)
			cu.HostUnregister(s->host);
		free(s->host);
		if (s->dev)
			cu.Free(s->dev);
		s->host = NULL;
		s->dev = NULL;
		s->cap = 0;
		s->host = malloc(cap);
		if (!s->host)
			return -ENOMEM;
		RT("cudaHostRegister(desc)", cu.HostRegister(s->host, cap, CUDA_HOST_REGISTER_PORTABLE));
		RT("cudaMalloc(desc)", cu.Malloc(&s->dev, cap));
		s->cap = cap;
	}
	h = s->host;
	memcpy(h, d->bases, 8 * nc);
	for (i = 0; i < nc; i++)
		h[nc + i] = d->pool_offsets[i] - off_bias;
	memcpy(h + 2 * nc, d->engine_ids, 8 * np);
	memcpy(h + 2 * nc + np, d->pool_ids, 8 * np);
	RT("cudaMemcpyAsync(desc)", cu.MemcpyAsync(s->dev, s->host, need, CUDA_MEMCPY_H2D, e->stream));
	return 0;
}

struct kargs {
	uint64_t bases, offsets, engine_ids, pool_ids, num_chunks, num_pairs;
	uint64_t block_stride, chunk_bytes, pool_base, pool_block_bytes;
	int to_pool;
};

static int launch(struct fkv_engine *e, struct kargs *a, uint32_t ctas, cuda_stream_t st, struct fkv_err *err)
{
	void *params[] = { &a->bases,	    &a->offsets,      &a->engine_ids,	   &a->pool_ids,
			   &a->num_chunks,  &a->num_pairs,    &a->block_stride,	   &a->chunk_bytes,
			   &a->pool_base,   &a->pool_block_bytes, &a->to_pool };
	uint64_t items = a->num_pairs * a->num_chunks;
	int rc;

	if (items < ctas)
		ctas = (uint32_t)items;
	if (ctas == 0)
		return 0;
	if (e->profile && e->prof_n == FKV_PROF_MAX) {
		rc = flush_profile(e, err);
		if (rc)
			return rc;
	}
	if (e->profile)
		RT("cudaEventRecord(prof)", cu.EventRecord(e->prof_ev[e->prof_n][0], st));
	DRV("cuLaunchKernel", cu.cuLaunchKernel(e->fn_copy, ctas, 1, 1, FKV_THREADS, 1, 1, 0, st, params, NULL));
	if (e->profile) {
		RT("cudaEventRecord(prof)", cu.EventRecord(e->prof_ev[e->prof_n][1], st));
		e->prof_ctas[e->prof_n++] = ctas;
	}
	e->stats.num_kernel_launches++;
	e->stats.num_ctas += ctas;
	return 0;
}

static void kargs_from_slot(struct kargs *a, const struct fkv_desc_slot *s, const struct fkv_copy_desc *d)
{
	uint64_t base = (uint64_t)(uintptr_t)s->dev;

	a->bases = base;
	a->offsets = base + 8 * (uint64_t)d->num_chunks;
	a->engine_ids = base + 16 * (uint64_t)d->num_chunks;
	a->pool_ids = a->engine_ids + 8 * d->num_pairs;
	a->num_chunks = d->num_chunks;
	a->num_pairs = d->num_pairs;
	a->block_stride = d->block_stride;
	a->chunk_bytes = d->chunk_bytes;
	a->pool_block_bytes = d->pool_block_bytes;
	a->to_pool = d->to_pool;
}

/* ---------------------------------------------------------------- KERNEL: SMs touch host memory */

static int64_t copy_kernel(struct fkv_engine *e, const struct fkv_copy_desc *d, struct fkv_err *err)
{
	struct kargs a;
	unsigned int slot;
	void *pool_dev = (void *)(uintptr_t)d->pool_addr;
	int rc;

	if (!e->info.host_ptr_registered)
		RT("cudaHostGetDevicePointer", cu.HostGetDevicePointer(&pool_dev, (void *)(uintptr_t)d->pool_addr, 0));
	rc = upload_desc(e, d, 0, &slot, err);
	if (rc)
		return rc;
	kargs_from_slot(&a, &e->ring[slot], d);
	a.pool_base = (uint64_t)(uintptr_t)pool_dev;
	rc = launch(e, &a, e->kernel_ctas, e->stream, err);
	if (rc)
		return rc;
	RT("cudaEventRecord(desc slot)", cu.EventRecord(e->ring[slot].done, e->stream));
	return 0;
}

/* ---------------------------------------------------------------- STAGED: kernel + whole blocks */

struct round {
	uint64_t first, count; /* pairs [first, first + count) */
	int buf;
};

static uint8_t *staging_half(struct fkv_engine *e, int buf)
{
	return (uint8_t *)e->staging + (uint64_t)buf * (e->info.staging_bytes / 2);
}

static int dma_round(struct fkv_engine *e, const struct fkv_copy_desc *d, const struct round *r, struct fkv_err *err)
{
	uint64_t j, stage = (uint64_t)(uintptr_t)staging_half(e, r->buf);
	int rc;

	e->num_batched = 0;
	e->run_bytes = 0;
	for (j = 0; j < r->count; j++) {
		uint64_t pool = d->pool_addr + (uint64_t)d->pool_ids[r->first + j] * d->pool_block_bytes +
				d->shard_offset;

		rc = emit_pair(e, d->to_pool, stage + j * d->shard_bytes, pool, d->shard_bytes, err);
		if (rc)
			return rc;
	}
	return finish_emits(e, err);
}

static int kernel_round(struct fkv_engine *e, const struct kargs *base, const struct round *r, struct fkv_err *err)
{
	struct kargs a = *base;

	a.engine_ids = base->engine_ids + 8 * r->first;
	a.pool_ids = 0; /* staging slot = pair index within the round */
	a.num_pairs = r->count;
	a.pool_base = (uint64_t)(uintptr_t)staging_half(e, r->buf);
	return launch(e, &a, (uint32_t)e->info.num_sms, e->kstream, err);
}

/* D2H: gather on kstream -> DMA on the main stream, two staging halves in flight. */
static int staged_d2h_round(struct fkv_engine *e, const struct fkv_copy_desc *d, const struct kargs *a,
			    const struct round *r, struct fkv_err *err)
{
	int rc;

	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->kstream, e->ev_dma[r->buf], 0));
	rc = kernel_round(e, a, r, err);
	if (rc)
		return rc;
	RT("cudaEventRecord", cu.EventRecord(e->ev_kern[r->buf], e->kstream));
	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->stream, e->ev_kern[r->buf], 0));
	rc = dma_round(e, d, r, err);
	if (rc)
		return rc;
	RT("cudaEventRecord", cu.EventRecord(e->ev_dma[r->buf], e->stream));
	return 0;
}

/* H2D: DMA on the main stream -> scatter on kstream; the main stream joins kstream at the end. */
static int staged_h2d_round(struct fkv_engine *e, const struct fkv_copy_desc *d, const struct kargs *a,
			    const struct round *r, struct fkv_err *err)
{
	int rc;

	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->stream, e->ev_kern[r->buf], 0));
	rc = dma_round(e, d, r, err);
	if (rc)
		return rc;
	RT("cudaEventRecord", cu.EventRecord(e->ev_dma[r->buf], e->stream));
	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->kstream, e->ev_dma[r->buf], 0));
	rc = kernel_round(e, a, r, err);
	if (rc)
		return rc;
	RT("cudaEventRecord", cu.EventRecord(e->ev_kern[r->buf], e->kstream));
	return 0;
}

static int64_t copy_staged(struct fkv_engine *e, const struct fkv_copy_desc *d, struct fkv_err *err)
{
	uint64_t per_round = (e->info.staging_bytes / 2) / d->shard_bytes;
	struct round r = { 0, 0, 0 };
	struct kargs a;
	unsigned int slot;
	int rc;

	if (per_round == 0)
		return -E2BIG;
	set_hints(e, d->to_pool);
	rc = upload_desc(e, d, d->shard_offset, &slot, err);
	if (rc)
		return rc;
	kargs_from_slot(&a, &e->ring[slot], d);
	a.pool_block_bytes = d->shard_bytes;
	/* Both streams start after the upload (and after everything earlier on the main stream). */
	RT("cudaEventRecord", cu.EventRecord(e->ev_up, e->stream));
	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->kstream, e->ev_up, 0));
	RT("cudaEventRecord", cu.EventRecord(e->ev_dma[0], e->stream));
	RT("cudaEventRecord", cu.EventRecord(e->ev_dma[1], e->stream));
	RT("cudaEventRecord", cu.EventRecord(e->ev_kern[0], e->kstream));
	RT("cudaEventRecord", cu.EventRecord(e->ev_kern[1], e->kstream));
	for (r.first = 0; r.first < d->num_pairs; r.first += r.count, r.buf ^= 1) {
		r.count = d->num_pairs - r.first < per_round ? d->num_pairs - r.first : per_round;
		rc = d->to_pool ? staged_d2h_round(e, d, &a, &r, err) : staged_h2d_round(e, d, &a, &r, err);
		if (rc)
			return rc;
	}
	RT("cudaEventRecord", cu.EventRecord(e->ev_kern[0], e->kstream));
	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->stream, e->ev_kern[0], 0));
	RT("cudaEventRecord(desc slot)", cu.EventRecord(e->ring[slot].done, e->stream));
	return 0;
}

/* ---------------------------------------------------------------- dispatch */

static int check_desc(const struct fkv_engine *e, const struct fkv_copy_desc *d, int path)
{
	if (!d || !d->bases || !d->pool_offsets || !d->engine_ids || !d->pool_ids)
		return -EINVAL;
	if (d->num_chunks == 0 || d->chunk_bytes == 0 || d->pool_block_bytes == 0 || !d->pool_addr)
		return -EINVAL;
	if ((path == FKV_PATH_STAGED || path == FKV_PATH_KERNEL) && !e->info.has_kernels)
		return -ENOTSUP;
	if (path == FKV_PATH_STAGED && (!e->staging || d->shard_bytes == 0))
		return -ENOTSUP;
	if (path == FKV_PATH_STAGED && d->shard_bytes > e->info.staging_bytes / 2)
		return -E2BIG;
	return 0;
}

int64_t fkv_engine_copy(struct fkv_engine *e, const struct fkv_copy_desc *d, int path, struct fkv_err *err)
{
	uint64_t copies_before;
	int64_t rc;

	if (!e)
		return -EINVAL;
	rc = check_desc(e, d, path);
	if (rc)
		return rc;
	if (d->num_pairs == 0)
		return 0;
	RT("cudaSetDevice", cu.SetDevice(e->device));
	e->piece_base = d->pool_piece_base;
	e->piece_bytes = d->pool_piece_bytes;
	copies_before = e->stats.num_copies;
	if (path == FKV_PATH_BATCH)
		rc = copy_batch(e, d, err);
	else if (path == FKV_PATH_STAGED)
		rc = copy_staged(e, d, err);
	else if (path == FKV_PATH_KERNEL)
		rc = copy_kernel(e, d, err);
	else
		rc = -EINVAL;
	return rc ? rc : (int64_t)(e->stats.num_copies - copies_before);
}

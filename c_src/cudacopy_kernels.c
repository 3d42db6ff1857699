/*
 * The GPU-kernel paths of the copy engine (the engine state, the BATCH path and the dispatcher are
 * in cudacopy.c): loading the PTX module (fkv_copy_chunks, from copy_kernels.cu), the ring of
 * descriptor slots the kernel reads its ids and offsets from, and the two paths that launch it:
 *   KERNEL - one SM copy kernel reads/writes the registered host pool directly.
 *   STAGED - a gather/scatter kernel packs the engine's chunks into a device staging buffer in
 *            block-first order; whole shard blocks then cross PCIe through BATCH's emitter (the
 *            batch API). Two staging halves and a second stream overlap the kernels with the DMA.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cudacopy_engine.h"

#define FKV_THREADS 512

/* ---------------------------------------------------------------- module */

/*
 * Launch the kernel once with no work: the driver JIT-compiles the PTX and loads the function
 * lazily, which took tens of ms on the first copy of a worker. Paying it here moves it to start-up.
 */
static int warm_up(struct fkv_engine *e, struct fkv_err *err)
{
	uint64_t zero[10] = { 0 };
	int to_pool = 0;
	void *params[] = { &zero[0], &zero[1], &zero[2], &zero[3], &zero[4], &zero[5],
			   &zero[6], &zero[7], &zero[8], &zero[9], &to_pool };

	DRV("cuLaunchKernel(warm-up)", cu.cuLaunchKernel(e->fn_copy, 1, 1, 1, FKV_THREADS, 1, 1, 0, e->stream,
							params, NULL));
	RT("cudaStreamSynchronize(warm-up)", cu.StreamSynchronize(e->stream));
	return 0;
}

int fkv_engine_load_kernels(struct fkv_engine *e, const char *ptx, struct fkv_err *err)
{
	cu_result_t rc;

	if (!e || !ptx)
		return -EINVAL;
	RT("cudaSetDevice", cu.SetDevice(e->device));
	if (e->module)
		return 0;
	DRV("cuModuleLoadData", cu.cuModuleLoadData(&e->module, ptx));
	rc = cu.cuModuleGetFunction(&e->fn_copy, e->module, "fkv_copy_chunks");
	if (rc) { /* leave no half-loaded module behind: a later call may try again */
		cu.cuModuleUnload(e->module);
		e->module = NULL;
		return fail(err, rc, 1, "cuModuleGetFunction(fkv_copy_chunks)");
	}
	e->info.has_kernels = 1;
	return warm_up(e, err);
}

/* ---------------------------------------------------------------- descriptors for kernels */

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
		rc = eng_flush_profile(e, err);
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

/*
 * A slot's pinned host side is [piece bases][piece offsets][0][pad][descriptor], the descriptor cut
 * in DESC_PIECE pieces. The copy kernel itself moves the pieces to the slot's device side (one CTA
 * per piece reads host memory over PCIe): a cudaMemcpyAsync would queue the upload behind the bulk
 * H2D DMA of a concurrent get on the same copy engine, stalling every D2H call's start by up to a
 * DMA round while gets and puts run at once.
 */
#define DESC_PIECE 4096

static size_t desc_header(size_t pieces)
{
	return 16 * pieces + 16;
}

static int grow_slot(struct fkv_engine *e, struct fkv_desc_slot *s, size_t need, struct fkv_err *err)
{
	size_t cap = need < 65536 ? 65536 : need * 2, host_bytes;
	void *dev_view = NULL;
	cuda_err_t rc;

	cap = (cap + DESC_PIECE - 1) / DESC_PIECE * DESC_PIECE;
	host_bytes = desc_header(cap / DESC_PIECE) + cap;
	if (s->host)
		cu.HostUnregister(s->host);
	free(s->host);
	if (s->dev)
		cu.Free(s->dev);
	s->host = NULL;
	s->dev = NULL;
	s->cap = 0;
	if (posix_memalign(&s->host, 4096, host_bytes))
		return -ENOMEM;
	rc = cu.HostRegister(s->host, host_bytes, CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_MAPPED);
	if (rc) { /* never unregister (at the next grow or destroy) what was not registered */
		free(s->host);
		s->host = NULL;
		return fail(err, rc, 0, "cudaHostRegister(desc)");
	}
	dev_view = s->host;
	if (!e->info.host_ptr_registered)
		RT("cudaHostGetDevicePointer(desc)", cu.HostGetDevicePointer(&dev_view, s->host, 0));
	s->host_dev = (uint64_t)(uintptr_t)dev_view;
	RT("cudaMalloc(desc)", cu.Malloc(&s->dev, cap));
	s->cap = cap;
	return 0;
}

/* Upload [bases][offsets][engine_ids][pool_ids] to the next ring slot on stream st; *slot gets its index. */
static int upload_desc(struct fkv_engine *e, const struct fkv_copy_desc *d, uint64_t off_bias, cuda_stream_t st,
		       unsigned int *slot, struct fkv_err *err)
{
	struct fkv_desc_slot *s = &e->ring[e->ring_next];
	size_t nc = d->num_chunks, np = d->num_pairs, need = 8 * (2 * nc + 2 * np), pieces, hdr, i;
	struct kargs a;
	uint64_t *h, *w;
	int rc;

	*slot = e->ring_next;
	e->ring_next = (e->ring_next + 1) % FKV_RING;
	RT("cudaEventSynchronize(desc slot)", cu.EventSynchronize(s->done));
	pieces = (need + DESC_PIECE - 1) / DESC_PIECE;
	if (pieces * DESC_PIECE > s->cap) {
		rc = grow_slot(e, s, pieces * DESC_PIECE, err);
		if (rc)
			return rc;
	}
	hdr = desc_header(pieces);
	w = s->host;
	h = (uint64_t *)((uint8_t *)s->host + hdr);
	memcpy(h, d->bases, 8 * nc);
	for (i = 0; i < nc; i++)
		h[nc + i] = d->pool_offsets[i] - off_bias;
	memcpy(h + 2 * nc, d->engine_ids, 8 * np);
	memcpy(h + 2 * nc + np, d->pool_ids, 8 * np);
	for (i = 0; i < pieces; i++) {
		w[i] = s->host_dev + hdr + i * DESC_PIECE;  /* piece i's source (host, device view) */
		w[pieces + i] = i * DESC_PIECE;             /* and its place in the device slot */
	}
	w[2 * pieces] = 0; /* the one "engine id" */
	a = (struct kargs){ .bases = s->host_dev, .offsets = s->host_dev + 8 * pieces,
			    .engine_ids = s->host_dev + 16 * pieces, .pool_ids = 0, .num_chunks = pieces,
			    .num_pairs = 1, .block_stride = 0, .chunk_bytes = DESC_PIECE,
			    .pool_base = (uint64_t)(uintptr_t)s->dev, .pool_block_bytes = 0, .to_pool = 1 };
	return launch(e, &a, (uint32_t)e->info.num_sms, st, err);
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

int64_t eng_copy_kernel(struct fkv_engine *e, const struct fkv_copy_desc *d, struct fkv_err *err)
{
	struct kargs a;
	unsigned int slot;
	void *pool_dev = (void *)(uintptr_t)d->pool_addr;
	int rc;

	if (!e->info.host_ptr_registered)
		RT("cudaHostGetDevicePointer", cu.HostGetDevicePointer(&pool_dev, (void *)(uintptr_t)d->pool_addr, 0));
	rc = upload_desc(e, d, 0, e->stream, &slot, err);
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

		rc = eng_emit_pair(e, d->to_pool, stage + j * d->shard_bytes, pool, d->shard_bytes, err);
		if (rc)
			return rc;
	}
	return eng_finish_emits(e, err);
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

/*
 * D2H calls in a row chain: the next call's descriptor upload and first gather run on kstream while
 * the previous call's last DMA rounds still run, and its rounds go on alternating the halves, so the
 * copy engine does not idle between calls (that gap cost ~2% at 256 MiB per call on an H200). Only
 * the main stream's DMA rounds (staging -> pool) may be skipped: any other work on it (a BATCH or
 * KERNEL copy, an H2D call) clears d2h_tail, and wait_event makes kstream wait too.
 */
int64_t eng_copy_staged(struct fkv_engine *e, const struct fkv_copy_desc *d, struct fkv_err *err)
{
	uint64_t per_round = (e->info.staging_bytes / 2) / d->shard_bytes;
	int chain = d->to_pool && e->d2h_tail;
	struct round r = { 0, 0, chain ? e->next_buf : 0 };
	struct kargs a;
	unsigned int slot;
	int rc;

	if (per_round == 0)
		return -E2BIG;
	e->d2h_tail = 0; /* until this call is fully enqueued */
	eng_set_hints(e, d->to_pool);
	rc = upload_desc(e, d, d->shard_offset, chain ? e->kstream : e->stream, &slot, err);
	if (rc)
		return rc;
	kargs_from_slot(&a, &e->ring[slot], d);
	a.pool_block_bytes = d->shard_bytes;
	if (!chain) {
		/* Both streams start after the upload (and after everything earlier on the main stream). */
		RT("cudaEventRecord", cu.EventRecord(e->ev_up, e->stream));
		RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->kstream, e->ev_up, 0));
		RT("cudaEventRecord", cu.EventRecord(e->ev_dma[0], e->stream));
		RT("cudaEventRecord", cu.EventRecord(e->ev_dma[1], e->stream));
		RT("cudaEventRecord", cu.EventRecord(e->ev_kern[0], e->kstream));
		RT("cudaEventRecord", cu.EventRecord(e->ev_kern[1], e->kstream));
	}
	for (r.first = 0; r.first < d->num_pairs; r.first += r.count, r.buf ^= 1) {
		r.count = d->num_pairs - r.first < per_round ? d->num_pairs - r.first : per_round;
		rc = d->to_pool ? staged_d2h_round(e, d, &a, &r, err) : staged_h2d_round(e, d, &a, &r, err);
		if (rc)
			return rc;
	}
	RT("cudaEventRecord", cu.EventRecord(e->ev_kern[0], e->kstream));
	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->stream, e->ev_kern[0], 0));
	RT("cudaEventRecord(desc slot)", cu.EventRecord(e->ring[slot].done, e->stream));
	e->d2h_tail = d->to_pool;
	e->next_buf = r.buf;
	return 0;
}

/*
 * CUDA copy engine for flexkv (see cudacopy.h and docs/gpu.md): the engine's state and lifecycle
 * (create/destroy, info, profile, stats, events, stream), the BATCH path and the dispatcher
 * fkv_engine_copy. Library loading, CUDA errors and the engine-less helpers (registration, IPC,
 * events) live in cuda_runtime.c; the GPU-kernel paths in cudacopy_kernels.c.
 *
 * Three paths move (engine chunk <-> pool chunk) pairs:
 *   BATCH  - coalesce adjacent runs, then cudaMemcpyBatchAsync (or cudaMemcpyAsync per run).
 *   STAGED - (cudacopy_kernels.c) a kernel packs chunks into a staging buffer; BATCH's emitter
 *            then moves whole shard blocks across PCIe.
 *   KERNEL - (cudacopy_kernels.c) one SM copy kernel reads/writes the registered host pool.
 * Every copy is enqueued on the engine's own non-blocking stream; work on the helper kernel stream
 * is always joined back into it, so synchronizing or recording an event on the main stream covers
 * everything a call enqueued.
 */
#define _GNU_SOURCE
#include "cudacopy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cudacopy_engine.h"

#define FKV_DEFAULT_CTAS 64

/* ---------------------------------------------------------------- engine state */

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
	e->info.staging_bytes = staging_bytes & ~(uint64_t)0x1FFF; /* two page-aligned halves */
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

int eng_flush_profile(struct fkv_engine *e, struct fkv_err *err)
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
	rc = eng_flush_profile(e, err);
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
	/* and a chained STAGED D2H call, whose gathers do not join the main stream */
	RT("cudaStreamWaitEvent", cu.StreamWaitEvent(e->kstream, (cuda_event_t)event, 0));
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

int eng_emit_pair(struct fkv_engine *e, int to_pool, uint64_t eng, uint64_t pool, uint64_t bytes,
		  struct fkv_err *err)
{
	return to_pool ? emit(e, pool, eng, bytes, 1, err) : emit(e, eng, pool, bytes, 0, err);
}

int eng_finish_emits(struct fkv_engine *e, struct fkv_err *err)
{
	int rc = flush_run(e, err);

	return rc ? rc : issue_batch(e, err);
}

void eng_set_hints(struct fkv_engine *e, int to_pool)
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

	eng_set_hints(e, d->to_pool);
	e->num_batched = 0;
	e->run_bytes = 0;
	for (i = 0; i < d->num_pairs; i++) {
		uint64_t eng_off = (uint64_t)d->engine_ids[i] * d->block_stride;
		uint64_t pool_blk = d->pool_addr + (uint64_t)d->pool_ids[i] * d->pool_block_bytes;

		for (c = 0; c < d->num_chunks; c++) {
			rc = eng_emit_pair(e, d->to_pool, d->bases[c] + eng_off, pool_blk + d->pool_offsets[c],
					   d->chunk_bytes, err);
			if (rc)
				return rc;
		}
	}
	rc = eng_finish_emits(e, err);
	return rc;
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
	if (path != FKV_PATH_STAGED)
		e->d2h_tail = 0;
	if (path == FKV_PATH_BATCH)
		rc = copy_batch(e, d, err);
	else if (path == FKV_PATH_STAGED)
		rc = eng_copy_staged(e, d, err);
	else if (path == FKV_PATH_KERNEL)
		rc = eng_copy_kernel(e, d, err);
	else
		rc = -EINVAL;
	return rc ? rc : (int64_t)(e->stats.num_copies - copies_before);
}

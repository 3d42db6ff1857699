/*
 * Internal to the copy engine: the engine state, shared by cudacopy.c (lifecycle, BATCH path,
 * dispatch) and cudacopy_kernels.c (descriptor ring, KERNEL and STAGED paths). Not part of
 * cudacopy.h, so cffi's cdef never sees it.
 *
 * The eng_* functions link across the two files but are hidden, like the shared objects of
 * cuda_internal.h: the module's dynamic symbol table exports only the fkv_* API of cudacopy.h.
 */
#ifndef FLEXKV_CUDACOPY_ENGINE_H
#define FLEXKV_CUDACOPY_ENGINE_H
#include <stdint.h>

#include "cuda_internal.h"

#define FKV_BATCH_MAX 1024
#define FKV_RING 4
#define FKV_PROF_MAX 256

/* One slot of the descriptor ring: the kernels read a call's ids and offsets from dev. */
struct fkv_desc_slot {
	void *host;       /* pinned; the copy kernel moves it to dev (main stream; kstream when chained) */
	void *dev;
	uint64_t host_dev; /* host as the device addresses it (the upload kernel reads it there) */
	size_t cap;        /* bytes of dev; host has a piece table in front */
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
	/* Set while the last work on the main stream is a STAGED D2H call's DMA rounds (which read only
	 * staging and write only the pool): the next STAGED D2H call then chains its gathers behind
	 * ev_dma on kstream instead of joining the main stream, starting next_buf. */
	int d2h_tail;
	int next_buf;
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

/* cudacopy.c: profile events and the BATCH emitter, which STAGED's DMA rounds reuse. */
FKV_HIDDEN int eng_flush_profile(struct fkv_engine *e, struct fkv_err *err);
FKV_HIDDEN void eng_set_hints(struct fkv_engine *e, int to_pool);
FKV_HIDDEN int eng_emit_pair(struct fkv_engine *e, int to_pool, uint64_t eng, uint64_t pool, uint64_t bytes,
			     struct fkv_err *err);
FKV_HIDDEN int eng_finish_emits(struct fkv_engine *e, struct fkv_err *err);

/* cudacopy_kernels.c: the two kernel paths, called by fkv_engine_copy once the desc is checked. */
FKV_HIDDEN int64_t eng_copy_kernel(struct fkv_engine *e, const struct fkv_copy_desc *d, struct fkv_err *err);
FKV_HIDDEN int64_t eng_copy_staged(struct fkv_engine *e, const struct fkv_copy_desc *d, struct fkv_err *err);

#endif

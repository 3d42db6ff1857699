/*
 * CUDA copy engine: moves KV blocks between an engine's GPU chunks and a block-first host pool.
 *
 * libcudart and libcuda are loaded with dlopen() at run time (fkv_cuda_load), never linked, so this
 * module builds and loads on machines without CUDA. Every function returns 0 (or a count) on
 * success and a negative errno on failure; when CUDA itself failed the errno is -EIO and *err
 * names the call and the CUDA error code.
 */
#ifndef FLEXKV_CUDACOPY_H
#define FLEXKV_CUDACOPY_H
#include <stddef.h>
#include <stdint.h>

struct fkv_err {
	int cuda_code;    /* cudaError_t / CUresult of the failing call, 0 if none */
	int driver_api;   /* 1 when cuda_code is a CUresult (driver API) */
	const char *call; /* name of the failing call (static string) or NULL */
};

enum fkv_path { FKV_PATH_BATCH = 1, FKV_PATH_STAGED = 2, FKV_PATH_KERNEL = 3 };

/* One copy request: pairs (engine_ids[i], pool_ids[i]) x chunks c. */
struct fkv_copy_desc {
	int to_pool;                   /* 1: engine -> pool (D2H), 0: pool -> engine (H2D) */
	uint32_t num_chunks;           /* num_layers * kv_dim of this shard */
	const uint64_t *bases;         /* [num_chunks] engine address of chunk c of block 0 */
	const uint64_t *pool_offsets;  /* [num_chunks] offset of chunk c inside a pool block */
	uint64_t block_stride;         /* engine bytes between consecutive blocks */
	uint64_t chunk_bytes;
	uint64_t pool_addr;
	uint64_t pool_block_bytes;
	uint64_t shard_offset;         /* STAGED: min(pool_offsets); the shard's part starts here */
	uint64_t shard_bytes;          /* STAGED: num_chunks * chunk_bytes, contiguous in the pool */
	uint64_t pool_piece_base;      /* the pool's host registration: pieces of pool_piece_bytes */
	uint64_t pool_piece_bytes;     /* from here; no DMA may span two pieces (0 = one piece) */
	uint64_t num_pairs;
	const int64_t *engine_ids;
	const int64_t *pool_ids;
};

struct fkv_engine_info {
	int device;
	int runtime_version;
	int driver_version;
	int num_sms;
	int cc_major;
	int cc_minor;
	int host_ptr_registered; /* device may use registered host memory at the host address */
	int has_batch_api;
	int has_kernels;
	uint64_t staging_bytes;
};

struct fkv_engine_stats {
	uint64_t num_kernel_launches;
	uint64_t num_ctas;           /* CTAs launched in total */
	uint64_t num_copies;         /* DMA copies issued (after coalescing) */
	uint64_t num_batch_calls;
	double kernel_ms;            /* summed kernel time (profile mode only) */
	double cta_ms;               /* sum over launches of CTAs x kernel time (profile mode only) */
};

struct fkv_engine;

int fkv_cuda_load(const char *cudart_path, char *why, size_t why_len);
int fkv_cuda_probe(int *num_devices, int *runtime_version, int *driver_version, struct fkv_err *err);
const char *fkv_cuda_error_string(int code, int driver_api);

int fkv_engine_create(int device, uint64_t staging_bytes, struct fkv_engine **out, struct fkv_err *err);
int fkv_engine_destroy(struct fkv_engine *e, struct fkv_err *err);
int fkv_engine_load_kernels(struct fkv_engine *e, const char *ptx, struct fkv_err *err);
int fkv_engine_get_info(struct fkv_engine *e, struct fkv_engine_info *out);
int fkv_engine_set_profile(struct fkv_engine *e, int on, uint32_t kernel_ctas);
int fkv_engine_get_stats(struct fkv_engine *e, struct fkv_engine_stats *out, struct fkv_err *err);
int fkv_engine_wait_event(struct fkv_engine *e, uintptr_t event, struct fkv_err *err);
int fkv_engine_record_event(struct fkv_engine *e, uintptr_t event, struct fkv_err *err);
int fkv_engine_synchronize(struct fkv_engine *e, struct fkv_err *err);
uintptr_t fkv_engine_stream(struct fkv_engine *e);
int64_t fkv_engine_copy(struct fkv_engine *e, const struct fkv_copy_desc *d, int path, struct fkv_err *err);

int fkv_host_register(int device, uint64_t addr, uint64_t nbytes, struct fkv_err *err);
int fkv_host_unregister(int device, uint64_t addr, struct fkv_err *err);

int fkv_ipc_get_mem_handle(int device, uint64_t ptr, uint8_t *handle, uint64_t *base, uint64_t *size,
			   struct fkv_err *err);
int fkv_ipc_open_mem_handle(int device, const uint8_t *handle, uint64_t *ptr, struct fkv_err *err);
int fkv_ipc_close_mem_handle(int device, uint64_t ptr, struct fkv_err *err);
int fkv_ipc_get_event_handle(int device, uintptr_t event, uint8_t *handle, struct fkv_err *err);
int fkv_ipc_open_event_handle(int device, const uint8_t *handle, uintptr_t *event, struct fkv_err *err);
int fkv_event_create(int device, int interprocess, uintptr_t *event, struct fkv_err *err);
int fkv_event_destroy(uintptr_t event, struct fkv_err *err);
int fkv_event_synchronize(uintptr_t event, struct fkv_err *err);
int fkv_event_record(uintptr_t event, uintptr_t stream, struct fkv_err *err);
int fkv_set_device(int device, struct fkv_err *err);

/* Test/benchmark helpers: device memory and plain copies (the ceiling). */
int fkv_device_alloc(int device, uint64_t nbytes, uint64_t *ptr, struct fkv_err *err);
int fkv_device_free(int device, uint64_t ptr, struct fkv_err *err);
int fkv_memcpy_sync(int device, uint64_t dst, uint64_t src, uint64_t nbytes, struct fkv_err *err);

#endif

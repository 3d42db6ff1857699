/*
 * Internal to the _cudacopy module: shared by cuda_runtime.c (library loading, errors, standalone
 * helpers) and the copy engine (cudacopy.c, cudacopy_kernels.c). Not part of cudacopy.h, so cffi's
 * cdef never sees it.
 *
 * The shared objects are prefixed and hidden: they link across the two files but stay out of the
 * module's dynamic symbol table, which exports only the fkv_* API of cudacopy.h.
 */
#ifndef FLEXKV_CUDA_INTERNAL_H
#define FLEXKV_CUDA_INTERNAL_H
#include <errno.h>

#include "cuda_api.h"
#include "cudacopy.h"

#define FKV_HIDDEN __attribute__((visibility("hidden")))

/*
 * The CUDA entry points, resolved by fkv_cuda_load() under its lock and read-only once loaded is set.
 * The batch-ABI choice: at most one of MemcpyBatchAsync_v12 / _v13 is non-NULL (pick_batch_abi).
 */
struct fkv_cuda_api {
	int loaded;
	void *rt, *drv;
	pfn_cudaRuntimeGetVersion RuntimeGetVersion;
	pfn_cudaDriverGetVersion DriverGetVersion;
	pfn_cudaGetDeviceCount GetDeviceCount;
	pfn_cudaSetDevice SetDevice;
	pfn_cudaFree Free;
	pfn_cudaMalloc Malloc;
	pfn_cudaDeviceGetAttribute DeviceGetAttribute;
	pfn_cudaGetErrorString GetErrorString;
	pfn_cudaGetLastError GetLastError;
	pfn_cudaStreamCreateWithFlags StreamCreateWithFlags;
	pfn_cudaStreamDestroy StreamDestroy;
	pfn_cudaStreamSynchronize StreamSynchronize;
	pfn_cudaStreamWaitEvent StreamWaitEvent;
	pfn_cudaEventCreateWithFlags EventCreateWithFlags;
	pfn_cudaEventDestroy EventDestroy;
	pfn_cudaEventRecord EventRecord;
	pfn_cudaEventSynchronize EventSynchronize;
	pfn_cudaEventElapsedTime EventElapsedTime;
	pfn_cudaMemcpyAsync MemcpyAsync;
	pfn_cudaMemcpyBatchAsync_v12 MemcpyBatchAsync_v12;
	pfn_cudaMemcpyBatchAsync_v13 MemcpyBatchAsync_v13;
	pfn_cudaHostRegister HostRegister;
	pfn_cudaHostUnregister HostUnregister;
	pfn_cudaHostGetDevicePointer HostGetDevicePointer;
	pfn_cudaIpcGetMemHandle IpcGetMemHandle;
	pfn_cudaIpcOpenMemHandle IpcOpenMemHandle;
	pfn_cudaIpcCloseMemHandle IpcCloseMemHandle;
	pfn_cudaIpcGetEventHandle IpcGetEventHandle;
	pfn_cudaIpcOpenEventHandle IpcOpenEventHandle;
	pfn_cuMemGetAddressRange_v2 cuMemGetAddressRange;
	pfn_cuModuleLoadData cuModuleLoadData;
	pfn_cuModuleUnload cuModuleUnload;
	pfn_cuModuleGetFunction cuModuleGetFunction;
	pfn_cuLaunchKernel cuLaunchKernel;
	pfn_cuGetErrorString cuGetErrorString;
	int runtime_version;
};

extern FKV_HIDDEN struct fkv_cuda_api fkv_cu;

/* Record the failing CUDA call in *err (when err is non-NULL); always returns -EIO. */
FKV_HIDDEN int fkv_fail(struct fkv_err *err, int code, int driver_api, const char *call);

/* The short names both files use. */
#define cu fkv_cu
#define fail fkv_fail

/* In a function taking struct fkv_err *err: return -EIO through fail() when a CUDA call fails. */
#define RT(call, expr)                                         \
	do {                                                   \
		cuda_err_t rc_ = (expr);                       \
		if (rc_ != 0) {                                \
			cu.GetLastError();                     \
			return fail(err, rc_, 0, call);        \
		}                                              \
	} while (0)

#define DRV(call, expr)                                        \
	do {                                                   \
		cu_result_t rc_ = (expr);                      \
		if (rc_ != 0)                                  \
			return fail(err, rc_, 1, call);        \
	} while (0)

#define NEED_LOADED()              \
	do {                       \
		if (!cu.loaded)    \
			return -ENODEV; \
	} while (0)

#endif

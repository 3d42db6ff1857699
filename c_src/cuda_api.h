/*
 * Our own declarations of the few CUDA runtime and driver entry points flexkv uses.
 *
 * Nothing here links against CUDA: cuda_runtime.c resolves every function with dlsym() at run time, so
 * the package builds, imports and runs its CPU paths on machines without CUDA. Types are opaque
 * pointers or plain integers with the ABI of the official headers; only the values we use are named.
 */
#ifndef FLEXKV_CUDA_API_H
#define FLEXKV_CUDA_API_H
#include <stddef.h>
#include <stdint.h>

typedef int cuda_err_t;               /* cudaError_t */
typedef int cu_result_t;              /* CUresult */
typedef struct cu_stream_st *cuda_stream_t; /* cudaStream_t == CUstream */
typedef struct cu_event_st *cuda_event_t;   /* cudaEvent_t == CUevent */
typedef struct cu_module_st *cu_module_t;   /* CUmodule */
typedef struct cu_func_st *cu_function_t;   /* CUfunction */
typedef uint64_t cu_deviceptr_t;            /* CUdeviceptr (64-bit) */

#define FKV_CUDA_IPC_HANDLE_BYTES 64
typedef struct { char reserved[FKV_CUDA_IPC_HANDLE_BYTES]; } cuda_ipc_mem_handle_t;
typedef struct { char reserved[FKV_CUDA_IPC_HANDLE_BYTES]; } cuda_ipc_event_handle_t;

/* cudaMemLocation / cudaMemcpyAttributes (CUDA 12.8+) */
struct cuda_mem_location { int type; int id; };
struct cuda_memcpy_attrs {
	int src_access_order;
	struct cuda_mem_location src_loc_hint;
	struct cuda_mem_location dst_loc_hint;
	unsigned int flags;
};

enum {
	CUDA_SUCCESS_ = 0,
	CUDA_ERR_INIT = 3,
	CUDA_ERR_STUB_LIBRARY = 34,
	CUDA_ERR_INSUFFICIENT_DRIVER = 35,
	CUDA_ERR_NO_DEVICE = 100,
	CUDA_ERR_HOST_ALREADY_REGISTERED = 712,
	CUDA_MEMCPY_H2D = 1,
	CUDA_MEMCPY_D2H = 2,
	CUDA_MEMCPY_DEFAULT = 4,
	CUDA_HOST_REGISTER_PORTABLE = 0x1,
	CUDA_HOST_REGISTER_MAPPED = 0x2,
	CUDA_STREAM_NON_BLOCKING = 0x1,
	CUDA_EVENT_DISABLE_TIMING = 0x2,
	CUDA_EVENT_INTERPROCESS = 0x4,
	CUDA_IPC_LAZY_PEER_ACCESS = 0x1,
	CUDA_SRC_ACCESS_ORDER_STREAM = 0x1,
	CUDA_MEM_LOCATION_DEVICE = 1,
	CUDA_MEM_LOCATION_HOST = 2,
	CUDA_ATTR_MULTIPROCESSOR_COUNT = 16,
	CUDA_ATTR_UNIFIED_ADDRESSING = 41,
	CUDA_ATTR_CC_MAJOR = 75,
	CUDA_ATTR_CC_MINOR = 76,
	CUDA_ATTR_HOST_PTR_FOR_REGISTERED = 91,
};

/* Runtime API (libcudart). */
typedef cuda_err_t (*pfn_cudaRuntimeGetVersion)(int *);
typedef cuda_err_t (*pfn_cudaDriverGetVersion)(int *);
typedef cuda_err_t (*pfn_cudaGetDeviceCount)(int *);
typedef cuda_err_t (*pfn_cudaSetDevice)(int);
typedef cuda_err_t (*pfn_cudaFree)(void *);
typedef cuda_err_t (*pfn_cudaMalloc)(void **, size_t);
typedef cuda_err_t (*pfn_cudaDeviceGetAttribute)(int *, int, int);
typedef const char *(*pfn_cudaGetErrorString)(cuda_err_t);
typedef const char *(*pfn_cudaGetErrorName)(cuda_err_t);
typedef cuda_err_t (*pfn_cudaGetLastError)(void);
typedef cuda_err_t (*pfn_cudaStreamCreateWithFlags)(cuda_stream_t *, unsigned int);
typedef cuda_err_t (*pfn_cudaStreamDestroy)(cuda_stream_t);
typedef cuda_err_t (*pfn_cudaStreamSynchronize)(cuda_stream_t);
typedef cuda_err_t (*pfn_cudaStreamWaitEvent)(cuda_stream_t, cuda_event_t, unsigned int);
typedef cuda_err_t (*pfn_cudaEventCreateWithFlags)(cuda_event_t *, unsigned int);
typedef cuda_err_t (*pfn_cudaEventDestroy)(cuda_event_t);
typedef cuda_err_t (*pfn_cudaEventRecord)(cuda_event_t, cuda_stream_t);
typedef cuda_err_t (*pfn_cudaEventSynchronize)(cuda_event_t);
typedef cuda_err_t (*pfn_cudaEventElapsedTime)(float *, cuda_event_t, cuda_event_t);
typedef cuda_err_t (*pfn_cudaMemcpyAsync)(void *, const void *, size_t, int, cuda_stream_t);
typedef cuda_err_t (*pfn_cudaMemsetAsync)(void *, int, size_t, cuda_stream_t);
/* CUDA 12.8 / 12.9: with failIdx. */
typedef cuda_err_t (*pfn_cudaMemcpyBatchAsync_v12)(void **, void **, size_t *, size_t, struct cuda_memcpy_attrs *,
						   size_t *, size_t, size_t *, cuda_stream_t);
/* CUDA 13.0+: failIdx removed. */
typedef cuda_err_t (*pfn_cudaMemcpyBatchAsync_v13)(void *const *, const void *const *, const size_t *, size_t,
						   struct cuda_memcpy_attrs *, size_t *, size_t, cuda_stream_t);
typedef cuda_err_t (*pfn_cudaHostRegister)(void *, size_t, unsigned int);
typedef cuda_err_t (*pfn_cudaHostUnregister)(void *);
typedef cuda_err_t (*pfn_cudaHostGetDevicePointer)(void **, void *, unsigned int);
typedef cuda_err_t (*pfn_cudaIpcGetMemHandle)(cuda_ipc_mem_handle_t *, void *);
typedef cuda_err_t (*pfn_cudaIpcOpenMemHandle)(void **, cuda_ipc_mem_handle_t, unsigned int);
typedef cuda_err_t (*pfn_cudaIpcCloseMemHandle)(void *);
typedef cuda_err_t (*pfn_cudaIpcGetEventHandle)(cuda_ipc_event_handle_t *, cuda_event_t);
typedef cuda_err_t (*pfn_cudaIpcOpenEventHandle)(cuda_event_t *, cuda_ipc_event_handle_t);

/* Driver API (libcuda). */
typedef cu_result_t (*pfn_cuMemGetAddressRange_v2)(cu_deviceptr_t *, size_t *, cu_deviceptr_t);
typedef cu_result_t (*pfn_cuModuleLoadData)(cu_module_t *, const void *);
typedef cu_result_t (*pfn_cuModuleUnload)(cu_module_t);
typedef cu_result_t (*pfn_cuModuleGetFunction)(cu_function_t *, cu_module_t, const char *);
typedef cu_result_t (*pfn_cuLaunchKernel)(cu_function_t, unsigned int, unsigned int, unsigned int, unsigned int,
					  unsigned int, unsigned int, unsigned int, cuda_stream_t, void **, void **);
typedef cu_result_t (*pfn_cuGetErrorString)(cu_result_t, const char **);

#endif

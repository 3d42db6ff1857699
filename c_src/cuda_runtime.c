/*
 * CUDA runtime access for flexkv (see cudacopy.h and docs/gpu.md), shared with the copy engine in
 * cudacopy.c through cuda_internal.h:
 *   - library loading: dlopen libcudart and libcuda and resolve every entry point with dlsym
 *     (fkv_cuda_load); nothing links against CUDA;
 *   - errors: fail() and the CUDA error strings;
 *   - standalone helpers that need no engine: host registration, IPC handles, events, and the
 *     device allocation / plain copy used by tests and benchmarks.
 */
#define _GNU_SOURCE
#include "cudacopy.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "cuda_internal.h"

/* ---------------------------------------------------------------- library loading */

struct fkv_cuda_api fkv_cu;

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

static void *open_first(const char *const *names, int flags)
{
	for (; *names; names++) {
		void *h = dlopen(*names, flags);

		if (h)
			return h;
	}
	return NULL;
}

static void *open_cudart(const char *path)
{
	static const char *const names[] = { "libcudart.so.13", "libcudart.so.12", "libcudart.so", NULL };
	void *h;

	/* Prefer a runtime the process already has (torch's), so we share its state. */
	h = open_first(names, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
	if (!h && path && *path)
		h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
	if (!h)
		h = open_first(names, RTLD_NOW | RTLD_GLOBAL);
	return h;
}

#define SYM(lib, field, name)                                           \
	do {                                                            \
		*(void **)(&cu.field) = dlsym(lib, name);               \
		if (!cu.field && required) {                            \
			snprintf(why, why_len, "symbol %s missing", name); \
			return -ENOSYS;                                 \
		}                                                       \
	} while (0)

static int load_runtime_symbols(char *why, size_t why_len)
{
	int required = 1;

	SYM(cu.rt, RuntimeGetVersion, "cudaRuntimeGetVersion");
	SYM(cu.rt, DriverGetVersion, "cudaDriverGetVersion");
	SYM(cu.rt, GetDeviceCount, "cudaGetDeviceCount");
	SYM(cu.rt, SetDevice, "cudaSetDevice");
	SYM(cu.rt, Free, "cudaFree");
	SYM(cu.rt, Malloc, "cudaMalloc");
	SYM(cu.rt, DeviceGetAttribute, "cudaDeviceGetAttribute");
	SYM(cu.rt, GetErrorString, "cudaGetErrorString");
	SYM(cu.rt, GetLastError, "cudaGetLastError");
	SYM(cu.rt, StreamCreateWithFlags, "cudaStreamCreateWithFlags");
	SYM(cu.rt, StreamDestroy, "cudaStreamDestroy");
	SYM(cu.rt, StreamSynchronize, "cudaStreamSynchronize");
	SYM(cu.rt, StreamWaitEvent, "cudaStreamWaitEvent");
	SYM(cu.rt, EventCreateWithFlags, "cudaEventCreateWithFlags");
	SYM(cu.rt, EventDestroy, "cudaEventDestroy");
	SYM(cu.rt, EventRecord, "cudaEventRecord");
	SYM(cu.rt, EventSynchronize, "cudaEventSynchronize");
	SYM(cu.rt, EventElapsedTime, "cudaEventElapsedTime");
	SYM(cu.rt, MemcpyAsync, "cudaMemcpyAsync");
	SYM(cu.rt, HostRegister, "cudaHostRegister");
	SYM(cu.rt, HostUnregister, "cudaHostUnregister");
	SYM(cu.rt, HostGetDevicePointer, "cudaHostGetDevicePointer");
	SYM(cu.rt, IpcGetMemHandle, "cudaIpcGetMemHandle");
	SYM(cu.rt, IpcOpenMemHandle, "cudaIpcOpenMemHandle");
	SYM(cu.rt, IpcCloseMemHandle, "cudaIpcCloseMemHandle");
	SYM(cu.rt, IpcGetEventHandle, "cudaIpcGetEventHandle");
	SYM(cu.rt, IpcOpenEventHandle, "cudaIpcOpenEventHandle");
	required = 0;
	SYM(cu.rt, MemcpyBatchAsync_v13, "cudaMemcpyBatchAsync");
	return 0;
}

static int load_driver_symbols(char *why, size_t why_len)
{
	int required = 1;

	SYM(cu.drv, cuMemGetAddressRange, "cuMemGetAddressRange_v2");
	SYM(cu.drv, cuModuleLoadData, "cuModuleLoadData");
	SYM(cu.drv, cuModuleUnload, "cuModuleUnload");
	SYM(cu.drv, cuModuleGetFunction, "cuModuleGetFunction");
	SYM(cu.drv, cuLaunchKernel, "cuLaunchKernel");
	SYM(cu.drv, cuGetErrorString, "cuGetErrorString");
	return 0;
}

/* Read the runtime version (every runtime has it, with or without the batch API) and pick the
 * cudaMemcpyBatchAsync ABI by it: 12.8/12.9 take failIdx, 13.0+ do not, older have no batch call. */
static void pick_batch_abi(void)
{
	void *fn = (void *)cu.MemcpyBatchAsync_v13;

	cu.MemcpyBatchAsync_v13 = NULL;
	cu.MemcpyBatchAsync_v12 = NULL;
	if (cu.RuntimeGetVersion(&cu.runtime_version) != 0)
		cu.runtime_version = 0;
	if (!fn)
		return;
	if (cu.runtime_version >= 13000)
		*(void **)(&cu.MemcpyBatchAsync_v13) = fn;
	else if (cu.runtime_version >= 12080)
		*(void **)(&cu.MemcpyBatchAsync_v12) = fn;
}

static int load_locked(const char *cudart_path, char *why, size_t why_len)
{
	int rc;

	cu.rt = open_cudart(cudart_path);
	if (!cu.rt) {
		snprintf(why, why_len, "libcudart not found (%s)", dlerror());
		return -ENOENT;
	}
	cu.drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
	if (!cu.drv) {
		snprintf(why, why_len, "libcuda.so.1 not found: no NVIDIA driver (%s)", dlerror());
		return -ENOENT;
	}
	rc = load_runtime_symbols(why, why_len);
	if (rc == 0)
		rc = load_driver_symbols(why, why_len);
	if (rc == 0) {
		pick_batch_abi();
		cu.loaded = 1;
	}
	return rc;
}

int fkv_cuda_load(const char *cudart_path, char *why, size_t why_len)
{
	int rc = 0;

	if (!why || why_len == 0)
		return -EINVAL;
	why[0] = '\0';
	pthread_mutex_lock(&load_lock);
	if (!cu.loaded)
		rc = load_locked(cudart_path, why, why_len);
	pthread_mutex_unlock(&load_lock);
	return rc;
}

/* ---------------------------------------------------------------- errors */

int fkv_fail(struct fkv_err *err, int code, int driver_api, const char *call)
{
	if (err) {
		err->cuda_code = code;
		err->driver_api = driver_api;
		err->call = call;
	}
	return -EIO;
}

const char *fkv_cuda_error_string(int code, int driver_api)
{
	const char *s = NULL;

	if (!cu.loaded)
		return "CUDA libraries not loaded";
	if (driver_api) {
		if (cu.cuGetErrorString(code, &s) != 0 || !s)
			s = "unknown driver error";
		return s;
	}
	return cu.GetErrorString(code);
}

int fkv_cuda_probe(int *num_devices, int *runtime_version, int *driver_version, struct fkv_err *err)
{
	NEED_LOADED();
	*runtime_version = cu.runtime_version;
	*driver_version = 0;
	*num_devices = 0;
	RT("cudaDriverGetVersion", cu.DriverGetVersion(driver_version));
	RT("cudaGetDeviceCount", cu.GetDeviceCount(num_devices));
	return 0;
}

/* ---------------------------------------------------------------- host registration, IPC, events */

int fkv_host_register(int device, uint64_t addr, uint64_t nbytes, struct fkv_err *err)
{
	NEED_LOADED();
	if (!addr || !nbytes)
		return -EINVAL;
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaHostRegister",
	   cu.HostRegister((void *)(uintptr_t)addr, nbytes, CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_MAPPED));
	return 0;
}

int fkv_host_unregister(int device, uint64_t addr, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaHostUnregister", cu.HostUnregister((void *)(uintptr_t)addr));
	return 0;
}

int fkv_ipc_get_mem_handle(int device, uint64_t ptr, uint8_t *handle, uint64_t *base, uint64_t *size,
			   struct fkv_err *err)
{
	cuda_ipc_mem_handle_t h;
	cu_deviceptr_t b = 0;
	size_t n = 0;

	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaFree(0)", cu.Free(NULL));
	DRV("cuMemGetAddressRange", cu.cuMemGetAddressRange(&b, &n, (cu_deviceptr_t)ptr));
	RT("cudaIpcGetMemHandle", cu.IpcGetMemHandle(&h, (void *)(uintptr_t)b));
	memcpy(handle, h.reserved, FKV_CUDA_IPC_HANDLE_BYTES);
	*base = b;
	*size = n;
	return 0;
}

int fkv_ipc_open_mem_handle(int device, const uint8_t *handle, uint64_t *ptr, struct fkv_err *err)
{
	cuda_ipc_mem_handle_t h;
	void *p = NULL;

	NEED_LOADED();
	memcpy(h.reserved, handle, FKV_CUDA_IPC_HANDLE_BYTES);
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaIpcOpenMemHandle", cu.IpcOpenMemHandle(&p, h, CUDA_IPC_LAZY_PEER_ACCESS));
	*ptr = (uint64_t)(uintptr_t)p;
	return 0;
}

int fkv_ipc_close_mem_handle(int device, uint64_t ptr, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaIpcCloseMemHandle", cu.IpcCloseMemHandle((void *)(uintptr_t)ptr));
	return 0;
}

int fkv_ipc_get_event_handle(int device, uintptr_t event, uint8_t *handle, struct fkv_err *err)
{
	cuda_ipc_event_handle_t h;

	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaIpcGetEventHandle", cu.IpcGetEventHandle(&h, (cuda_event_t)event));
	memcpy(handle, h.reserved, FKV_CUDA_IPC_HANDLE_BYTES);
	return 0;
}

int fkv_ipc_open_event_handle(int device, const uint8_t *handle, uintptr_t *event, struct fkv_err *err)
{
	cuda_ipc_event_handle_t h;
	cuda_event_t ev = NULL;

	NEED_LOADED();
	memcpy(h.reserved, handle, FKV_CUDA_IPC_HANDLE_BYTES);
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaIpcOpenEventHandle", cu.IpcOpenEventHandle(&ev, h));
	*event = (uintptr_t)ev;
	return 0;
}

int fkv_event_create(int device, int interprocess, uintptr_t *event, struct fkv_err *err)
{
	unsigned int fl = CUDA_EVENT_DISABLE_TIMING | (interprocess ? CUDA_EVENT_INTERPROCESS : 0);
	cuda_event_t ev = NULL;

	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaEventCreateWithFlags", cu.EventCreateWithFlags(&ev, fl));
	*event = (uintptr_t)ev;
	return 0;
}

int fkv_event_destroy(uintptr_t event, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaEventDestroy", cu.EventDestroy((cuda_event_t)event));
	return 0;
}

int fkv_event_synchronize(uintptr_t event, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaEventSynchronize", cu.EventSynchronize((cuda_event_t)event));
	return 0;
}

/* Make ``device`` current for the calling thread (a new thread starts on device 0: a call that
 * needs a context there would create one, ~0.1 s and hundreds of MiB on a GPU we never use). */
int fkv_set_device(int device, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	return 0;
}

/* Record on any stream of this process (an engine's compute stream: its "KV written" signal). */
int fkv_event_record(uintptr_t event, uintptr_t stream, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaEventRecord", cu.EventRecord((cuda_event_t)event, (cuda_stream_t)stream));
	return 0;
}

int fkv_device_alloc(int device, uint64_t nbytes, uint64_t *ptr, struct fkv_err *err)
{
	void *p = NULL;

	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaMalloc", cu.Malloc(&p, nbytes));
	*ptr = (uint64_t)(uintptr_t)p;
	return 0;
}

int fkv_device_free(int device, uint64_t ptr, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaFree", cu.Free((void *)(uintptr_t)ptr));
	return 0;
}

int fkv_memcpy_sync(int device, uint64_t dst, uint64_t src, uint64_t nbytes, struct fkv_err *err)
{
	NEED_LOADED();
	RT("cudaSetDevice", cu.SetDevice(device));
	RT("cudaMemcpyAsync", cu.MemcpyAsync((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, nbytes,
					     CUDA_MEMCPY_DEFAULT, NULL));
	RT("cudaStreamSynchronize", cu.StreamSynchronize(NULL));
	return 0;
}

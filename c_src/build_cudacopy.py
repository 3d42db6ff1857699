"""cffi build script (API mode, out-of-line) for the CUDA copy engine -> flexkv.native._cudacopy.

One module from three sources: ``cuda_runtime.c`` (dlopens libcudart/libcuda at run time, errors, host
registration, IPC, events), ``cudacopy.c`` (the copy engine: state, BATCH path, dispatch) and
``cudacopy_kernels.c`` (the STAGED and KERNEL paths), sharing ``cuda_internal.h``; the two engine files
also share ``cudacopy_engine.h``. Nothing links against CUDA. When ``nvcc`` is found (``$FLEXKV_NVCC``,
``PATH``, ``/usr/local/cuda/bin``), ``copy_kernels.cu`` is compiled to PTX at ``flexkv/native/copy_kernels.ptx``
for the STAGED and KERNEL paths; without nvcc the build still succeeds and those paths report themselves
unavailable.
"""
import os
import shutil
import subprocess
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS_CU = os.path.join(HERE, "copy_kernels.cu")
KERNELS_PTX = os.path.join(os.path.dirname(HERE), "flexkv", "native", "copy_kernels.ptx")
PTX_ARCH = "compute_75"  # the driver JITs it for the device (sm_90 included)
SOURCES = ("cuda_runtime.c", "cudacopy.c", "cudacopy_kernels.c")
HEADERS = ("cudacopy.h", "cuda_api.h", "cuda_internal.h", "cudacopy_engine.h")  # only cudacopy.h is the cdef


def find_nvcc() -> str | None:
    for cand in (os.environ.get("FLEXKV_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def build_ptx() -> None:
    """Compile the copy kernels to PTX when the .cu is newer than the .ptx; never fails the build."""
    if os.path.exists(KERNELS_PTX) and os.path.getmtime(KERNELS_PTX) >= os.path.getmtime(KERNELS_CU):
        return
    nvcc = find_nvcc()
    if nvcc is None:
        print("build_cudacopy: nvcc not found; GPU kernel paths (STAGED, KERNEL) will be unavailable", file=sys.stderr)
        return
    cmd = [nvcc, "-ptx", f"-arch={PTX_ARCH}", "-O3", "-o", KERNELS_PTX + ".tmp", KERNELS_CU]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(KERNELS_PTX + ".tmp", KERNELS_PTX)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        print(f"build_cudacopy: nvcc failed, kernel paths unavailable: {detail}", file=sys.stderr)


build_ptx()

with open(os.path.join(HERE, "cudacopy.h")) as f:
    _header = f.read()
_cdef = "\n".join(
    line for line in _header.splitlines() if not line.startswith("#")
)

ffibuilder = FFI()
ffibuilder.cdef(_cdef)
ffibuilder.set_source(
    "flexkv.native._cudacopy",
    '#include "cudacopy.h"',
    sources=[os.path.join(HERE, name) for name in SOURCES],
    depends=[os.path.join(HERE, name) for name in HEADERS],
    include_dirs=[HERE],
    libraries=["dl", "pthread"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

#!/usr/bin/env bash
# One-shot check on a CUDA machine (~4 min, never hangs): build the CUDA copy engine in place, run
# tests/test_cudacopy.py and a short gpu_transfer benchmark, then say what passed and what failed.
#   bash benchmarks/gpu_device_check.sh            (PYTHON=python3.12 to pick the interpreter)
# Offline machines: put cffi, pycparser and msgspec wheels in .whl/ (see docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { printf '[gpu_device_check] %s\n' "$*"; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say "python: $($PY -V 2>&1); nvcc: $(command -v nvcc || echo none)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/[gpu_device_check] gpu: /'

if ! $PY -c "import cffi, msgspec" 2>/dev/null; then
  whls=$(ls .whl/cffi-*.whl .whl/pycparser-*.whl .whl/msgspec-*.whl 2>/dev/null | tr '\n' ' ')
  [ -n "$whls" ] || { say "FAIL: cffi/msgspec missing and no wheels in .whl/"; exit 1; }
  say "installing carried wheels: $whls"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/flexkv_site $whls \
    || { say "FAIL: wheel install"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/flexkv_site"
fi

say "building flexkv.native._cudacopy (+ copy_kernels.ptx) in place"
rm -f flexkv/native/copy_kernels.ptx
if ! timeout 300 $PY -c "import shutil, sys; sys.path.insert(0, 'c_src'); import build_cudacopy as b; \
shutil.copy(b.ffibuilder.compile(tmpdir='/tmp/flexkv_cffi_build'), 'flexkv/native/')" > /tmp/flexkv_build.log 2>&1; then
  cat /tmp/flexkv_build.log; say "FAIL: build"; exit 1
fi
grep -i -E "warning|error|nvcc" /tmp/flexkv_build.log | head -20
[ -f flexkv/native/copy_kernels.ptx ] && say "PTX built" || say "no PTX: kernel paths will be unavailable"
$PY -c "from flexkv.native import cudacopy as c; print('[gpu_device_check] cuda_available:', c.cuda_available())"

say "tests: pytest tests/test_cudacopy.py"
timeout 200 $PY -m pytest tests/test_cudacopy.py -v -s -rs -p no:cacheprovider --timeout 100
tests_rc=$?
say "benchmark: gpu_transfer.py --quick"
timeout 120 $PY benchmarks/gpu_transfer.py --quick
bench_rc=$?
say "tests exit $tests_rc ($([ $tests_rc = 0 ] && echo PASS || echo FAIL)); benchmark exit $bench_rc ($([ $bench_rc = 0 ] && echo PASS || echo FAIL))"
[ $tests_rc = 0 ] && [ $bench_rc = 0 ]

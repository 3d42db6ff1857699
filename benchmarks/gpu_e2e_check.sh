#!/usr/bin/env bash
# On a CUDA machine (2 GPUs for the TP=2 parts), from the repo root, with the wheels of
# `../shared/tools/device_wheels.sh redis` in .whl/: build without liburing, then run the named parts
# (default: all, in this order):
#   stack     the GPU tests through the whole stack (TP=2 on two GPUs, the "KV written" event across
#             processes, put + get at once), worker lanes, and BATCH under every CUDA runtime found
#   transfer  benchmarks/gpu_transfer.py --stack (through the server and the worker) at T=16
#   example   examples/scheduler_server_example.py on CUDA: every layout at TP=2, and a 32-layer run
#   tests     the CUDA engine tests and the runtime tests
#   engine    benchmarks/gpu_transfer.py, engine level, every path, T=16 and 64
# Prints PASS/FAIL per step; with $OUT set, each step's whole output is kept in $OUT/<step>.log.
# Headers the machine lacks (xxhash.h) may be carried in .devinc/; CUDA runtime wheels in .devinc/cudart/
# (`pip download nvidia-cuda-runtime-cu12==12.8.*` and the like) are unpacked, and the "stack" part's
# BATCH ABI test runs under their libcudart too (FLEXKV_TEST_CUDARTS).
set -uo pipefail
export PYTHONUNBUFFERED=1
say() { printf '[gpu_e2e %s] %s\n' "$(date +%T)" "$*"; }
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(stack transfer example tests engine)
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
ln -sfn ../scheduler flexkv/scheduler && ln -sfn ../workers flexkv/workers   # what the install's package_dir does
trap 'rm -f flexkv/scheduler flexkv/workers' EXIT
CFLAGS="-I$PWD/.devinc ${CFLAGS:-}" FLEXKV_SKIP_EXTENSIONS=uring python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
extra=()
for whl in .devinc/cudart/*.whl; do
  [ -e "$whl" ] || continue
  dir=/tmp/cudart/$(basename "$whl" .whl)
  python3 -m zipfile -e "$whl" "$dir" && extra+=("$(find "$dir" -name 'libcudart.so.[0-9]*' | head -1)")
done
export FLEXKV_TEST_CUDARTS; FLEXKV_TEST_CUDARTS=$(IFS=:; echo "${extra[*]}")
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)
tp=$(( ngpu >= 2 ? 2 : 1 ))
rc=0
n=0
step() {  # step <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  n=$((n + 1))
  local slug; slug=$(printf '%s' "$name" | tr -c 'A-Za-z0-9_-' '_')
  local log="${OUT:-/tmp}/$(printf '%02d' $n)-$slug.log"
  say "== $name"
  if timeout "$limit" "$@" > "$log" 2>&1; then say "PASS $name"; else say "FAIL $name (rc $?)"; rc=1; fi
  grep -v ' INFO ' "$log" | tail -25
}
PYTEST=(python3 -m pytest -q -rs -s -p no:cacheprovider --timeout 200)
for part in "${parts[@]}"; do
  case $part in
  stack)
    step 300 "pytest stack" "${PYTEST[@]}" tests/runtime/test_cuda_stack.py tests/runtime/test_worker_lanes.py \
      tests/integration/test_vllm_gpu_views.py \
      tests/test_cudacopy.py::test_batch_copies_are_byte_exact_with_every_cuda_runtime_installed ;;
  transfer)
    step 240 "gpu_transfer --stack T=16" python3 benchmarks/gpu_transfer.py --stack --tokens-per-block 16 ;;
  example)
    step 150 "example tp=$tp vllm_kv_first" python3 examples/scheduler_server_example.py --tp-size $tp --layout vllm_kv_first
    step 200 "example llama8b tp=1 32 layers" python3 examples/scheduler_server_example.py \
      --num-layers 32 --num-prompts 16 --prompt-tokens 2048
    for layout in vllm_block_first sglang mla; do
      step 150 "example tp=$tp $layout" python3 examples/scheduler_server_example.py --tp-size $tp --layout $layout
    done ;;
  tests)
    step 400 "pytest cuda+runtime" "${PYTEST[@]}" tests/test_cudacopy.py tests/runtime/test_put_get.py \
      tests/runtime/test_multiprocess.py tests/runtime/test_bad_input.py ;;
  engine)
    step 300 "gpu_transfer engine level" python3 benchmarks/gpu_transfer.py ;;
  *) say "unknown part $part"; rc=1 ;;
  esac
done
exit $rc

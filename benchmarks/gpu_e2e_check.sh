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
#   smallops  (not in the default list) the small-op line of gpu_transfer.py --stack with busy_poll_us 0,
#             200 and 1000 (issue 17 §3: a 4-block get/put p50 <= 0.35 ms), and small_ops.py on host buffers
#   ipc       (not in the default list) benchmarks/ipc_latency.py (one round trip between two processes by
#             mechanism: the floor under a hop) back to back and idle, cold_path.py (the server's work for
#             one small get, hot and after idling), and small_ops.py --breakdown
#   landing   (not in the default list) gpu_transfer.py --stack T=16 with the rank registered layer-wise
#             through the manager (GET waits end from its progress table), and small_ops.py both ways
#   ops       (not in the default list; needs a prometheus_client wheel in .whl/) `flexkv check --gpu`, and
#             metrics off vs on: control_latency.py --metrics and throughput.py --metrics (host buffers)
#   layerwise layer-wise GET on CUDA (per-layer events, bytes exact at every layer wait, failures wake
#             every waiter), the KV fence on CUDA memory, and the HF engine on CUDA (bit-exact restores,
#             conversations unchanged), its CPU tests too
#   numerics  benchmarks/hf_numerics.py (this host's CPU: numerics vs wrong KV)
#   hf        (not in the default list) the HF engine tests alone (part of layerwise): CUDA restores, CUDA
#             graphs of the suffix, bit-exact against the engine without flexkv
#   timeline  (not in the default list) benchmarks/restore_timeline.py at 2K, 8K and 32K: where each layer-wise
#             restore's time goes, restore by restore, lane and worker process ($TIMELINE_ARGS passed on)
#   ttft      benchmarks/ttft.py: TTFT of the HF engine, Llama-3-8B shape (not in the default list: ~3-5 min;
#             $TTFT_ARGS is passed on, e.g. "--skip-replay")
# Prints PASS/FAIL per step; with $OUT set, each step's whole output is kept in $OUT/<step>.log.
# Headers the machine lacks (xxhash.h) may be carried in .devinc/, liburing in .devinc/uring/, the
# conversation trace (ttft's replay) in .devinc/traces/; CUDA runtime wheels in .devinc/cudart/
# (`pip download nvidia-cuda-runtime-cu12==12.8.*` and the like) are unpacked, and the "stack" part's
# BATCH ABI test runs under their libcudart too (FLEXKV_TEST_CUDARTS).
set -uo pipefail
export PYTHONUNBUFFERED=1
[ -n "${OUT:-}" ] && mkdir -p "$OUT"
say() { printf '[gpu_e2e %s] %s\n' "$(date +%T)" "$*"; }
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(stack transfer example tests engine layerwise numerics)
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
ln -sfn ../scheduler flexkv/scheduler && ln -sfn ../workers flexkv/workers   # what the install's package_dir does
trap 'rm -f flexkv/scheduler flexkv/workers' EXIT
# liburing (headers + .so from Debian's liburing-dev/liburing2, unpacked into .devinc/uring, the links
# replaced by copies) gives the SSD tier there too; without it the io_uring module is skipped, and the
# exported FLEXKV_SKIP_EXTENSIONS makes the SSD tests skip with that reason (tests/runtime/kvtest.py).
export FLEXKV_SKIP_EXTENSIONS=uring
if [ -f .devinc/uring/liburing.h ]; then
  FLEXKV_SKIP_EXTENSIONS=""
  export LDFLAGS="-L$PWD/.devinc/uring/lib ${LDFLAGS:-}" LD_LIBRARY_PATH="$PWD/.devinc/uring/lib:${LD_LIBRARY_PATH:-}"
fi
CFLAGS="-I$PWD/.devinc -I$PWD/.devinc/uring ${CFLAGS:-}" python3 setup.py -q build_ext --inplace \
  > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
extra=()
for whl in .devinc/cudart/*.whl; do
  [ -e "$whl" ] || continue
  dir=/tmp/cudart/$(basename "$whl" .whl)
  python3 -m zipfile -e "$whl" "$dir" && extra+=("$(find "$dir" -name 'libcudart.so.[0-9]*' | head -1)")
done
export FLEXKV_TEST_CUDARTS; FLEXKV_TEST_CUDARTS=$(IFS=:; echo "${extra[*]}")
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)
tp=${EXAMPLE_TP:-$(( ngpu >= 2 ? 2 : 1 ))}  # EXAMPLE_TP=2 on one GPU: two ranks share it
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
  smallops)
    for spin in 0 200 1000; do
      step 240 "gpu_transfer --stack T=16 busy_poll_us=$spin" python3 benchmarks/gpu_transfer.py --stack \
        --tokens-per-block 16 --num-blocks 256 --repeats 1 --busy-poll-us $spin
    done
    step 120 "small_ops host buffers" python3 benchmarks/small_ops.py --iters 300 --busy-poll-us 0 200 1000
    step 120 "small_ops breakdown" python3 benchmarks/small_ops.py --iters 300 --breakdown --landing off ;;
  ipc)
    step 120 "ipc_latency back to back" python3 benchmarks/ipc_latency.py --iters 5000
    step 120 "ipc_latency idle 1 ms" python3 benchmarks/ipc_latency.py --iters 2000 --idle-us 1000
    step 120 "cold_path" python3 benchmarks/cold_path.py --iters 400
    step 120 "small_ops breakdown" python3 benchmarks/small_ops.py --iters 300 --breakdown --landing on ;;
  landing)
    step 240 "gpu_transfer --stack T=16 --landing" python3 benchmarks/gpu_transfer.py --stack --tokens-per-block 16 \
      --landing
    step 120 "small_ops host buffers, landing both ways" python3 benchmarks/small_ops.py --iters 300 ;;
  example)
    step 150 "example tp=$tp vllm_kv_first" python3 examples/scheduler_server_example.py --tp-size $tp --layout vllm_kv_first
    step 200 "example llama8b tp=1 32 layers" python3 examples/scheduler_server_example.py \
      --num-layers 32 --num-prompts 16 --prompt-tokens 2048
    for layout in vllm_block_first sglang mla vllm_packed_hnd vllm_packed_nhd; do
      step 150 "example tp=$tp $layout" python3 examples/scheduler_server_example.py --tp-size $tp --layout $layout
    done ;;
  tests)
    step 400 "pytest cuda+runtime" "${PYTEST[@]}" tests/test_cudacopy.py tests/runtime/test_put_get.py \
      tests/runtime/test_multiprocess.py tests/runtime/test_bad_input.py ;;
  engine)
    step 300 "gpu_transfer engine level" python3 benchmarks/gpu_transfer.py ;;
  ops)
    step 60 "flexkv check --gpu" python3 -c "import sys; from flexkv.cli import main; sys.exit(main(['check', '--gpu']))"
    step 300 "control_latency --metrics" python3 benchmarks/control_latency.py --metrics --sizes 1024 32768 --iters 2000
    step 300 "throughput --metrics" python3 benchmarks/throughput.py --tp 1 --metrics --prompt-blocks 1 \
      --engine-blocks 256 --cpu-blocks 300 --rounds 8 --warmup-rounds 2 ;;
  layerwise)
    step 300 "pytest layer-wise GET + HF engine (CUDA and CPU)" "${PYTEST[@]}" \
      tests/runtime/test_layerwise.py tests/runtime/test_landing.py tests/runtime/test_match_launch.py \
      tests/runtime/test_fence.py tests/integration/test_hf_engine.py ;;
  numerics)
    step 300 "hf_numerics (this host CPU)" \
      python3 benchmarks/hf_numerics.py ;;
  hf)
    step 300 "pytest HF engine (CUDA, graphs included, and CPU)" "${PYTEST[@]}" tests/integration/test_hf_engine.py ;;
  timeline)
    for tokens in ${TIMELINE_TOKENS:-2048 8192 32768}; do
      step 240 "restore_timeline $tokens" python3 benchmarks/restore_timeline.py --tokens $tokens ${TIMELINE_ARGS:-}
    done ;;
  ttft)
    trace=(); [ -f .devinc/traces/conversation_trace.jsonl ] && trace=(--trace .devinc/traces/conversation_trace.jsonl)
    step "${TTFT_LIMIT_S:-590}" "ttft (HF engine, Llama-3-8B shape)" python3 benchmarks/ttft.py "${trace[@]}" ${TTFT_ARGS:-} ;;
  *) say "unknown part $part"; rc=1 ;;
  esac
done
exit $rc

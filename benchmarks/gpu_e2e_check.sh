#!/usr/bin/env bash
# On a CUDA machine (2 GPUs for the TP=2 part), from the repo root, with the wheels of
# ../shared/tools/device_wheels.sh in .whl/: build without liburing, run the CUDA tests, the runtime
# tests, the end-to-end example on CUDA for every layout at TP=2, a Llama-3-8B-shaped run through the
# whole stack, and the copy-engine benchmark. Prints PASS/FAIL per step. Headers the machine lacks
# (xxhash.h) may be carried in .devinc/.
set -uo pipefail
export PYTHONUNBUFFERED=1
say() { printf '[gpu_e2e] %s\n' "$*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
ln -sfn ../scheduler flexkv/scheduler && ln -sfn ../workers flexkv/workers   # what the install's package_dir does
CFLAGS="-I$PWD/.devinc ${CFLAGS:-}" FLEXKV_SKIP_EXTENSIONS=uring python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)
rc=0
step() { local name=$1; shift; say "== $name"; if timeout 240 "$@"; then say "PASS $name"; else say "FAIL $name"; rc=1; fi; }
step "pytest cuda+runtime" python3 -m pytest -q -p no:cacheprovider --timeout 100 tests/test_cudacopy.py \
  tests/runtime/test_put_get.py tests/runtime/test_multiprocess.py tests/runtime/test_bad_input.py
tp=$(( ngpu >= 2 ? 2 : 1 ))
for layout in vllm_kv_first vllm_block_first sglang mla; do
  step "example tp=$tp $layout" python3 examples/scheduler_server_example.py --tp-size $tp --layout $layout
done
step "example llama8b tp=1 (throughput through the stack)" python3 examples/scheduler_server_example.py \
  --num-layers 32 --num-prompts 16 --prompt-tokens 2048
step "gpu_transfer --quick" python3 benchmarks/gpu_transfer.py --quick
rm -f flexkv/scheduler flexkv/workers
exit $rc

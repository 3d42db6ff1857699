#!/usr/bin/env bash
# Set up flexkv on a fresh Debian/Ubuntu machine: system packages, Python packages, the C build and an
# editable install. Idempotent; the second run only rebuilds the C extensions that changed.
#   ./build.sh            everything
#   FLEXKV_SKIP_APT=1     do not touch system packages (no root, or managed elsewhere)
set -euo pipefail
cd "$(dirname "$0")"
say() { printf '[build.sh] %s\n' "$*"; }
die() { printf '[build.sh] ERROR: %s\n' "$*" >&2; exit 1; }

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "$PY not found"

# --- system packages -------------------------------------------------------------------------
# libibverbs1 libnuma1 libcurl4: what the Mooncake Store binaries link against (remote backend);
# openssl: the TLS tests make their certificates with it
APT_PKGS=(liburing-dev libxxhash-dev redis-server fio libibverbs1 libnuma1 libcurl4 openssl)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -n "${FLEXKV_SKIP_APT:-}" ]; then
    say "skipping apt (FLEXKV_SKIP_APT set); missing: ${missing[*]}"
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "apt-get install ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  else
    die "missing system packages: ${missing[*]} (install them as root, or run this script as root)"
  fi
else
  say "system packages present: ${APT_PKGS[*]}"
fi

# --- torch ------------------------------------------------------------------------------------
# The engine API and the tests take torch tensors. A torch that is already importable is the user's
# (their engine's): it is never replaced or downgraded. Only when none imports do we install one:
#   FLEXKV_TORCH_SPEC   the pip requirement (default torch==2.13.0: the CPU wheel where pip finds it on
#                       local disk, the CUDA build from PyPI elsewhere)
#   FLEXKV_SKIP_TORCH=1 install none (flexkv's server and workers run without torch)
TORCH_SPEC=${FLEXKV_TORCH_SPEC:-torch==2.13.0}
if torch_version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  say "torch $torch_version present (kept as it is)"
elif [ -n "${FLEXKV_SKIP_TORCH:-}" ]; then
  say "no torch importable; not installing one (FLEXKV_SKIP_TORCH set): the engine API and tests need it"
else
  say "no torch importable: pip install $TORCH_SPEC (FLEXKV_TORCH_SPEC overrides, FLEXKV_SKIP_TORCH=1 skips)"
  "$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v -E "^WARNING: (Location|Running pip)" || true
  "$PY" -c 'import torch' 2>/dev/null || die "pip install $TORCH_SPEC failed (set FLEXKV_TORCH_SPEC to a torch your machine can install)"
fi

# --- Python packages -------------------------------------------------------------------------
PY_PKGS=(setuptools wheel "cffi>=1.16" "numpy>=1.24" "pyzmq>=25" "posix_ipc>=1.1" "msgspec>=0.18"
         "xxhash>=3.0" "PyYAML>=6.0" "redis>=5.0" "hiredis>=2.0" "prometheus-client>=0.17"
         "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6.100" "ruff>=0.5" "mypy>=1.10"
         "transformers>=5.17")  # the HF reference engine (flexkv/integration/hf) and its tests
say "pip install (already satisfied requirements cost no download)"
"$PY" -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}" 2>&1 | grep -v -E "^WARNING: (Location|Running pip)" || true
"$PY" -c "import cffi, zmq, posix_ipc, msgspec, xxhash, yaml, redis, numpy, prometheus_client" || die "pip install failed"

# --- Mooncake Store client (optional remote backend) ---------------------------------------------
# The non-CUDA wheel (46 MB; CPython 3.11/3.12, x86_64 manylinux) carries the client and the
# mooncake_master binary that its tests start on loopback. The CUDA build needs libcuda at import:
# GPU hosts that want RDMA from GPU memory install mooncake-transfer-engine themselves.
#   FLEXKV_SKIP_MOONCAKE=1  do not install it (its tests then skip, naming the package)
MOONCAKE_SPEC=mooncake-transfer-engine-non-cuda==0.3.13.post1
if "$PY" -c 'import mooncake.store' 2>/dev/null; then
  say "mooncake present"
elif [ -n "${FLEXKV_SKIP_MOONCAKE:-}" ]; then
  say "not installing $MOONCAKE_SPEC (FLEXKV_SKIP_MOONCAKE set)"
elif [ "$(uname -m)" = x86_64 ]; then
  say "pip install $MOONCAKE_SPEC"
  "$PY" -m pip install -q --disable-pip-version-check "$MOONCAKE_SPEC" 2>&1 | grep -v -E "^WARNING: (Location|Running pip)" || true
  "$PY" -c 'import mooncake.store' 2>/dev/null || say "WARNING: $MOONCAKE_SPEC did not install; Mooncake tests will skip"
else
  say "no $MOONCAKE_SPEC wheel for $(uname -m); Mooncake tests will skip"
fi

# --- C extensions + editable install ---------------------------------------------------------
say "building C extensions (cffi) in place"
"$PY" setup.py -q build_ext --inplace || die "C build failed (see the compiler output above)"
# Check from / so the checkout on sys.path cannot mask where the installed package really points.
installed_at=$(cd / && "$PY" -c 'import os, flexkv.scheduler as s; print(os.path.dirname(os.path.dirname(os.path.abspath(s.__file__))))' 2>/dev/null || true)
# The `flexkv` command is an entry point: an editable install made before it existed lacks it.
scripts_dir=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if [ "$installed_at" != "$PWD" ] || [ ! -x "$scripts_dir/flexkv" ]; then
  say "pip install -e . (editable${installed_at:+; was installed from $installed_at})"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -E "^WARNING: Running pip" || true
  installed_at=$(cd / && "$PY" -c 'import os, flexkv.scheduler as s; print(os.path.dirname(os.path.dirname(os.path.abspath(s.__file__))))' 2>/dev/null || true)
  [ "$installed_at" = "$PWD" ] || die "editable install failed (flexkv resolves to '${installed_at:-nothing}')"
else
  say "editable install present"
fi
(cd / && "$PY" -c "import flexkv.native.hasher, flexkv.scheduler, flexkv.workers") || die "flexkv does not import after the build"
say "done: try 'flexkv serve' (or 'python examples/run_server.py'), 'flexkv check' or 'python -m pytest'"

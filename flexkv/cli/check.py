"""Check what this machine offers flexkv, one line each: ok, or missing with the fix.

    flexkv check                                    # CUDA, io_uring, /dev/shm against the configured pool
    flexkv check --ssd-dir /nvme0/flexkv --redis 10.0.0.5:6379 --cpu-cache-gb 64

Exit status 0 when everything the options ask for is there: /dev/shm room for the pool always,
io_uring and O_DIRECT with ``--ssd-dir``, redis with ``--redis``, CUDA with ``--gpu``. A line for
CUDA is printed either way (a CPU-only machine serves CPU engines and host-memory KV).
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import NamedTuple

from flexkv.common.config import GIB, ModelConfig, cache_config_from_user, read_user_config
from flexkv.types import ConfigError

SHM_DIR = "/dev/shm"


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        state = "ok" if self.ok else "missing"
        text = f"{state:<8} {self.name:<10} {self.detail}"
        return text if self.ok or not self.fix else f"{text} -- fix: {self.fix}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ssd-dir", action="append", default=[], help="an SSD cache directory to test (repeatable)")
    p.add_argument("--redis", default=None, metavar="HOST:PORT", help="a redis/valkey server to reach")
    p.add_argument("--gpu", action="store_true", help="fail unless CUDA and a GPU are usable")
    p.add_argument("--cpu-cache-gb", type=float, default=None,
                   help="the CPU pool to check /dev/shm against (default: the user config's cpu_cache_gb)")
    p.add_argument("--config", default=None, help="user config file (same as FLEXKV_CONFIG_PATH)")


def check_cuda(required: bool) -> Check:
    from flexkv.native.cudacopy import cuda_available

    ok, detail = cuda_available()
    if ok:
        names = _gpu_names()
        return Check("cuda", True, detail + (f" ({names})" if names else ""), required=required)
    return Check("cuda", False, detail, "install the NVIDIA driver and a CUDA runtime (pip install "
                 "nvidia-cuda-runtime-cu12, or set FLEXKV_CUDART to libcudart.so); CPU engines do not need it",
                 required=required)


def _gpu_names() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    names = [n.strip() for n in out.splitlines() if n.strip()]
    return ", ".join(sorted(set(names))) if names else ""


def check_io_uring(required: bool) -> Check:
    from flexkv import native

    if not native.built("uring"):
        return Check("io_uring", False, "the io_uring extension is not built",
                     native.URING_FIX, required)
    from flexkv.native.uring import UringEngine

    try:
        with UringEngine(depth=8):
            pass
    except OSError as e:
        return Check("io_uring", False, f"the kernel refused a ring: {e.strerror or e}",
                     "use Linux >= 5.6 with io_uring enabled (sysctl kernel.io_uring_disabled=0; containers: "
                     "allow io_uring_setup in the seccomp profile)", required)
    return Check("io_uring", True, "a ring of depth 8 set up", required=required)


def check_o_direct(path: str) -> Check:
    name = "O_DIRECT"
    if not os.path.isdir(path):
        return Check(name, False, f"{path} is not a directory", f"mkdir -p {path}")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(name, False, f"{path} is not writable by this user", f"chown or chmod {path}")
    fd, tmp = tempfile.mkstemp(prefix=".flexkv-check-", dir=path)
    os.close(fd)
    try:
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            return Check(name, False, f"{path}: open with O_DIRECT failed: {e.strerror}",
                         "put the SSD cache on a local file system that supports O_DIRECT (ext4, xfs); tmpfs "
                         "and some overlay/network mounts do not")
        try:
            buf = mmap.mmap(-1, 4096)  # page-aligned
            buf.write(b"\xa5" * 4096)
            os.pwrite(fd, buf, 0)
        except OSError as e:
            hint = "" if e.errno != errno.EINVAL else " (the device wants larger alignment)"
            return Check(name, False, f"{path}: a 4 KiB O_DIRECT write failed: {e.strerror}{hint}",
                         "use a local ext4/xfs file system on the SSD")
        finally:
            os.close(fd)
        free = shutil.disk_usage(path).free
        return Check(name, True, f"{path}: 4 KiB aligned write ok, {free / GIB:.1f} GiB free")
    finally:
        os.unlink(tmp)


def check_shm(pool_bytes: int | None) -> Check:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError as e:
        return Check("/dev/shm", False, f"cannot stat {SHM_DIR}: {e.strerror}", "mount a tmpfs on /dev/shm")
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    have = f"{free / GIB:.1f} GiB free of {size / GIB:.1f} GiB"
    if pool_bytes is None:
        return Check("/dev/shm", True, f"{have} (no pool size given: --cpu-cache-gb)")
    need = f"the CPU pool needs {pool_bytes / GIB:.1f} GiB"
    if pool_bytes > free:
        return Check("/dev/shm", False, f"{have}; {need}",
                     f"shrink cpu_cache_gb (or num_cpu_blocks), or grow /dev/shm: mount -o remount,size="
                     f"{-(-pool_bytes // GIB) + 1}G /dev/shm (docker: --shm-size)")
    return Check("/dev/shm", True, f"{have}; {need}")


def check_redis(target: str) -> Check:
    host, _, port_text = target.rpartition(":")
    if not host or not port_text.isdigit():
        return Check("redis", False, f"{target!r} is not HOST:PORT", "pass e.g. --redis 127.0.0.1:6379")
    try:
        with socket.create_connection((host, int(port_text)), timeout=2.0) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            s.settimeout(2.0)
            reply = s.recv(128)
    except OSError as e:
        return Check("redis", False, f"{target}: {e.strerror or e}",
                     "start redis-server/valkey there, or check the address and firewall")
    if reply.startswith(b"+PONG"):
        return Check("redis", True, f"{target}: PING answered")
    if b"NOAUTH" in reply:
        return Check("redis", True, f"{target}: reachable, wants a password (set remote_password)")
    return Check("redis", False, f"{target}: unexpected reply {reply[:60]!r}", "is this a redis server?")


def _pool_bytes(args: argparse.Namespace) -> int | None:
    """The CPU pool size the options or the user config name (the default model's block size)."""
    env = dict(os.environ)
    if args.config:
        env["FLEXKV_CONFIG_PATH"] = args.config
    values, _ = read_user_config(env)
    if args.cpu_cache_gb is not None:
        values["cpu_cache_gb"] = args.cpu_cache_gb
    if "cpu_cache_gb" not in values:
        return None
    model = ModelConfig(32, 8, 128, "bfloat16")
    cache = cache_config_from_user(model, values)
    return cache.num_cpu_blocks * model.block_bytes(cache.tokens_per_block)


def run(args: argparse.Namespace) -> int:
    try:
        pool = _pool_bytes(args)
    except ConfigError as e:
        print(f"flexkv check: config error: {e}", file=sys.stderr)
        return 2
    checks = [check_cuda(required=args.gpu), check_io_uring(required=bool(args.ssd_dir)), check_shm(pool)]
    checks += [check_o_direct(d) for d in args.ssd_dir]
    if args.redis:
        checks.append(check_redis(args.redis))
    for c in checks:
        print(c.line())
    return int(any(c.required and not c.ok for c in checks))

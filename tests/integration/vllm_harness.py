"""vLLM's real Scheduler driven step by step on CPU, with our connector on both sides.

The scheduler side is the one vLLM's Scheduler creates itself (from kv_transfer_config); the worker
side is a second instance of our connector in the WORKER role over real KV memory shaped the way
vLLM >= 0.26 shapes it (per-layer LBHNC views over one buffer), registered through the engine-side
lane. A stand-in "model" writes each computed token's KV as a known function of (layer, position,
token), so every load can be checked byte for byte, and samples a fixed token. Imports vLLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from flexkv.integration.vllm.connector import FlexKVConnector

BLOCK = 32
HEADS, HEAD_DIM, LAYERS = 2, 64, 2
MODULE = "flexkv.integration.vllm.connector"
POISON = float("nan")


def write_tiny_llama(path: Path) -> Path:
    """A config-only Llama (dummy weights): 2 layers, 2 KV heads of 64 (CPU attention needs >= 64)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "head_dim": HEAD_DIM, "vocab_size": 512, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2}))
    return path


def kv_transfer_config(policy: str = "recompute", **extra: Any) -> KVTransferConfig:
    return KVTransferConfig(kv_connector="FlexKVConnector", kv_connector_module_path=MODULE, kv_role="kv_both",
                            kv_load_failure_policy=policy, kv_connector_extra_config=dict(extra))


def layer_views(num_blocks: int, layout: str = "LBHNC") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One buffer, one logical [blocks, heads, block_size, 2*head_dim] view per layer, physically
    LBHNC (contiguous) or LBNHC (tokens before heads), as vLLM makes them."""
    per_layer = num_blocks * HEADS * BLOCK * 2 * HEAD_DIM
    buf = torch.full((LAYERS * per_layer,), POISON, dtype=torch.bfloat16)
    views = {}
    for i in range(LAYERS):
        flat = buf[i * per_layer:(i + 1) * per_layer]
        views[f"model.layers.{i}.self_attn.attn"] = (
            flat.view(num_blocks, HEADS, BLOCK, 2 * HEAD_DIM) if layout == "LBHNC"
            else flat.view(num_blocks, BLOCK, HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3))
    return buf, views


_PATTERN = torch.arange(HEADS * 2 * HEAD_DIM, dtype=torch.float32).reshape(HEADS, -1).remainder(5)


def tokens_kv(layer: int, first_pos: int, tokens: list[int]) -> torch.Tensor:
    """The KV the stand-in model writes for consecutive tokens of one layer: [heads, n, 2*head_dim],
    a known function of (layer, position, token), exact in bf16."""
    pos = torch.arange(first_pos, first_pos + len(tokens), dtype=torch.int64)
    base = (layer * 131 + pos * 7 + torch.tensor(tokens, dtype=torch.int64) * 3) % 251
    return (_PATTERN[:, None, :] + base.to(torch.float32)[None, :, None]).to(torch.bfloat16)


class SchedulerHarness:
    def __init__(self, model_dir: Path, num_blocks: int = 48, policy: str = "recompute", layout: str = "LBHNC",
                 prefix_caching: bool = True, **extra: Any) -> None:
        args = EngineArgs(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
                          block_size=BLOCK, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=1024,
                          enable_prefix_caching=prefix_caching, kv_transfer_config=kv_transfer_config(policy, **extra))
        self.config = args.create_engine_config()
        self.config.cache_config.kv_cache_layout = layout  # the engine core resolves it before the scheduler
        self.config.cache_config.num_gpu_blocks = num_blocks
        self.buf, self.views = layer_views(num_blocks, layout)
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16)
        names = list(self.views)
        page = HEADS * BLOCK * 2 * HEAD_DIM * 2
        self.kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[KVCacheTensor(size=self.buf.numel() * 2, layers=names, layer_stride=page * num_blocks,
                                            block_stride=page)],
            kv_cache_groups=[KVCacheGroupSpec(names, spec)], kv_cache_layout=layout)
        self.worker = FlexKVConnector(self.config, KVConnectorRole.WORKER, self.kv_cache_config)
        self.worker.register_kv_caches(self.views)
        self.scheduler = Scheduler(self.config, self.kv_cache_config, StructuredOutputManager(self.config),
                                   block_size=BLOCK)
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(BLOCK, sha256)
        self.sampled: dict[str, list[int]] = {}
        self.errors: dict[str, str] = {}

    @property
    def side(self) -> Any:
        """Our scheduler-side state (flexkv.integration.vllm.scheduler_side.SchedulerSide)."""
        connector = self.scheduler.connector
        assert isinstance(connector, FlexKVConnector) and connector.impl.scheduler is not None
        return connector.impl.scheduler

    def add(self, req_id: str, tokens: list[int], max_tokens: int = 2) -> Request:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = Request(req_id, tokens, params, None, block_hasher=self._hasher)
        self.scheduler.add_request(request)
        return request

    def step(self) -> Any:
        """One engine step: schedule, the worker side's hooks, the stand-in forward, the output."""
        out = self.scheduler.schedule()
        self.worker.bind_connector_metadata(out.kv_connector_metadata)
        self.worker.start_load_kv(None)
        ids = list(out.num_scheduled_tokens)
        for req_id in ids:
            self._forward(req_id, out.num_scheduled_tokens[req_id])
        sending, recving = self.worker.get_finished(out.finished_req_ids)
        kv_out = KVConnectorOutput(finished_sending=sending, finished_recving=recving,
                                   invalid_block_ids=self.worker.get_block_ids_with_load_errors())
        self.worker.clear_connector_metadata()
        sampled = [[100 + len(self.sampled.setdefault(r, []))] for r in ids]
        runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                   sampled_token_ids=sampled, kv_connector_output=kv_out)
        outputs = self.scheduler.update_from_output(out, runner)
        for eco in outputs.values():
            for o in eco.outputs:
                self.sampled.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None and o.finished and o.stop_reason is None and not o.new_token_ids:
                    self.errors[o.request_id] = str(o.finish_reason)
        return out

    def _forward(self, req_id: str, num_new: int) -> None:
        """Write the KV of the tokens this step computes (the scheduler already advanced the count)."""
        request = self.scheduler.requests[req_id]
        end = request.num_computed_tokens
        start = end - num_new
        (block_ids,) = self.scheduler.kv_cache_manager.get_block_ids(req_id)
        tokens = request.all_token_ids
        pos = start
        while pos < end:
            block, off = block_ids[pos // BLOCK], pos % BLOCK
            n = min(BLOCK - off, end - pos)
            for layer, view in enumerate(self.views.values()):
                view[block, :, off:off + n, :] = tokens_kv(layer, pos, tokens[pos:pos + n])
            pos += n

    def block_ids(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def expect_kv(self, block_id: int, tokens: list[int], first_pos: int) -> None:
        """Assert block ``block_id`` holds exactly the stand-in KV of ``tokens`` at ``first_pos``.. ."""
        for layer, view in enumerate(self.views.values()):
            got = view[block_id, :, :len(tokens), :]
            assert torch.equal(got, tokens_kv(layer, first_pos, tokens)), f"layer {layer} block {block_id}: KV differs"

    def poison_free_blocks(self) -> None:
        """NaN every block vLLM does not hold now, so a load that writes nothing cannot pass."""
        held = {b for r in self.scheduler.requests for b in self.block_ids(r)}
        for view in self.views.values():
            for b in range(view.shape[0]):
                if b not in held:
                    view[b].fill_(POISON)

    def run_until_done(self, max_steps: int = 200) -> int:
        steps = 0
        while self.scheduler.has_requests() and steps < max_steps:
            self.step()
            steps += 1
        assert not self.scheduler.has_requests(), f"still busy after {max_steps} steps"
        return steps

    def close(self) -> None:
        self.worker.shutdown()
        connector = self.scheduler.connector
        if connector is not None:
            connector.shutdown()


os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

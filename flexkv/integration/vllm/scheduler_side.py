"""The scheduler-side connector: every flexkv transfer is matched, launched and polled here.

Runs in vLLM's scheduler (engine core) process, in its one scheduling thread. Loads are asynchronous
in vLLM's sense: a request with a hit waits in WAITING_FOR_REMOTE_KVS until its GET ended, so no
forward pass ever reads a block that is still being written. Saves happen when a request finishes:
its whole computed blocks are PUT and vLLM keeps them allocated until the D2H is done. Completions
reach vLLM through the next step's metadata, which every worker rank reports back (worker_side.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from flexkv.integration.vllm.link import ServerLink
from flexkv.integration.vllm.metadata import FlexKVConnectorMetadata
from flexkv.integration.vllm.settings import ConnectorSettings
from flexkv.integration.vllm.transfers import (
    LaunchedLoad,
    LaunchedSave,
    MatchedLoad,
    StepReport,
    blocks_of_tokens,
    slot_mapping,
)
from flexkv.types import KVResponse, TaskStatus

log = logging.getLogger("flexkv.vllm")
_FINAL = (TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.NOTFOUND)


class SchedulerSide:
    """Per-request state lives in three dicts keyed by vLLM request id; see transfers.py."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.link = ServerLink(settings)
        self.block_size = settings.block_size
        self.tokens_per_block = self.link.tokens_per_block
        if self.block_size % self.tokens_per_block:
            raise ValueError(f"vLLM block_size {self.block_size} is not a multiple of the flexkv server's "
                             f"tokens_per_block {self.tokens_per_block}")
        self.matched: dict[str, MatchedLoad] = {}
        self.to_launch: dict[str, tuple[MatchedLoad, list[int]]] = {}
        self.loading: dict[str, LaunchedLoad] = {}
        self.saving: dict[str, LaunchedSave] = {}
        self.no_reload: set[str] = set()  # a load of these failed: they compute the rest (no retry loop)
        self.report = StepReport()
        self.num_loaded_tokens = 0  # tokens flexkv wrote into vLLM's blocks (successful loads)
        self.num_saved_tokens = 0  # tokens offered to flexkv by finished requests
        self._namespace = list(settings.namespace)

    # -- matching -------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` flexkv can load (whole vLLM blocks, never the block of
        the last token, which vLLM must compute). Reserves them; calling again with the same state
        returns the same reservation. None ("ask again next step") while a save still in flight would
        extend the hit: a chat's next turn arriving right after the last one finished."""
        req_id = request.request_id
        tokens = np.asarray(request.all_token_ids, dtype=np.int64)
        end = ((len(tokens) - 1) // self.block_size) * self.block_size
        begin = -(-num_computed_tokens // self.tokens_per_block) * self.tokens_per_block
        old = self.matched.get(req_id)
        if old is not None and old.asked == (begin, end):
            return old.num_tokens, old.num_tokens > 0
        self._drop_match(req_id)
        if end <= begin or req_id in self.loading or req_id in self.no_reload or not self.link.is_ready():
            return 0, False
        if any(save.extends_hit(tokens[:end], begin, self.block_size) for save in self.saving.values()):
            return None, False  # saves always end (or the link is lost and they are all dropped)
        namespace = self._namespace_of(request)
        match = self._match(tokens[:end], begin, namespace)
        if match is not None and (match.num_computed + match.num_tokens) % self.block_size:
            # flexkv's blocks are smaller than vLLM's: reserve only the whole vLLM blocks of the hit.
            cut = (match.num_computed + match.num_tokens) // self.block_size * self.block_size
            self.link.call(self.link.kvm.cancel, match.task_id, default=None)
            match = self._match(tokens[:cut], begin, namespace) if cut > begin else None
        if match is None or match.num_tokens == 0:
            if match is not None:
                self.link.call(self.link.kvm.cancel, match.task_id, default=None)
            return 0, False
        match.asked = (begin, end)
        self.matched[req_id] = match
        return match.num_tokens, True

    def _namespace_of(self, request: Any) -> list[str]:
        """Keys are salted with the model, the request's LoRA and its cache_salt: KV computed under
        one never serves another."""
        lora = getattr(request, "lora_request", None)
        salt = getattr(request, "cache_salt", None)
        return (self._namespace + ([f"lora:{lora.lora_name}"] if lora is not None else [])
                + ([f"salt:{salt}"] if salt else []))

    def _match(self, tokens: np.ndarray, begin: int, namespace: list[str]) -> MatchedLoad | None:
        """Reserve the cached run of ``tokens`` from ``begin`` (None when flexkv cannot answer)."""
        mask = np.zeros(tokens.shape[0], dtype=np.bool_)
        mask[begin:] = True
        found: tuple[int, np.ndarray] | None = self.link.call(self.link.kvm.get_match, tokens, mask, namespace,
                                                               default=None)
        if found is None:
            return None
        task_id, hit = found
        num = int(hit[begin:].sum())
        if num and not hit[begin:begin + num].all():
            log.warning("flexkv get_match mask is not a run from token %d; loading nothing", begin)
            num = 0
        return MatchedLoad(task_id, tokens, begin, num)

    def _drop_match(self, req_id: str) -> None:
        old = self.matched.pop(req_id, None)
        if old is not None:
            self.link.call(self.link.kvm.cancel, old.task_id, default=None)

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM allocated ``block_ids`` (all of the request's blocks); the load starts with the step."""
        req_id = request.request_id
        match = self.matched.pop(req_id, None)
        if match is None:
            return
        if num_external_tokens == 0:
            self.link.call(self.link.kvm.cancel, match.task_id, default=None)
            return
        if num_external_tokens != match.num_tokens:
            # vLLM counts on tokens we did not reserve: report their blocks unwritten so it recomputes.
            self.link.call(self.link.kvm.cancel, match.task_id, default=None)
            self.no_reload.add(req_id)
            self.report.load_done(req_id, blocks_of_tokens(block_ids, self.block_size, match.num_computed,
                                                           match.num_computed + num_external_tokens))
            return
        self.to_launch[req_id] = (match, list(block_ids))

    # -- each step --------------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: Any) -> FlexKVConnectorMetadata:
        """Launch this step's loads, poll every running transfer, and hand the news to the workers."""
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self._drop_match(req_id)
        self._launch_loads()
        self._poll()
        ready = self.link.is_ready()
        return self.report.take(None if ready or self.link.lost else self.link.address, self.link.lost)

    def _launch_loads(self) -> None:
        if not self.to_launch:
            return
        ids, maps = [], []
        for req_id, (match, block_ids) in self.to_launch.items():
            ids.append(match.task_id)
            maps.append(slot_mapping(block_ids, self.block_size, len(match.token_ids)))
            loaded = blocks_of_tokens(block_ids, self.block_size, match.num_computed,
                                      match.num_computed + match.num_tokens)
            self.loading[req_id] = LaunchedLoad(match.task_id, match.num_tokens, loaded)
        self.to_launch.clear()
        self.link.call(self.link.kvm.launch, ids, maps, default=None)  # errors surface at wait as FAILED

    def _poll(self) -> None:
        tasks = {load.task_id: ("load", req_id) for req_id, load in self.loading.items()}
        tasks.update({save.task_id: ("save", req_id) for req_id, save in self.saving.items()})
        if not tasks:
            return
        results: dict[int, KVResponse] = self.link.call(self.link.kvm.try_wait, list(tasks), default={})
        if self.link.lost:
            self._fail_everything()
            return
        for task_id, resp in results.items():
            if resp.status in _FINAL:
                kind, req_id = tasks[task_id]
                self._load_ended(req_id, resp) if kind == "load" else self._save_ended(req_id, resp)

    def _load_ended(self, req_id: str, resp: KVResponse) -> None:
        load = self.loading.pop(req_id)
        moved = int(resp.return_mask.sum()) if resp.return_mask is not None else 0
        if resp.status is TaskStatus.SUCCESS and moved >= load.num_tokens:
            self.num_loaded_tokens += load.num_tokens
            self.report.load_done(req_id)
        else:
            log.warning("flexkv load of %s ended %s (%d of %d tokens)%s: vLLM recomputes it", req_id,
                        resp.status.name, moved, load.num_tokens, f": {resp.error}" if resp.error else "")
            self.no_reload.add(req_id)
            self.report.load_done(req_id, load.block_ids)

    def _save_ended(self, req_id: str, resp: KVResponse) -> None:
        self.saving.pop(req_id)
        if resp.status is not TaskStatus.SUCCESS:
            log.warning("flexkv save of %s ended %s %s", req_id, resp.status.name, resp.error)
        self.report.finished_saves.add(req_id)

    def _fail_everything(self) -> None:
        """The server is gone: give vLLM back every block. Every rank seals its KV memory on this step's
        ``server_lost`` before it reports them (worker_side.py), so no byte of ours moves afterwards."""
        for req_id, load in self.loading.items():
            self.report.load_done(req_id, load.block_ids)
        self.loading.clear()
        self.report.finished_saves.update(self.saving)
        self.saving.clear()
        self.matched.clear()

    # -- finishing ------------------------------------------------------------------------------
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """PUT the request's whole computed blocks; True = vLLM keeps them until we report the save."""
        req_id = request.request_id
        self._drop_match(req_id)
        self.no_reload.discard(req_id)
        unlaunched = self.to_launch.pop(req_id, None)
        if unlaunched is not None:  # allocated, never launched: aborted in the step it was scheduled
            self.link.call(self.link.kvm.cancel, unlaunched[0].task_id, default=None)
            self.report.load_done(req_id)  # vLLM frees its blocks when told (nothing was written)
            return False, None
        if req_id in self.loading or req_id in self.report.finished_loads or not self.link.is_ready():
            return False, None  # a load in flight or not yet reported: vLLM holds the blocks until then
        num = (min(int(request.num_computed_tokens), len(request.all_token_ids)) // self.tokens_per_block
               * self.tokens_per_block)
        num = min(num, len(block_ids) * self.block_size)
        if num == 0:
            return False, None
        tokens = np.asarray(request.all_token_ids[:num], dtype=np.int64)
        task_id = self.link.call(self.link.kvm.put_async, tokens, slot_mapping(block_ids, self.block_size, num),
                                 namespace=self._namespace_of(request), default=None)
        if task_id is None:
            return False, None
        self.saving[req_id] = LaunchedSave(task_id, num, tokens)
        self.num_saved_tokens += num
        return True, None

    def wait_for_saves(self, timeout_s: float = 30.0) -> bool:
        """Block until every launched save's D2H ended (their blocks are then readable by other
        requests' GETs); the news still reaches vLLM with the next step. For tests and benchmarks."""
        ids = [s.task_id for s in self.saving.values()]
        if not ids:
            return True
        results: dict[int, KVResponse] = self.link.call(self.link.kvm.wait, ids, timeout_s, default={})
        done = {tid for tid, r in results.items() if r.status in _FINAL}
        for req_id, save in list(self.saving.items()):
            if save.task_id in done:
                self._save_ended(req_id, results[save.task_id])
        return not self.saving

    def reset_cache(self) -> bool:
        """flexkv's cache is shared by every engine on the server: one engine does not clear it.
        Drops this connector's unlaunched reservations and returns False (not reset)."""
        for req_id in list(self.matched):
            self._drop_match(req_id)
        log.warning("reset_cache: the flexkv cache is shared and is not cleared from one vLLM instance")
        return False

    def stats(self) -> dict[str, int]:
        return {"num_loaded_tokens": self.num_loaded_tokens, "num_saved_tokens": self.num_saved_tokens,
                "num_loading": len(self.loading), "num_saving": len(self.saving), "lost": int(self.link.lost)}

    def close(self) -> None:
        self.link.close()

"""flexkv as an SGLang HiCache storage backend (tested with sglang 0.5.23; docs/sglang.md).

SGLang builds it through ``StorageBackendFactory`` ("dynamic" backend, ``cls(storage_config, kwargs)``),
then hands it the rank's host pool (``register_mem_pool_host``). Each SGLang rank is one flexkv DP
client; its host pool is registered as that client's KV buffers on the engine-side lane, so pages move
between the host pool and flexkv's CPU pool by the C host copy in this process, addressed by host index
(the zero-copy ``*_v1`` calls). Page keys are SGLang's chained page hashes, hashed with the prefix
(``extra_info.prefix_keys``) into flexkv block keys, so SSD/remote tiers, eviction and other engines
see the same blocks. No call raises into SGLang: a failure returns False / 0 hits (it recomputes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from flexkv.integration.sglang.host_pool import HostPoolView, StagingPages, describe_host_pool
from flexkv.integration.sglang.link import ServerLink
from flexkv.integration.sglang.settings import BackendSettings
from flexkv.kvmanager import KVManager, hash_page_keys
from flexkv.types import FlexKVError, KVResponse, TaskStatus

log = logging.getLogger("flexkv.sglang")
STAGING_PAGES = 16  # per direction, generic interface only (SGLang's batches are split into these)


def _loaded_end(resp: KVResponse, page_size: int) -> int:
    """The page a finished GET's loaded run ends at (its return mask marks the loaded tokens; 0: none)."""
    mask = resp.return_mask
    if mask is None or not mask.any():
        return 0
    return (int(np.flatnonzero(mask)[-1]) + 1) // page_size


class FlexKVHiCacheStorage(HiCacheStorage):
    """One SGLang rank's view of a flexkv server. Thread-safe (SGLang's prefetch and backup threads)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        self.settings = BackendSettings.from_extra_config(storage_config.extra_config, storage_config.model_name)
        if storage_config.dcp_size > 1 or storage_config.attn_cp_size > 1:
            raise ValueError("flexkv backend: context parallel (attn_cp_size or dcp_size > 1) is not supported")
        self.is_writer = bool(storage_config.is_storage_writer)  # MLA: one writer, every rank reads
        self.interface_v1 = bool((storage_config.extra_config or {}).get("interface_v1", 0))
        self._link: ServerLink | None = None
        self._view: HostPoolView | None = None
        self._staging: StagingPages | None = None  # generic interface only
        self._warned_no_prefix = False

    # -- set-up ---------------------------------------------------------------------------------
    def client_id(self) -> int:
        """This rank's flexkv DP client id: ``flexkv_client_id_base`` + its index among the instance's ranks."""
        c = self.storage_config
        return self.settings.client_id_base + (c.dp_rank * c.pp_size + c.pp_rank) * c.tp_size + c.tp_rank

    def namespace(self) -> list[str]:
        """Blocks of different models, pipeline stages or head shards never share keys; MLA ranks share."""
        c = self.storage_config
        parts = ["sglang", self.settings.namespace, f"pp{c.pp_rank}/{c.pp_size}"]
        if not c.is_mla_model:
            parts.append(f"tp{c.tp_rank}/{c.tp_size}")
        return parts

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Describe the host pool and connect. Raises UnsupportedHostPool / InvalidRequest for a pool or
        server that cannot work together; an unreachable server is only logged (retried later)."""
        super().register_mem_pool_host(mem_pool_host)
        host = describe_host_pool(mem_pool_host, self.storage_config.is_mla_model)
        if self.interface_v1:
            self._view = host
        else:  # SGLang passes page tensors, not host indices: flexkv moves pages through staging
            self._staging = StagingPages(host, str(mem_pool_host.layout), STAGING_PAGES)
            self._view = self._staging.view
        self._link = ServerLink(self.settings, self.client_id(), self._view, self.namespace())
        self._link.open()

    def close(self) -> None:
        if self._link is not None:
            self._link.close()

    # -- keys -----------------------------------------------------------------------------------
    def _block_keys(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None
                    ) -> tuple[npt.NDArray[np.uint64], int]:
        prefix = list(extra_info.prefix_keys) if extra_info is not None and extra_info.prefix_keys else []
        if not prefix and extra_info is None and not self._warned_no_prefix:
            self._warned_no_prefix = True
            log.warning("flexkv backend called without prefix keys: pages are keyed as if the batch began the "
                        "sequence, so hits need the same batch boundaries; set "
                        "\"hicache_storage_pass_prefix_keys\": true in the extra config")
        return hash_page_keys(prefix + list(keys), self.namespace()), len(prefix)

    def _run(self, what: str, fn: Any, default: Any) -> Any:
        if self._link is None:
            return default
        return self._link.run(what, fn, default)

    # -- v1: zero copy by host index ------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """Leading pages of ``keys`` cached in flexkv (any tier), from the server's index."""
        prepared = self._prepare("batch_exists", keys, extra_info, None)
        if prepared is None:
            return 0
        block_keys, first, _ = prepared
        return int(self._run("batch_exists", lambda m: m.count_cached_keys(block_keys, first), 0))

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Load the leading cached pages into the host pool at ``host_indices`` (page_size per key)."""
        prepared = self._prepare("batch_get_v1", keys, extra_info, host_indices)
        if prepared is None:
            return [False] * len(keys)
        block_keys, first, slots = prepared
        hits = self._run("batch_get", self._mover(True, block_keys, first, slots), 0)
        return [i < hits for i in range(len(keys))]

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store the pages flexkv lacks from the host pool; True for each page cached afterwards."""
        if keys and not self.is_writer:
            return [True] * len(keys)  # MLA: the writer rank stores the one shared copy
        prepared = self._prepare("batch_set_v1", keys, extra_info, host_indices)
        if prepared is None:
            return [False] * len(keys)
        block_keys, first, slots = prepared
        done = self._run("batch_set", self._mover(False, block_keys, first, slots), 0)
        return [i < done for i in range(len(keys))]

    def _prepare(self, what: str, keys: list[str], extra_info: HiCacheStorageExtraInfo | None,
                 host_indices: torch.Tensor | None) -> tuple[npt.NDArray[np.uint64], int, Any] | None:
        """Block keys, the index of the call's first page among them, and the slot mapping; None (logged)
        for an empty or malformed call, or a v1 call on a backend set up for the generic interface."""
        if not keys or self._view is None:
            return None
        if host_indices is not None and self._staging is not None:
            log.error("flexkv backend: %s called without \"interface_v1\": 1 in the extra config", what)
            return None
        try:
            block_keys, first = self._block_keys(keys, extra_info)
            slots = self._slots(host_indices, len(keys)) if host_indices is not None else None
        except (TypeError, ValueError) as e:
            log.error("flexkv backend: bad %s call: %s", what, e)
            return None
        return block_keys, first, slots

    def _staging_slots(self, pages: list[int]) -> npt.NDArray[np.int64]:
        assert self._view is not None
        p = self._view.page_size
        return (np.asarray(pages, dtype=np.int64)[:, None] * p + np.arange(p, dtype=np.int64)).reshape(-1)

    def _slots(self, host_indices: torch.Tensor, num_pages: int) -> npt.NDArray[np.int64]:
        assert self._view is not None
        slots = host_indices.detach().cpu().numpy().astype(np.int64, copy=False)
        want = num_pages * self._view.page_size
        if slots.shape != (want,):
            raise ValueError(f"flexkv backend: {num_pages} keys need {want} host indices, got {slots.shape}")
        return slots

    def _mover(self, is_get: bool, block_keys: npt.NDArray[np.uint64], first: int,
               slots: npt.NDArray[np.int64]) -> Callable[[KVManager], int]:
        return lambda m: self._move(m, is_get, block_keys, first, slots)

    def _move(self, m: KVManager, is_get: bool, block_keys: npt.NDArray[np.uint64], first: int,
              slots: npt.NDArray[np.int64]) -> int:
        """Run one GET or PUT; the number of leading pages (from ``first``) cached in the host pool
        (GET) or in flexkv (PUT) afterwards. Raises on a timeout (the link closes, stopping copies)."""
        if is_get:  # matched and launched in one round trip: the pages are known before the match
            task_id, begin, end = m.get_match_keys_launch(block_keys, slots, first)
        else:
            task_id, begin, end = m.put_match_keys(block_keys, first)
        if end == begin:
            m.cancel(task_id)
            if is_get:
                return 0
            return m.count_cached_keys(block_keys, first)  # cached already (or its prefix is not)
        if not is_get:
            m.launch(task_id, slots)
        resp = m.wait(task_id, timeout=self.settings.timeout_s)[task_id]
        if resp.status is TaskStatus.TIMEOUT:
            raise FlexKVError(f"task {task_id} still running after {self.settings.timeout_s} s")
        if resp.status is not TaskStatus.SUCCESS:
            log.info("flexkv %s of %d pages: %s %s", "get" if is_get else "put", end - begin, resp.status.name,
                     resp.error)
            return 0
        if is_get:  # a GET may load less than it matched (a corrupt SSD block, a key the store evicted)
            loaded = _loaded_end(resp, self._view.page_size if self._view is not None else 1)
            if loaded < end:
                log.warning("flexkv get loaded pages [%d, %d) of the [%d, %d) it matched; the rest are misses",
                            begin, max(loaded, begin), begin, end)
            return max(loaded - first, 0)
        return end - first

    # -- generic interface (SGLang copies pages through tensors) --------------------------------
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        out = self.batch_get([key], [target_location] if target_location is not None else None)
        return out[0] if out else None

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        """Generic interface: the leading cached pages as flat tensors (written into ``target_locations``
        when given, SGLang's dummy pages), None from the first miss on. Copies through staging pages."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        staging, prepared = self._staging, self._prepare("batch_get", keys, None, None)
        if staging is None or prepared is None:
            return out
        block_keys, first, _ = prepared
        try:
            self._get_pages(staging, block_keys, first, target_locations, out)
        except (TypeError, ValueError, RuntimeError) as e:  # a target of the wrong size
            log.error("flexkv backend: batch_get: %s", e)
        return out

    def _get_pages(self, staging: StagingPages, block_keys: npt.NDArray[np.uint64], first: int,
                   target_locations: Any, out: list[torch.Tensor | None]) -> None:
        with staging.locks[0]:
            num_keys = block_keys.shape[0] - first
            for start in range(0, num_keys, staging.per_direction):
                n = min(staging.per_direction, num_keys - start)
                pages = list(range(n))
                slots = self._staging_slots(pages)
                hits = self._run("batch_get", self._mover(True, block_keys[:first + start + n], first + start, slots),
                                 0)
                for i in range(hits):
                    src = staging.page(i).flatten()
                    dst = target_locations[start + i] if target_locations is not None else None
                    out[start + i] = dst.copy_(src) if dst is not None else src.clone()
                if hits < n:
                    return

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        """Generic interface: store flat page tensors (``values``); True when every page is cached."""
        if keys and not self.is_writer:
            return True
        staging, prepared = self._staging, self._prepare("batch_set", keys, None, None)
        if staging is None or prepared is None or values is None or len(values) != len(keys):
            return not keys
        block_keys, first, _ = prepared
        try:
            return self._set_pages(staging, block_keys, first, values)
        except (TypeError, ValueError, RuntimeError) as e:  # a value of the wrong size
            log.error("flexkv backend: batch_set: %s", e)
            return False

    def _set_pages(self, staging: StagingPages, block_keys: npt.NDArray[np.uint64], first: int,
                   values: Any) -> bool:
        num_keys = block_keys.shape[0] - first
        with staging.locks[1]:
            for start in range(0, num_keys, staging.per_direction):
                n = min(staging.per_direction, num_keys - start)
                pages = [staging.first_page(False) + i for i in range(n)]
                for i, page in enumerate(pages):
                    dst = staging.page(page)
                    dst.copy_(values[start + i].view(dst.shape))
                slots = self._staging_slots(pages)
                done = self._run("batch_set", self._mover(False, block_keys[:first + start + n], first + start,
                                                          slots), 0)
                if done < n:
                    return False
        return True

    def clear(self) -> None:
        """flexkv is shared by every engine on the server: clearing it from one SGLang rank is not offered."""
        log.info("flexkv backend: clear() ignored (the cache is shared; restart the flexkv server to empty it)")

    def get_stats(self) -> None:
        return None

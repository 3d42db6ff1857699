"""What the scheduler-side connector tells every worker rank, once per step (crosses processes by pickle)."""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclasses.dataclass
class FlexKVConnectorMetadata(KVConnectorMetadata):
    """One step's news. Every transfer runs on the scheduler side; the worker ranks only report these
    ids back through vLLM's KVConnectorOutput (the one channel vLLM reads them from)."""

    server_address: str | None = None  # set until every rank registered (library mode: the server is new)
    finished_loads: set[str] = dataclasses.field(default_factory=set)  # GETs that ended (ok or not)
    failed_loads: set[str] = dataclasses.field(default_factory=set)  # the subset that did not load it all
    failed_block_ids: set[int] = dataclasses.field(default_factory=set)  # vLLM blocks left unwritten
    finished_saves: set[str] = dataclasses.field(default_factory=set)  # PUTs that ended: blocks may be freed
    server_lost: bool = False  # flexkv stopped answering: stop the rank's lane before reporting

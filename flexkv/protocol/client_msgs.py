"""Messages between engine-side clients (KVManager, KVTPClient) and the scheduler server.

Requests that expect an answer carry ``req_id``; the reply echoes it. ``GetAsyncMsg``, ``PutAsyncMsg``,
``LaunchMsg`` and ``CancelMsg`` are fire-and-forget: task ids are chosen by the client (unique per
client), so no reply is needed and errors surface at ``wait`` as FAILED with a message.
Raw frames that follow a message are listed in its docstring.
"""

from __future__ import annotations

import msgspec


class ClientMsg(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every engine -> server message."""

    client_id: int


class HelloMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """First message of a client. ``pid``/``host`` let the server notice a client that died."""

    req_id: int
    pid: int
    host: str
    role: str  # "manager" (a DP client) or "tp" (a KVTPClient)


class GetMatchMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Frames: token_ids (int64) — or, when ``num_tokens`` >= 0, the client's block hashes (uint64,
    namespace already folded in) for ``num_tokens`` tokens — then token_mask (bool) if ``has_mask``.
    Reply: MatchReplyMsg."""

    req_id: int
    task_id: int
    namespace: list[str] | None = None
    has_mask: bool = False
    num_tokens: int = -1


class PutMatchMsg(GetMatchMsg, frozen=True, tag=True, kw_only=True):
    """Like GetMatchMsg for a PUT."""


class GetAsyncMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Match + launch, no reply. Frames: token_ids, slot_mapping (int64), token_mask if ``has_mask``."""

    task_id: int
    namespace: list[str] | None = None
    has_mask: bool = False


class PutAsyncMsg(GetAsyncMsg, frozen=True, tag=True, kw_only=True):
    """Like GetAsyncMsg for a PUT."""


class LaunchMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Bind GPU slots of matched tasks and start them, no reply. Frames: one slot_mapping per task id."""

    task_ids: list[int]


class CancelMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    task_ids: list[int]


class WaitMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Reply (when every task is final or the timeout passed): WaitReplyMsg + one mask frame per task."""

    req_id: int
    task_ids: list[int]
    timeout_s: float
    completely: bool = False


class RegisterKVMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """A TP rank registers its KV buffers (host shared memory or CUDA IPC handles). Reply: OkReplyMsg."""

    req_id: int
    tp_rank: int
    device_id: int
    layout_kind: str
    num_blocks: int
    tokens_per_block: int
    num_heads: int
    head_size: int
    itemsize: int
    num_layers: int
    host_segment: str | None = None  # shared-memory segment holding the tensors (host buffers)
    tensor_offsets: list[int] = []  # byte offset of each tensor inside host_segment / its CUDA allocation
    cuda_handles: list[bytes] = []  # one cudaIpcMemHandle_t (64 bytes) per tensor, for CUDA buffers
    cuda_event: bytes = b""  # cudaIpcEventHandle_t of the rank's "KV written" event; D2H copies wait on it
    engine_side: bool = False  # the engine runs the device worker itself (DESIGN §7b); the reply has its spec


class QueryMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """``what``: "is_ready" | "stats" | "check" (runs check_invariants) | "shutdown"."""

    req_id: int
    what: str


ClientRequest = (
    HelloMsg | GetMatchMsg | PutMatchMsg | GetAsyncMsg | PutAsyncMsg | LaunchMsg | CancelMsg | WaitMsg | RegisterKVMsg
    | QueryMsg
)


class ServerReply(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    req_id: int


class OkReplyMsg(ServerReply, frozen=True, tag=True, kw_only=True):
    info: dict[str, int | float | str | bool] = {}


class MatchReplyMsg(ServerReply, frozen=True, tag=True, kw_only=True):
    """The returned mask as a token range (``codec.mask_to_range``); a frame only if it is not one run."""

    task_id: int
    num_tokens: int
    mask_begin: int
    mask_end: int


class WaitReplyMsg(ServerReply, frozen=True, tag=True, kw_only=True):
    """Per task: status, error text, and the return mask as a token range (``codec.mask_to_range``;
    num_tokens -1 = no mask); frames only for masks that are not one run, in task order."""

    task_ids: list[int]
    statuses: list[int]
    errors: list[str]
    num_tokens: list[int]
    mask_begins: list[int]
    mask_ends: list[int]


class ErrorReplyMsg(ServerReply, frozen=True, tag=True, kw_only=True):
    error: str
    kind: str = "InvalidRequest"


ServerReplyMsg = OkReplyMsg | MatchReplyMsg | WaitReplyMsg | ErrorReplyMsg

"""Messages between engine-side clients (KVManager, KVTPClient) and the scheduler server.

Requests that expect an answer carry ``req_id``; the reply echoes it. ``GetAsyncMsg``, ``PutAsyncMsg``,
their batch forms, ``LaunchMsg`` and ``CancelMsg`` are fire-and-forget: task ids are chosen by the client (unique per
session), so no reply is needed and errors surface at ``wait`` as FAILED with a message.
Raw frames that follow a message are listed in its docstring.

Sessions (incarnations): ``HelloMsg`` opens a session; the reply's ``info["session_id"]`` names it and
every later message of that connection carries it. Task ids, reservations and results belong to the
session and go with it (``ByeMsg``, or the client's process dying). The server refuses a message from a
connection that never said hello, for a session that is not live, or claiming another client id.
"""

from __future__ import annotations

import msgspec


class ClientMsg(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every engine -> server message. ``session_id``: the one the server gave at hello."""

    client_id: int
    session_id: int = 0


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


class GetMatchInfoMsg(GetMatchMsg, frozen=True, tag=True, kw_only=True):
    """Like GetMatchMsg (a GET); the reply is a MatchInfoReplyMsg: the match plus how its blocks split
    over the tiers and each tier's read rate, so the engine can weigh loading against recomputing."""


class GetMatchLaunchMsg(GetMatchMsg, frozen=True, tag=True, kw_only=True):
    """A GetMatchMsg that also launches the task, when its match is not empty, into the slots of one more
    frame after the others: slot_mapping (int64), one slot per token of the match (as LaunchMsg's full
    form). The task's ops go to the workers before the reply (a MatchReplyMsg) is sent, so a GET's copy
    starts one client round trip sooner than with get_match then launch. An empty match is only matched:
    the client cancels it as after get_match."""

    layerwise: bool = False  # as LaunchMsg.layerwise


class GetAsyncMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Match + launch, no reply. Frames: token_ids, slot_mapping (int64), token_mask if ``has_mask``."""

    task_id: int
    namespace: list[str] | None = None
    has_mask: bool = False


class PutAsyncMsg(GetAsyncMsg, frozen=True, tag=True, kw_only=True):
    """Like GetAsyncMsg for a PUT."""


class GetAsyncBatchMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Match + launch several GETs together (``KVManager.get_async_many``), no reply: their device ops
    go out as one batched op per worker. Frames per task, in order: token_ids, slot_mapping (int64),
    then token_mask (bool) if ``has_masks[i]``. ``has_masks`` and ``namespaces``: empty, or one entry
    per task id."""

    task_ids: list[int]
    has_masks: list[bool] = []
    namespaces: list[list[str] | None] = []


class PutAsyncBatchMsg(GetAsyncBatchMsg, frozen=True, tag=True, kw_only=True):
    """Like GetAsyncBatchMsg for PUTs (``KVManager.put_async_many``)."""


class PrefetchMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Match a GET and start staging its SSD/remote hits into CPU, with no engine destination; no
    reply (errors at wait). Frames: token_ids (int64)."""

    task_id: int
    namespace: list[str] | None = None


class LaunchMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Bind GPU slots of matched tasks and start them, no reply. Frames: one slot_mapping per task id.
    The tasks' ready device ops go out together, as one batched op per direction and worker."""

    task_ids: list[int]
    layerwise: bool = False  # GETs: copy layer by layer (the engine waits per layer); else whole, faster


class CancelMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Cancel tasks matched but not yet launched; a launched task is not cancelled (it ends on its own)."""

    task_ids: list[int]


class WaitMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """Reply (when every task is final or the timeout passed): WaitReplyMsg + one mask frame per task.
    ``timeout_s`` must be finite and in [0, MAX_WAIT_S]; anything else is refused."""

    req_id: int
    task_ids: list[int]
    timeout_s: float
    completely: bool = False
    # The client reads every rank's progress table (flexkv.layerwise): answer as soon as each task is final
    # or a GET whose H2D is on its way to ranks that publish its landing (WaitReplyMsg.landing).
    landing: bool = False


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
    layer_progress: str | None = None  # shared-memory segment of the rank's layer progress table (flexkv.layerwise)
    fence: str | None = None  # shared-memory segment of the rank's KV fence (flexkv.fence): sealed, no copy runs


class ByeMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """The client closes its session: its tasks, reservations, waits, results and registrations are
    dropped (ops already running finish first; their results are discarded). Reply: OkReplyMsg."""

    req_id: int


class QueryMsg(ClientMsg, frozen=True, tag=True, kw_only=True):
    """``what``: "is_ready" | "stats" | "check" (runs check_invariants) | "reset" (drop every tier's
    index) | "shutdown"."""

    req_id: int
    what: str


MAX_WAIT_S = 3600.0  # longest single WaitMsg; KVManager.wait(timeout=inf) waits in steps of this

ClientRequest = (
    HelloMsg | GetMatchMsg | PutMatchMsg | GetMatchInfoMsg | GetMatchLaunchMsg | GetAsyncMsg | PutAsyncMsg
    | GetAsyncBatchMsg | PutAsyncBatchMsg | PrefetchMsg | LaunchMsg | CancelMsg | WaitMsg | RegisterKVMsg | ByeMsg
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


class MatchInfoReplyMsg(MatchReplyMsg, frozen=True, tag=True, kw_only=True):
    """A MatchReplyMsg plus, in tier order (CPU, SSD, REMOTE): the loaded blocks each tier supplies
    (``ControlPlane.tier_split``) and the server's read rate of each tier in bytes/s (an EWMA of
    completed ops, the configured prior before any ran; ``flexkv.scheduler.read_rates``)."""

    tier_blocks: list[int]
    read_bps: list[float]


class WaitReplyMsg(ServerReply, frozen=True, tag=True, kw_only=True):
    """Per task: status, error text, and the return mask as a token range (``codec.mask_to_range``;
    num_tokens -1 = no mask); frames only for masks that are not one run, in task order."""

    task_ids: list[int]
    statuses: list[int]
    errors: list[str]
    num_tokens: list[int]
    mask_begins: list[int]
    mask_ends: list[int]
    # Per task (WaitMsg.landing only): UNREADY, but its H2D is dispatched and its mask final; it succeeds once
    # every rank's table says every layer landed (the client watches; it asks again if a rank failed).
    landing: list[bool] = []


class ErrorReplyMsg(ServerReply, frozen=True, tag=True, kw_only=True):
    error: str
    kind: str = "InvalidRequest"


ServerReplyMsg = OkReplyMsg | MatchReplyMsg | MatchInfoReplyMsg | WaitReplyMsg | ErrorReplyMsg

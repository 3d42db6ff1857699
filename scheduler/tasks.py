"""Tasks: one engine request's plan as it runs, plus the checks of what engines send.

A ``Task`` drives its ``TaskGraph``: launch binds GPU block ids and dispatches the runnable ops,
each completion commits (success) or rolls back (failure) that op's reservations and dispatches
the ops that became runnable. Once a task failed or was cancelled, undispatched ops are dropped
at once and ops still in flight are rolled back when they complete, whatever their outcome (a
worker may still be writing into their blocks until then). Server process only.

Two failures do not fail the engine-facing part:

* A GET's REMOTE2H failing (the store evicted a key after the match, is gone, or returned a corrupt
  block) is a late miss: its promoted CPU blocks roll back, the H2D is cut to the blocks before
  the remote part and still runs (after any DISK2H), and the task ends SUCCESS with a return mask
  shorter than the match's mask -- the engine loads the local prefix and recomputes the rest. If
  nothing before the remote part was to be loaded, the task is SUCCESS with an all-False mask.
  A DISK2H whose worker found a block's bytes corrupt (``corrupt_at``: checksum mismatch) is a
  late miss too, from that block on: the blocks before it were verified and are published, the
  rest roll back, and the H2D is cut before the first corrupt block. Any other DISK2H failure
  (an I/O error) still fails the GET (SSD faults are faults, remote misses are expected).
* A PUT's write-through (H2DISK/H2REMOTE, after D2H) failing rolls back only that op: the blocks
  stay in CPU (``wait(completely=False)`` is SUCCESS), sibling write-throughs still commit, and
  ``wait(completely=True)`` reports FAILED, naming the op, once every op has finished.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from flexkv.native.hasher import as_token_array
from flexkv.scheduler.graph import OpNode, OpState, Reservation, TaskKey, TransferOp, commit, rollback, truncate
from flexkv.scheduler.planner import Plan
from flexkv.scheduler.pool import BlockIds
from flexkv.types import InvalidRequest, KVResponse, OpType, TaskStatus, TaskType

Dispatched = list[tuple[OpNode, TransferOp]]  # ops handed to workers, with the node each came from


class Task:
    """One GET or PUT from match to release."""

    def __init__(self, key: TaskKey, plan: Plan, num_tokens: int, slot_base: int) -> None:
        self.key = key
        self.plan = plan
        self.num_tokens = num_tokens
        self.slot_base = slot_base  # token index of a compact slot mapping's first entry
        self.gpu_block_ids: BlockIds | None = None  # set at launch
        self.engine_done = False  # the END marker ran: GET's H2D / PUT's D2H finished
        self.failed = False  # the engine-facing part failed
        self.write_through_failed = False  # a write-through op failed after the engine part was done
        self.cancelled = False
        self.error = ""  # why the task failed (the first failed op)
        self.mask = plan.mask  # tokens loaded/stored; a GET's shrinks if its REMOTE2H fails
        self.num_lost_blocks = 0  # GET blocks matched but not loaded (REMOTE2H failed)
        self.prefetch = False  # a GET with no engine destination: its H2D is never dispatched

    @property
    def task_type(self) -> TaskType:
        return self.plan.task_type

    @property
    def launched(self) -> bool:
        return self.gpu_block_ids is not None

    def live_nodes(self) -> list[OpNode]:
        """Ops still holding reservations (waiting or dispatched)."""
        return [n for n in self.plan.graph.nodes if n.is_live]

    def in_flight(self) -> list[OpNode]:
        return [n for n in self.plan.graph.nodes if n.state is OpState.DISPATCHED]

    def status(self, completely: bool) -> TaskStatus:
        """See ``ControlPlane.poll``."""
        if self.cancelled:
            return TaskStatus.CANCELLED
        if not self.launched:
            return TaskStatus.UNREADY
        if self.engine_done and not completely:
            return TaskStatus.SUCCESS
        if self.failed:
            return TaskStatus.FAILED
        if completely and not self.live_nodes():
            failed = self.write_through_failed or bool(self.plan.write_through_skipped)
            return TaskStatus.FAILED if failed else TaskStatus.SUCCESS
        return TaskStatus.UNREADY

    def response(self, completely: bool) -> KVResponse:
        status = self.status(completely)
        error = (self.error or self.plan.write_through_skipped) if status is TaskStatus.FAILED else ""
        return KVResponse(status, self.key[1], self.mask, error)

    def launch(self, gpu_block_ids: BlockIds, new_op_id: Callable[[], int]) -> Dispatched:
        """Bind the GPU blocks of the moved range and dispatch the runnable ops."""
        self.gpu_block_ids = gpu_block_ids
        return self._dispatch(self.plan.graph.runnable(), new_op_id)

    def complete(self, node: OpNode, ok: bool, new_op_id: Callable[[], int],
                 error: str = "", corrupt_at: int = -1) -> tuple[Dispatched, list[Reservation]]:
        """A dispatched op finished. Returns (ops now dispatched, written reservations to prune).
        ``corrupt_at`` >= 0: a failed DISK2H's blocks from that index on had corrupt bytes, the
        ones before were verified. See the module docstring for the failures that do not fail the task."""
        if ok and not (self.failed or self.cancelled):
            return self._dispatch(commit(node), new_op_id), []
        verified = not ok and corrupt_at >= 0 and node.op_type is OpType.DISK2H and self.task_type is TaskType.GET
        if verified and not (self.failed or self.cancelled):
            for res in node.writes:  # the verified prefix lands; rollback below leaves the rest dead
                res.index.publish(res.block_ids[:corrupt_at])
        to_prune = rollback(node)
        if ok or self.failed or self.cancelled:
            return [], to_prune
        if verified:
            return self._load_local_part(node, new_op_id, node.dst_block_ids[corrupt_at:]), to_prune
        if node.op_type is OpType.REMOTE2H and self.task_type is TaskType.GET:
            return self._load_local_part(node, new_op_id), to_prune  # a late miss, not an error
        self._note_error(node, error)
        if self.engine_done:
            self.write_through_failed = True
        else:
            self.failed = True
            to_prune += self._drop_waiting()
        return [], to_prune

    def _note_error(self, node: OpNode, error: str) -> None:
        if not self.error:
            name = node.op_type.name if node.op_type is not None else "END"
            self.error = f"{name} op {node.op_id} failed" + (f": {error}" if error else "")

    def _load_local_part(self, promotion: OpNode, new_op_id: Callable[[], int],
                         lost: BlockIds | None = None) -> Dispatched:
        """The GET's promotion op (REMOTE2H, or DISK2H that found corrupt bytes) failed and was rolled
        back: cut its H2D before the first CPU block of ``lost`` (default: every block the op was to
        fill), shrink the mask, and run the H2D once its other inputs are in."""
        runnable = []
        lost_ids = promotion.dst_block_ids if lost is None else lost
        for h2d in promotion.successors:
            keep = _leading_not_in(h2d.src_block_ids, lost_ids)
            self.num_lost_blocks += h2d.src_block_ids.shape[0] - keep
            truncate(h2d, keep)
            h2d.num_deps_left -= 1
            self._shrink_mask(self.plan.first_block + keep)
            if h2d.num_deps_left == 0 and h2d.state is OpState.WAITING:
                runnable.append(h2d)
        return self._dispatch(runnable, new_op_id)

    def _shrink_mask(self, end_block: int) -> None:
        mask = self.mask.copy()  # never mutate the array the match returned
        mask[end_block * self.plan.tokens_per_block:] = False
        self.mask = mask

    def cancel(self) -> tuple[bool, list[Reservation]]:
        """Cancel a task not yet launched (FlexKV's rule): every op is dropped, nothing ever moved.
        A launched task is not cancelled, whatever its state: it ends on its own, so no final status
        is reported while one of its ops may still write the engine's memory. Returns (cancelled,
        writes to prune)."""
        if self.launched or self.cancelled:
            return False, []
        self.cancelled = True
        return True, self._drop_waiting()

    def abort(self) -> list[Reservation]:
        """The task is being forgotten (released, or its client went): drop the waiting ops (returns
        their writes to prune); ops in flight roll back on completion. No-op once the engine part
        finished or failed (write-through goes on)."""
        if self.engine_done or self.failed or self.cancelled:
            return []
        self.cancelled = True
        return self._drop_waiting()

    def _drop_waiting(self) -> list[Reservation]:
        to_prune: list[Reservation] = []
        for node in self.plan.graph.all_nodes():
            if node.state is OpState.WAITING:
                to_prune += rollback(node)
        return to_prune

    def _dispatch(self, runnable: list[OpNode], new_op_id: Callable[[], int]) -> Dispatched:
        ops: Dispatched = []
        end = self.plan.graph.end
        gpu_ids = self.gpu_block_ids
        assert gpu_ids is not None
        pending = list(runnable)
        while pending:
            node = pending.pop(0)
            if node is end:
                commit(node)
                self.engine_done = True
            elif node.src_block_ids.shape[0] == 0 or (self.prefetch and node.op_type is OpType.H2D):
                pending += commit(node)  # cut to nothing (see _load_local_part), or a prefetch's H2D
            else:
                ops.append((node, node.to_op(new_op_id(), self.key, gpu_ids)))
        return ops


def _leading_not_in(ids: BlockIds, others: BlockIds) -> int:
    """How many leading ``ids`` are not in ``others``."""
    found = np.isin(ids, others)
    return int(np.argmax(found)) if found.any() else int(ids.shape[0])


# ---- input checks (each raises InvalidRequest naming the problem, before any state changes) ----


def check_key(key: object) -> TaskKey:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key)):
        raise InvalidRequest(f"task key must be (client_id, task_id) ints, got {key!r}")
    return key


def check_tokens(token_ids: object) -> npt.NDArray[np.int64]:
    try:
        return as_token_array(token_ids)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(str(e)) from None


def check_token_mask(token_mask: object, num_tokens: int, tokens_per_block: int) -> int:
    """Validate a token mask (False* True*, first True block aligned); return its first True index
    (``num_tokens`` when all False, 0 when no mask)."""
    if token_mask is None:
        return 0
    if hasattr(token_mask, "detach") and hasattr(token_mask, "numpy"):
        token_mask = token_mask.detach().cpu().numpy()
    if not isinstance(token_mask, np.ndarray) or token_mask.dtype != np.bool_ or token_mask.ndim != 1:
        raise InvalidRequest(f"token_mask must be a 1-D bool array, got {_describe(token_mask)}")
    if token_mask.shape[0] != num_tokens:
        raise InvalidRequest(f"token_mask has {token_mask.shape[0]} entries for {num_tokens} tokens")
    first = int(np.argmax(token_mask)) if token_mask.any() else num_tokens
    if not token_mask[first:].all():
        raise InvalidRequest("token_mask must be a run of False followed by a run of True")
    if first % tokens_per_block and first != num_tokens:
        raise InvalidRequest(f"token_mask's first True ({first}) is not aligned to {tokens_per_block}-token blocks")
    return first


def check_namespace(namespace: object) -> bytes:
    if not isinstance(namespace, bytes):
        raise InvalidRequest(f"namespace must be encoded bytes, got {type(namespace).__name__}")
    return namespace


def gpu_blocks_from_slots(slot_mapping: object, task: Task, tokens_per_block: int) -> BlockIds:
    """GPU block ids of the task's moved blocks from a token-level slot mapping (full or compact).

    Every moved block's slots must be ``gpu_block_id * T + j``. Raises InvalidRequest otherwise.
    """
    if hasattr(slot_mapping, "detach") and hasattr(slot_mapping, "numpy"):
        slot_mapping = slot_mapping.detach().cpu().numpy()
    if not isinstance(slot_mapping, np.ndarray) or slot_mapping.dtype != np.int64 or slot_mapping.ndim != 1:
        raise InvalidRequest(f"slot_mapping must be a 1-D int64 array, got {_describe(slot_mapping)}")
    plan, t = task.plan, tokens_per_block
    if plan.num_moved_blocks == 0:
        return slot_mapping[:0].copy()
    num_slots = slot_mapping.shape[0]
    base = 0 if num_slots == task.num_tokens else task.slot_base
    if base + num_slots > task.num_tokens or base + num_slots < plan.end_block * t:
        raise InvalidRequest(f"slot_mapping has {num_slots} slots; need {task.num_tokens} (full) or at least "
                             f"{plan.end_block * t - task.slot_base} starting at token {task.slot_base} (compact)")
    slots = slot_mapping[plan.first_block * t - base:plan.end_block * t - base].reshape(-1, t)
    first = slots[:, 0]
    if (first < 0).any() or (first % t).any() or not np.array_equal(slots - first[:, None], _offsets(t, slots)):
        raise InvalidRequest(f"slot_mapping: each moved block's {t} slots must be gpu_block_id*{t} + 0..{t - 1}")
    return first // t


def _offsets(tokens_per_block: int, like: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.broadcast_to(np.arange(tokens_per_block, dtype=np.int64), like.shape)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray dtype={value.dtype} shape={value.shape}"
    return type(value).__name__

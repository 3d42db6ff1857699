"""ControlPlane: the server's whole decision state behind one single-threaded façade.

The server loop (one thread) calls only this class. It owns one radix index + block pool per
tier (CPU always; SSD and REMOTE when enabled), the task table and the op table. It never blocks,
does no I/O and touches no KV bytes: it returns ``TransferOp``s for workers and learns their
outcome through ``complete_op``. Every method validates its input first and raises
``InvalidRequest`` naming the problem with no state changed.

The remote tier is a local ``RadixIndex`` of what this server stored, unless a ``RemoteLookup``
is given: then the shared store itself is the index (``flexkv.scheduler.remote_lookup``), and what
any node stored there is found here. Matching then asks the store (at most one batched call per
match, bounded by the store's timeouts); nothing else here does I/O.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
import xxhash

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.native.hasher import hash_blocks
from flexkv.scheduler.batch import coalesce
from flexkv.scheduler.eviction import EvictionParams, make_evictor
from flexkv.scheduler.graph import OpMember, OpNode, OpState, Reservation, TaskKey, TransferOp
from flexkv.scheduler.index import RadixIndex
from flexkv.scheduler.planner import Tiers, plan_get, plan_put
from flexkv.scheduler.pool import BlockPool
from flexkv.scheduler.remote_lookup import RemoteLookup, RemoteTier
from flexkv.scheduler.ssd_rebuild import Progress, restore
from flexkv.scheduler.tasks import (
    Dispatched,
    Task,
    check_key,
    check_namespace,
    check_token_mask,
    check_tokens,
    gpu_blocks_from_slots,
)
from flexkv.ssd_journal import Records
from flexkv.types import InvalidRequest, KVResponse, Medium, OpType, TaskStatus, TaskType

__all__ = ["ControlPlane", "TaskKey", "TransferOp"]

_UNBOUNDED_MIN_BLOCKS = 1024  # initial size of a growable (unbounded remote) pool
# GET blocks loaded, by the tier that held them (the op that brings them to the CPU pool; H2D: already there)
_TIER_HIT_KEYS = {OpType.H2D: "get_hit_blocks_cpu", OpType.DISK2H: "get_hit_blocks_ssd",
                  OpType.REMOTE2H: "get_hit_blocks_remote"}


def _tier_blocks(nodes: list[OpNode], num_moved: int) -> tuple[int, int, int]:
    """Blocks each tier supplies to a GET, (CPU, SSD, REMOTE): promotions read SSD/REMOTE (all they promote,
    also blocks before a token mask's first block), the rest of the loaded blocks were in CPU already."""
    ssd = sum(n.dst_block_ids.size for n in nodes if n.op_type is OpType.DISK2H)
    remote = sum(n.dst_block_ids.size for n in nodes if n.op_type is OpType.REMOTE2H)
    return max(0, num_moved - ssd - remote), ssd, remote


class ControlPlane:
    """Index + pools + tasks of one flexkv server. Not thread-safe: one owner thread."""

    def __init__(self, model: ModelConfig, cache: CacheConfig, remote_lookup: RemoteLookup | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``remote_lookup`` (used only if ``cache.enable_remote``): index the remote tier by the
        shared store itself instead of by what this server stored; ``num_remote_blocks`` is then
        not enforced (the store evicts by itself). ``clock`` (seconds) stamps accesses for the
        eviction policies (a trace replay passes the trace's time)."""
        self.model = model
        self.cache = cache
        self.tokens_per_block = cache.tokens_per_block
        self._clock = clock
        params = EvictionParams(hit_reward_s=float(cache.hit_reward_seconds), promote_hits=cache.slru_promote_hits,
                                protected_ratio=float(cache.slru_protected_ratio))

        def tier(medium: Medium, num_blocks: int) -> RadixIndex:
            start = num_blocks or max(_UNBOUNDED_MIN_BLOCKS, cache.num_cpu_blocks)
            pool = BlockPool(start, growable=num_blocks == 0)
            return RadixIndex(medium, pool, make_evictor(cache.policy_of(medium.name.lower()), params))

        by_store = cache.enable_remote and remote_lookup is not None
        self.tiers = Tiers(
            cpu=tier(Medium.CPU, cache.num_cpu_blocks),
            ssd=tier(Medium.SSD, cache.num_ssd_blocks) if cache.enable_ssd else None,
            remote=tier(Medium.REMOTE, cache.num_remote_blocks) if cache.enable_remote and not by_store else None,
            remote_store=RemoteTier(remote_lookup) if by_store and remote_lookup is not None else None,
        )
        self._tasks: dict[TaskKey, Task] = {}
        self._ops: dict[int, tuple[Task, OpNode]] = {}
        self._batches: dict[int, tuple[OpMember, ...]] = {}  # batched op id -> its members (scheduler/batch.py)
        self._batch_of: dict[int, int] = {}  # member op id -> its batched op id
        self._op_ids = itertools.count(1)
        self._salt = 0  # 0 until the first reset(); then every block key is XORed with it
        self._num_resets = 0
        self._counters = dict.fromkeys(
            ("num_get_matches", "num_put_matches", "get_query_blocks", "get_hit_blocks", "get_moved_blocks",
             "put_query_blocks", "put_hit_blocks", "put_stored_blocks", "num_failed_ops", "get_lost_blocks",
             "proactive_evicted_blocks", "num_resets", "ssd_corrupt_blocks", "ssd_discarded_blocks",
             "ssd_restored_blocks", "num_batched_ops", "num_batched_member_ops", *_TIER_HIT_KEYS.values()), 0)

    # ---- match (prepare) -----------------------------------------------------------------

    def get_match(self, key: TaskKey, token_ids: np.ndarray, token_mask: np.ndarray | None = None,
                  namespace: bytes = b"") -> np.ndarray:
        """Plan a GET: reserve the longest ready cached prefix (across tiers) within ``token_mask``.

        Returns the bool mask of tokens that launch will load (whole blocks). Locks what is read,
        allocates and inserts (unready) CPU blocks for SSD/REMOTE hits. Raises InvalidRequest for
        a duplicate key or bad input.
        """
        return self._match(TaskType.GET, key, token_ids, token_mask, namespace)

    def put_match(self, key: TaskKey, token_ids: np.ndarray, token_mask: np.ndarray | None = None,
                  namespace: bytes = b"") -> np.ndarray:
        """Plan a PUT: reserve CPU blocks (unready) for the whole blocks the CPU tier lacks, as far
        as capacity allows, plus write-through to SSD/REMOTE. Returns the mask of tokens to store."""
        return self._match(TaskType.PUT, key, token_ids, token_mask, namespace)

    def match_hashes(self, task_type: TaskType, key: TaskKey, block_hashes: np.ndarray, num_tokens: int,
                     token_mask: np.ndarray | None = None) -> np.ndarray:
        """get_match/put_match for a client that hashed its tokens itself (``hash_blocks`` with the
        namespace; one uint64 per whole block of ``num_tokens`` tokens). Same reservations and errors."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise InvalidRequest(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        if (not isinstance(block_hashes, np.ndarray) or block_hashes.dtype != np.uint64 or block_hashes.ndim != 1
                or block_hashes.shape[0] != num_tokens // self.tokens_per_block):
            raise InvalidRequest(f"block_hashes must be 1-D uint64 with {num_tokens // self.tokens_per_block} "
                                 f"entries for {num_tokens} tokens")
        return self._plan(task_type, check_key(key), block_hashes, num_tokens, token_mask)

    def _match(self, task_type: TaskType, key: TaskKey, token_ids: np.ndarray, token_mask: np.ndarray | None,
               namespace: bytes) -> np.ndarray:
        key = check_key(key)
        tokens = check_tokens(token_ids)
        return self._plan(task_type, key, None, tokens.shape[0], token_mask, tokens, check_namespace(namespace))

    def _plan(self, task_type: TaskType, key: TaskKey, hashes: np.ndarray | None, num_tokens: int,
              token_mask: np.ndarray | None, tokens: np.ndarray | None = None, namespace: bytes = b"") -> np.ndarray:
        if key in self._tasks:
            raise InvalidRequest(f"task {key} already exists")
        t = self.tokens_per_block
        first_true = check_token_mask(token_mask, num_tokens, t)
        if hashes is None:
            assert tokens is not None
            hashes = hash_blocks(tokens, t, namespace)
        if self._salt:
            hashes = hashes ^ np.uint64(self._salt)  # a reset's generation: no key of an older one matches
        first_block = -(-first_true // t)
        planner = plan_get if task_type is TaskType.GET else plan_put
        plan = planner(self.tiers, hashes, num_tokens, t, first_block, self._clock())
        self._tasks[key] = Task(key, plan, num_tokens, first_true)
        self._count_match(task_type, hashes.size, plan.num_hit_blocks, plan.num_moved_blocks)
        if task_type is TaskType.GET:
            self._count_tier_hits(plan.graph.nodes, plan.num_moved_blocks)
        return plan.mask

    def _count_tier_hits(self, nodes: list[OpNode], num_moved: int) -> None:
        for key, num in zip(_TIER_HIT_KEYS.values(), _tier_blocks(nodes, num_moved), strict=True):
            self._counters[key] += num

    def tier_split(self, key: TaskKey) -> tuple[int, int, int]:
        """A matched GET's loaded blocks by the tier they are read from: (CPU, SSD, REMOTE), in prefix
        order (see ``_tier_blocks``). Reads only; unknown key or a PUT: InvalidRequest."""
        task = self._task(key)
        if task.task_type is not TaskType.GET:
            raise InvalidRequest(f"task {key} is a PUT; only a GET has a tier split")
        return _tier_blocks(task.plan.graph.nodes, task.plan.num_moved_blocks)

    def _count_match(self, task_type: TaskType, num_blocks: int, num_hit: int, num_moved: int) -> None:
        c = self._counters
        if task_type is TaskType.GET:
            c["num_get_matches"] += 1
            c["get_query_blocks"] += num_blocks
            c["get_hit_blocks"] += num_hit
            c["get_moved_blocks"] += num_moved
        else:
            c["num_put_matches"] += 1
            c["put_query_blocks"] += num_blocks
            c["put_hit_blocks"] += num_hit
            c["put_stored_blocks"] += num_moved

    # ---- launch and completion -------------------------------------------------------------

    def launch(self, key: TaskKey, slot_mapping: np.ndarray) -> list[TransferOp]:
        """Bind GPU slots and return the ops runnable now (dispatch them to workers).

        Launching again with the same GPU blocks returns []; with others, or a cancelled task,
        raises InvalidRequest. A task that moves nothing finishes SUCCESS here with no ops.
        """
        task = self._task(key)
        gpu_ids = gpu_blocks_from_slots(slot_mapping, task, self.tokens_per_block)
        if task.launched:
            if task.gpu_block_ids is None or not np.array_equal(gpu_ids, task.gpu_block_ids):
                raise InvalidRequest(f"task {key} was already launched with a different slot mapping")
            return []
        if task.cancelled:
            raise InvalidRequest(f"task {key} was cancelled")
        return self._track(task, task.launch(gpu_ids, self._new_op_id))

    def launch_prefetch(self, key: TaskKey) -> list[TransferOp]:
        """Start a matched GET with no engine destination: its SSD/remote hits are promoted into the
        CPU tier and nothing is copied toward the engine. SUCCESS once the promotions landed; the
        task's mask marks the prefix that a GET can then load from CPU. Returns the ops to dispatch."""
        task = self._task(key)
        if task.task_type is not TaskType.GET:
            raise InvalidRequest(f"task {key} is a PUT; only a GET can prefetch")
        if task.launched or task.cancelled:
            raise InvalidRequest(f"task {key} was already launched or cancelled")
        task.prefetch = True
        return self._track(task, task.launch(np.empty(0, dtype=np.int64), self._new_op_id))

    def coalesce(self, ops: list[TransferOp]) -> list[TransferOp]:
        """The ops to dispatch in place of ``ops`` (ready together: one launch of several tasks, or the
        completions of one worker report): each direction's device ops of one DP client become one
        batched op (``scheduler/batch.py``), completed through ``complete_op`` like any other."""
        out, batched = coalesce(ops, self._new_op_id)
        for op in batched:
            self._batches[op.op_id] = op.members
            self._batch_of.update((m.op_id, op.op_id) for m in op.members)
            self._counters["num_batched_ops"] += 1
            self._counters["num_batched_member_ops"] += len(op.members)
        return out

    def complete_op(self, op_id: int, ok: bool, error: str = "", corrupt_at: int = -1) -> list[TransferOp]:
        """A worker finished ``op_id``. Success publishes what it wrote and releases what it read;
        failure fails its task (engine part too unless already done; ``error`` is reported by poll),
        drops its undispatched ops and rolls back. Completions after the task failed or was
        cancelled roll back whatever their outcome. Returns the ops that became runnable (pass them
        through ``coalesce`` before dispatching). A batched op completes each of its members with
        its outcome: a failed batch fails every task in it.
        ``corrupt_at`` >= 0 (a failed DISK2H): its block at that index had corrupt bytes on SSD; it
        and the rest of the prompt are a miss (see ``Task``), and that block leaves the SSD index
        with everything below it. Unknown or already completed op id (a batch's member included):
        InvalidRequest."""
        members = self._batches.pop(op_id, None) if isinstance(op_id, int) else None
        if members is not None:
            ops: list[TransferOp] = []
            for member in members:
                del self._batch_of[member.op_id]
                ops += self._complete_one(member.op_id, ok, error, -1)
            return ops
        if isinstance(op_id, int) and op_id in self._batch_of:
            raise InvalidRequest(f"op id {op_id} is part of batched op {self._batch_of[op_id]}: complete that one")
        return self._complete_one(op_id, ok, error, corrupt_at)

    def _complete_one(self, op_id: int, ok: bool, error: str, corrupt_at: int) -> list[TransferOp]:
        entry = self._ops.pop(op_id, None) if isinstance(op_id, int) else None
        if entry is None:
            raise InvalidRequest(f"unknown or already completed op id {op_id!r}")
        task, node = entry
        if not ok:
            self._counters["num_failed_ops"] += 1
            self._note_remote_miss(node)
        corrupt_at = corrupt_at if not ok and node.op_type is OpType.DISK2H and 0 <= corrupt_at < len(
            node.src_block_ids) else -1
        num_lost = task.num_lost_blocks
        ops, to_prune = task.complete(node, bool(ok), self._new_op_id, error, corrupt_at)
        self._counters["get_lost_blocks"] += task.num_lost_blocks - num_lost
        self._prune(to_prune)
        if corrupt_at >= 0:
            self._discard_corrupt(node, corrupt_at)
        return self._track(task, ops)

    def _discard_corrupt(self, disk2h: OpNode, corrupt_at: int) -> None:
        """Drop the DISK2H's corrupt SSD block (and its subtree) from the SSD index: never served again."""
        ssd = self.tiers.ssd
        path = disk2h.writes[0].path_hashes if disk2h.writes else None
        if ssd is None or path is None:
            return
        self._counters["ssd_corrupt_blocks"] += 1
        end = path.shape[0] - disk2h.src_block_ids.shape[0] + corrupt_at + 1
        self._counters["ssd_discarded_blocks"] += ssd.discard(path[:end])

    def _note_remote_miss(self, node: OpNode) -> None:
        """A failed REMOTE2H: the store no longer holds (some of) its keys, or is gone; forget them."""
        store = self.tiers.remote_store
        if store is not None and node.op_type is OpType.REMOTE2H and node.block_hashes is not None:
            store.lookup.note_missing(node.block_hashes)

    def _track(self, task: Task, dispatched: Dispatched) -> list[TransferOp]:
        ops = []
        for node, op in dispatched:
            self._ops[op.op_id] = (task, node)
            ops.append(op)
        return ops

    def _new_op_id(self) -> int:
        return next(self._op_ids)

    # ---- cancel, poll, release ---------------------------------------------------------------

    def cancel(self, key: TaskKey) -> bool:
        """Cancel a task not yet launched: its reservations are released now, it polls CANCELLED and
        can no longer be launched. A launched task is not cancelled (returns False): it ends on its
        own, and poll keeps reporting its real state. Unknown key: InvalidRequest."""
        cancelled, to_prune = self._task(key).cancel()
        self._prune(to_prune)
        return cancelled

    def poll(self, key: TaskKey, completely: bool = False) -> KVResponse:
        """Status without blocking: NOTFOUND (unknown), UNREADY (not launched / running), SUCCESS
        (engine part done, or with ``completely`` every op done), FAILED, CANCELLED."""
        task = self._tasks.get(key) if isinstance(key, tuple) else None
        if task is None:
            task_id = key[1] if isinstance(key, tuple) and len(key) == 2 else -1
            return KVResponse(TaskStatus.NOTFOUND, task_id, None)
        return task.response(completely)

    def release(self, key: TaskKey) -> None:
        """Forget a task. A task whose engine part is still pending is aborted first; write-through
        still in flight finishes (and commits) after the key is gone. Unknown key: InvalidRequest."""
        task = self._task(key)
        self._prune(task.abort())
        del self._tasks[key]

    def drop_client(self, client_id: int) -> list[int]:
        """A client vanished: release all its tasks (cancelling unfinished ones). Returns the op ids
        of its tasks still in flight; their completions must still be reported."""
        for key in [k for k in self._tasks if k[0] == client_id]:
            self.release(key)
        return sorted({self._batch_of.get(op_id, op_id) for op_id, (task, _) in self._ops.items()
                       if task.key[0] == client_id})

    def task_keys(self) -> list[TaskKey]:
        """Keys of every task in the table (matched, running, or final and not yet released)."""
        return list(self._tasks)

    def _task(self, key: TaskKey) -> Task:
        task = self._tasks.get(key) if isinstance(key, tuple) else None
        if task is None:
            raise InvalidRequest(f"unknown task {key!r}")
        return task

    def _prune(self, writes: list[Reservation]) -> None:
        for res in writes:
            assert res.path_hashes is not None
            res.index.prune(res.path_hashes)

    def reset(self) -> list[TaskKey]:
        """Drop every tier's index (after a weight update, say): no block cached before is ever
        matched again. Tasks not launched yet are cancelled and released (returned); launched tasks
        run to their end and their completions land in the old generation, which no match reaches.
        Every unlocked block is freed now; blocks old ops still use are freed as leaves once their
        ops end (evicted first: nothing touches them again). The remote store keeps its old keys,
        but the new generation's keys differ from all of them (every block key is XORed with a
        per-reset salt), so they are never read either."""
        self.set_reset_generation(self._num_resets + 1)
        dropped = [key for key, task in self._tasks.items() if not task.launched]
        for key in dropped:
            self.release(key)
        for index in self.tiers.all():
            index.evict(index.pool.num_used_blocks)
        self._counters["num_resets"] += 1
        return dropped

    @property
    def reset_generation(self) -> int:
        """How many resets ever happened to this cache (0 = none): the salt of every block key."""
        return self._num_resets

    def set_reset_generation(self, generation: int) -> None:
        """Key blocks as the ``generation``-th reset does (a restarted server whose durable SSD tier
        was last reset ``generation`` times: its older blocks must stay unmatchable)."""
        self._num_resets = generation
        self._salt = int(xxhash.xxh3_64_intdigest(f"flexkv-reset-{generation}".encode())) or 1 if generation else 0

    def evict_proactively(self) -> int:
        """Proactive eviction (``evict_start_threshold`` < 1): every bounded tier fuller than the
        threshold evicts ``evict_ratio`` of its blocks (unlocked leaves, in policy order) now, so
        later matches find free blocks. Returns the blocks evicted. The server calls it when idle."""
        threshold = self.cache.evict_start_threshold
        if threshold >= 1.0:
            return 0
        freed = 0
        for index in self.tiers.all():
            pool = index.pool
            if pool.growable or pool.num_used_blocks <= threshold * pool.num_blocks:
                continue
            freed += index.evict(max(1, int(self.cache.evict_ratio * pool.num_blocks)))
        self._counters["proactive_evicted_blocks"] += freed
        return freed

    def restore_ssd_index(self, records: Records, progress: Progress | None = None) -> int:
        """At start, before any match: index the SSD journal's blocks (ready) again; returns how many."""
        if self.tiers.ssd is None:
            return 0
        num = restore(self.tiers.ssd, records, self._clock(), progress)
        self._counters["ssd_restored_blocks"] += num
        return num

    # ---- introspection -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters: free/used/evicted blocks per tier, tasks, ops in flight, match hits."""
        out = dict(self._counters)
        for index in self.tiers.all():
            out[f"{index.name}_free_blocks"] = index.pool.num_free_blocks
            out[f"{index.name}_used_blocks"] = index.pool.num_used_blocks
            out[f"{index.name}_evicted_blocks"] = index.num_evicted_blocks
            out[f"{index.name}_nodes"] = index.num_nodes
        if self.tiers.remote_store is not None:
            out.update(self.tiers.remote_store.stats())
        out["reset_generation"] = self._num_resets
        out["num_tasks"] = len(self._tasks)
        out["num_ops_in_flight"] = len(self._ops)
        out["num_batched_ops_in_flight"] = len(self._batches)
        return out

    def check_invariants(self) -> None:
        """Index, pools and tasks agree; raises AssertionError naming the problem."""
        tasks = {id(t): t for t in self._tasks.values()}
        tasks.update({id(t): t for t, _ in self._ops.values()})
        expected_locks = {id(i): np.zeros_like(i.lock_count) for i in self.tiers.all()}
        writers = {id(i): np.zeros_like(i.lock_count) for i in self.tiers.all()}
        for task in tasks.values():
            for node in task.live_nodes():
                for res in (*node.reads, *node.writes):
                    np.add.at(expected_locks[id(res.index)], res.block_ids, 1)
                for res in node.writes:
                    np.add.at(writers[id(res.index)], res.block_ids, 1)
            dispatched = {n.op_id for n in task.in_flight()}
            assert all(self._ops.get(op_id, (None,))[0] is task for op_id in dispatched), (
                f"task {task.key}: a dispatched op is missing from the op table")
        for index in self.tiers.all():
            index.check_invariants()
            locks, ready, writer = index.lock_count, index.ready, writers[id(index)]
            assert np.array_equal(locks, expected_locks[id(index)]), (
                f"{index.name}: lock counts differ from the live ops' reservations")
            assert np.array_equal(writer > 0, ~ready & (locks > 0)) and writer.max(initial=0) <= 1, (
                f"{index.name}: an unready locked block must have exactly one writer, a ready one none")
        self._check_remote_store(list(tasks.values()))
        self._check_batches()

    def _check_batches(self) -> None:
        """Every batched op's members are dispatched ops of the op table, each in exactly one batch."""
        members = [m.op_id for ms in self._batches.values() for m in ms]
        assert len(members) == len(set(members)) == len(self._batch_of), "a member op is in two batches"
        for batch_id, ms in self._batches.items():
            for m in ms:
                entry = self._ops.get(m.op_id)
                assert entry is not None and self._batch_of.get(m.op_id) == batch_id, (
                    f"batched op {batch_id}: member {m.op_id} is not an op in flight of this batch")
                task, node = entry
                assert task.key == m.task_key and node.state is OpState.DISPATCHED, (
                    f"batched op {batch_id}: member {m.op_id} is not dispatched for task {m.task_key}")

    def _check_remote_store(self, tasks: list[Task]) -> None:
        """Lookup mode: the keys counted as being written are exactly those of live H2REMOTE ops."""
        store = self.tiers.remote_store
        if store is None:
            return
        store.lookup.check_invariants()
        expected: dict[int, int] = {}
        for task in tasks:
            for node in task.live_nodes():
                if node.op_type is OpType.H2REMOTE and node.block_hashes is not None:
                    for h in node.block_hashes.tolist():
                        expected[h] = expected.get(h, 0) + 1
        assert store.writing_counts() == expected, "remote: keys being written differ from the live H2REMOTE ops"

"""A rank's KV fence: once the engine seals it, no flexkv process reads or writes that rank's KV memory.

An engine that gives up on flexkv (its server stopped answering; it shuts down) hands its KV blocks
back to its own allocator. A copy that the server dispatches later (a server that was stalled, not
dead, processes the launches queued in its socket when it resumes) would then write cached KV into
blocks that now hold another request's KV, or store another request's KV under this prompt's
hashes: wrong KV, with no error anywhere. The fence makes "gave up" final on the engine's own host,
whatever the server does:

* the engine (``KVTPClient.register``) creates a small shared-memory segment, one per rank
  registration, and names it in its registration; the rank's device worker (a process of the
  server, or the engine-side lane thread) attaches it;
* the worker takes a shared ``flock`` on the segment's file for every batch of copies into or out of
  the engine's memory, from before its first copy is enqueued until the last one is complete, and
  checks the sealed word under that lock: sealed, and the batch fails without touching a byte;
* ``seal`` (``KVTPClient.close`` calls it first) stores the sealed word, so no batch starts any more,
  then takes the exclusive lock, so it waits for the batches running now to end, and returns. From then
  on every copy fails. (A batch that read the word just before it was stored holds the shared lock,
  and the exclusive lock waits for it; one that takes the shared lock after the seal released the
  exclusive one reads the stored word: the kernel's lock and unlock order the two.) A worker
  that holds the lock past ``timeout_s`` (stopped, or hung mid-copy) is killed (its pid is in the
  segment; the kernel drops its lock when it exits), so ``seal`` neither hangs nor returns while a
  copy could still follow.

Holding and releasing the lock costs a batch ~7 us (measured on the 2-core development machine), not
a cost per block.
The segment is removed by its creator (``close``), or by the server once the creator is dead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import time

import numpy as np
import numpy.typing as npt

from flexkv.shm import SHM_DIR, SharedPool, make_pool_name, process_exited
from flexkv.types import FlexKVError

log = logging.getLogger("flexkv.fence")

_SEALED, _WORKER_PID = 0, 1  # words of the segment's data region
_NUM_WORDS = 2
_POLL_S = 0.001


class FenceSealed(FlexKVError):
    """The engine sealed this rank's KV memory: flexkv may no longer copy into or out of it."""


class KVFence:
    """One rank's fence. ``create`` in the engine (it seals and removes it), ``attach`` in the worker."""

    def __init__(self, segment: SharedPool) -> None:
        self._segment = segment
        self._words: npt.NDArray[np.uint64] = np.frombuffer(segment.buffer, dtype=np.uint64, count=_NUM_WORDS)
        self._path = os.path.join(SHM_DIR, segment.name.lstrip("/"))
        self._sealed_done = False  # (engine) a seal returned: nothing runs, nothing will

    @classmethod
    def create(cls) -> KVFence:
        return cls(SharedPool.create(make_pool_name("fence"), _NUM_WORDS * 8, prefault=True))

    @classmethod
    def attach(cls, name: str) -> KVFence:
        """Map the fence an engine created and record this process as its worker."""
        fence = cls(SharedPool.attach_at_least(name, _NUM_WORDS * 8, "fence"))
        fence._words[_WORKER_PID] = np.uint64(os.getpid())
        return fence

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def sealed(self) -> bool:
        return bool(self._words[_SEALED])  # (a closed fence's words are all ones: sealed)

    # -- worker --------------------------------------------------------------------------------
    def hold(self) -> int:
        """Take the shared lock for one batch of copies (a descriptor of its own: batches of several
        threads, or of one lane in flight at once, hold it independently). Raises FenceSealed (lock
        not held) once the engine sealed or removed the fence. Pass the result to :meth:`release`."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FenceSealed("the engine closed its KV memory to flexkv (its fence is gone)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an engine is sealing (microseconds)
            if self.sealed:
                raise FenceSealed("the engine closed its KV memory to flexkv (sealed): this copy would land in, "
                                  "or read, blocks it may have handed to other requests")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def release(fd: int) -> None:
        """The batch's copies are complete (or failed): drop its lock."""
        os.close(fd)  # closing the descriptor drops its flock

    # -- engine --------------------------------------------------------------------------------
    def seal(self, timeout_s: float = 10.0) -> None:
        """Wait for the batch of copies running now (if any) to end, then forbid every later one.
        A worker holding the lock past ``timeout_s`` is killed first. Idempotent. Raises FlexKVError
        only if the lock cannot be had even then (then a copy may still touch the memory)."""
        if self._segment.closed or self._sealed_done:
            return
        # Sealed first, then the exclusive lock: batches that start from now on refuse, so a busy worker
        # whose batches overlap cannot keep the shared lock held; the lock then waits for those running.
        self._words[_SEALED] = np.uint64(1)
        fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not _lock_exclusive(fd, timeout_s):
                pid = int(self._words[_WORKER_PID])
                if pid <= 0 or pid == os.getpid() or not _is_flexkv_worker(pid):
                    raise FlexKVError(f"seal: this rank's KV fence is still held after {timeout_s:g} s, and not by a "
                                      "flexkv worker process that could be stopped")
                log.error("flexkv fence %s: worker pid %d still copies after %.1f s (stopped or hung); killing it so "
                          "that no copy can follow", self.name, pid, timeout_s)
                _kill(pid)
                wait_s = max(timeout_s, 5.0)
                if not _lock_exclusive(fd, wait_s) or not _wait_exited(pid, wait_s):
                    raise FlexKVError(f"seal: worker pid {pid} did not exit within {wait_s:g} s of SIGKILL")
            self._sealed_done = True
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap; the creator seals first (if not sealed yet) and removes the segment."""
        if self._segment.closed:
            return
        creator = self._segment.is_creator
        try:
            if creator:
                self.seal()
        finally:
            self._words = np.ones(_NUM_WORDS, dtype=np.uint64)  # (a closed fence reads as sealed)
            self._segment.close()
            if creator:
                self._segment.unlink()


def _lock_exclusive(fd: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _is_flexkv_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"flexkv.workers" in f.read()
    except OSError:
        return False


def _wait_exited(pid: int, timeout_s: float) -> bool:
    """Whether ``pid`` exits within ``timeout_s`` (a zombie counts: its files, its CUDA context with them,
    are closed)."""
    deadline = time.monotonic() + timeout_s
    while not process_exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # gone already: its lock is dropped

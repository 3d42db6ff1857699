"""The SSD tier's index journal: which block each SSD slot holds, with the checksum of its bytes.

An append-only file in the first SSD cache directory. A 4 KiB header names the format, the KV
layout fingerprint and the slot layout; then fixed 64-byte records, one per block written:
``(seq, ssd_id, block_hash, parent_hash, depth, flags, checksum, generation, check)``. ``check``
is XXH3 of the record's first 56 bytes seeded with the journal's ``generation``, so a torn or
overwritten record is recognised and skipped. A slot's latest valid record wins.

Ordering (the SSD worker, ``workers/ssd_store.py``): a block's bytes are written and its data
file fdatasync'ed before its record is appended, and the records are fdatasync'ed before the
write is reported done. So a record found at start names bytes that were durable; the bytes are
still verified against ``checksum`` on every read (a slot overwritten later fails to verify
under the old record's key). Compaction rewrites the file (temporary file, fsync, rename) with
one record per slot once it holds more than twice as many records as slots.

Read by the SSD worker (its checksum table) and by the server at start (the radix index rebuild).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.native.checksum import checksum_blocks

log = logging.getLogger("flexkv.ssd")

JOURNAL_NAME = "flexkv_ssd.journal"
LOCK_NAME = "flexkv_ssd.lock"  # held by the one SSD worker using the directory
HEADER_BYTES = 4096
FORMAT = "flexkv-ssd-journal/1"
FLAG_HAS_PARENT = 1  # depth > 0: parent_hash is the previous block of the prompt
RECORD = np.dtype([("seq", "<u8"), ("ssd_id", "<i8"), ("block_hash", "<u8"), ("parent_hash", "<u8"),
                   ("depth", "<u4"), ("flags", "<u4"), ("checksum", "<u8"), ("generation", "<u8"),
                   ("check", "<u8")])
RECORD_BYTES = RECORD.itemsize
_CHECKED_BYTES = RECORD_BYTES - 8
assert RECORD_BYTES == 64

Records = npt.NDArray[Any]  # structured array of RECORD


def journal_path(first_dir: str) -> str:
    return os.path.join(first_dir, JOURNAL_NAME)


def record_checks(records: Records) -> npt.NDArray[np.uint64]:
    """The ``check`` each record must carry (XXH3 of its first 56 bytes, seeded by its generation)."""
    records = np.ascontiguousarray(records)
    if records.shape[0] == 0:
        return np.empty(0, dtype=np.uint64)
    base = records.ctypes.data
    addrs = base + np.arange(records.shape[0], dtype=np.uint64) * np.uint64(RECORD_BYTES)
    return checksum_blocks(addrs, _CHECKED_BYTES, records["generation"])


@dataclasses.dataclass
class JournalScan:
    """What a journal holds: the latest valid record of each slot, sorted by ssd_id."""

    records: Records
    num_read: int = 0  # records in the file (a torn tail counts as one)
    num_skipped: int = 0  # torn, corrupt, out-of-range or foreign records
    generation: int = 0
    next_seq: int = 1


def _header(fingerprint: str, layout: dict[str, Any], generation: int) -> bytes:
    raw = json.dumps({"format": FORMAT, "fingerprint": fingerprint, "layout": layout,
                      "generation": generation}).encode()
    if len(raw) >= HEADER_BYTES:
        raise ValueError("SSD journal header too large")
    return raw + b"\0" * (HEADER_BYTES - len(raw))


def _parse_header(raw: bytes) -> dict[str, Any] | None:
    try:
        head = json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return head if isinstance(head, dict) and head.get("format") == FORMAT else None


def header_mismatch(path: str, fingerprint: str, layout: dict[str, Any]) -> str | None:
    """Why the journal at ``path`` cannot be used with this fingerprint/layout; None if it can (or is absent)."""
    try:
        with open(path, "rb") as f:
            head = _parse_header(f.read(HEADER_BYTES))
    except FileNotFoundError:
        return None
    if head is None:
        return "unreadable journal header"
    if head.get("fingerprint") != fingerprint:
        return f"KV layout fingerprint {head.get('fingerprint')!r} != {fingerprint!r}"
    if head.get("layout") != layout:
        return "slot layout differs"
    return None


def scan(path: str, fingerprint: str, layout: dict[str, Any] | None, num_blocks: int) -> JournalScan:
    """Read the journal at ``path``. Missing, or written for another fingerprint/layout (``layout``
    None: any): empty. Torn and corrupt records are skipped (and counted); the latest valid record
    per slot wins."""
    empty = JournalScan(np.zeros(0, dtype=RECORD))
    try:
        with open(path, "rb") as f:
            head = _parse_header(f.read(HEADER_BYTES))
            body = f.read()
    except FileNotFoundError:
        return empty
    if head is None or head.get("fingerprint") != fingerprint or (layout is not None and head.get("layout") != layout):
        return empty
    generation = int(head.get("generation", 0))
    whole = len(body) // RECORD_BYTES
    records = np.frombuffer(body, dtype=RECORD, count=whole)
    ok = (records["check"] == record_checks(records)) & (records["generation"] == np.uint64(generation))
    ok &= (records["ssd_id"] >= 0) & (records["ssd_id"] < num_blocks)
    ok &= (records["depth"] > 0) == ((records["flags"] & FLAG_HAS_PARENT) != 0)
    good = records[ok]
    next_seq = int(good["seq"].max()) + 1 if good.size else 1
    # latest per slot: the last record in file order (seq grows with it)
    _, last_rev = np.unique(good["ssd_id"][::-1], return_index=True)
    latest = good[good.shape[0] - 1 - last_rev] if good.size else good
    torn = int(len(body) % RECORD_BYTES != 0)
    return JournalScan(latest.copy(), whole + torn, int(whole - ok.sum()) + torn, generation, next_seq)


class Journal:
    """The SSD worker's handle on the journal: a table of the latest record per slot in memory,
    appends with fdatasync, compaction. Opening compacts the file (and starts a new one for another
    fingerprint or layout). One thread only."""

    def __init__(self, first_dir: str, fingerprint: str, layout: dict[str, Any], num_blocks: int,
                 sync: bool = True) -> None:
        self.path = journal_path(first_dir)
        self._lock_fd = _lock(os.path.join(first_dir, LOCK_NAME))
        self.fingerprint, self.layout, self.num_blocks, self.sync = fingerprint, layout, num_blocks, sync
        why = header_mismatch(self.path, fingerprint, layout)
        if why is not None:
            log.warning("SSD journal %s: %s; starting the SSD tier cold", self.path, why)
        found = scan(self.path, fingerprint, layout, num_blocks)
        if found.num_skipped:
            log.warning("SSD journal %s: skipped %d torn or corrupt record(s) of %d", self.path, found.num_skipped,
                        found.num_read)
        self.table = np.zeros(num_blocks, dtype=RECORD)  # seq 0: the slot holds nothing known
        self.table[found.records["ssd_id"]] = found.records
        self.next_seq = found.next_seq
        self.num_records = 0
        self._fd = -1
        self.compact()

    @property
    def num_known(self) -> int:
        return int(np.count_nonzero(self.table["seq"]))

    def append(self, ssd_ids: npt.NDArray[np.int64], block_hashes: npt.NDArray[np.uint64],
               parent_hashes: npt.NDArray[np.uint64], depths: npt.NDArray[np.int64],
               checksums: npt.NDArray[np.uint64]) -> None:
        """Record that these slots now hold these blocks (their bytes already durable). Raises OSError."""
        n = ssd_ids.shape[0]
        if n == 0:
            return
        recs = np.zeros(n, dtype=RECORD)
        recs["seq"] = np.arange(self.next_seq, self.next_seq + n, dtype=np.uint64)
        recs["ssd_id"], recs["block_hash"], recs["parent_hash"] = ssd_ids, block_hashes, parent_hashes
        recs["depth"] = depths
        recs["flags"] = np.where(depths > 0, FLAG_HAS_PARENT, 0)
        recs["checksum"], recs["generation"] = checksums, self.generation
        recs["check"] = record_checks(recs)
        if self.num_records + n > 2 * self.num_blocks + 1024:
            self.table[ssd_ids] = recs
            self.next_seq += n
            self.compact()
            return
        _write_all(self._fd, recs.tobytes())
        if self.sync:
            os.fdatasync(self._fd)
        self.table[ssd_ids] = recs
        self.next_seq += n
        self.num_records += n

    def forget(self, ssd_ids: npt.NDArray[np.int64]) -> None:
        """Drop these slots from the in-memory table (their write failed: their bytes are unknown)."""
        self.table[ssd_ids] = np.zeros(1, dtype=RECORD)

    def compact(self) -> None:
        """Rewrite the journal with one record per known slot (new generation), atomically."""
        self.generation = secrets.randbits(63) + 1
        known = self.table[self.table["seq"] != 0].copy()
        known["generation"] = self.generation
        known["check"] = record_checks(known)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, _header(self.fingerprint, self.layout, self.generation) + known.tobytes())
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        if self.sync:
            _fsync_dir(os.path.dirname(self.path))
        self.table[known["ssd_id"]] = known
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.num_records = known.shape[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _lock(path: str, wait_s: float = 15.0) -> int:
    """Hold an exclusive flock on ``path`` (a predecessor worker of a killed server may still be
    exiting); OSError naming the file if it stays taken for ``wait_s``."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise OSError(f"SSD cache dir is in use by another flexkv process (lock {path})") from None
            time.sleep(0.05)

def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

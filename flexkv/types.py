"""Enums and small value types shared by every process (the lowest layer; imports nothing of ours)."""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

import numpy as np
import numpy.typing as npt


class Medium(enum.IntEnum):
    """Where bytes live. CPU, SSD and REMOTE are cache tiers; GPU is the engine's memory."""

    GPU = 0
    CPU = 1
    SSD = 2
    REMOTE = 3


CACHE_TIERS: tuple[Medium, ...] = (Medium.CPU, Medium.SSD, Medium.REMOTE)


class OpType(enum.IntEnum):
    """A transfer op of a task's graph: (source medium, destination medium)."""

    H2D = 0  # CPU pool -> GPU (engine) blocks
    D2H = 1  # GPU (engine) blocks -> CPU pool
    DISK2H = 2  # SSD -> CPU pool
    H2DISK = 3  # CPU pool -> SSD
    REMOTE2H = 4  # remote store -> CPU pool
    H2REMOTE = 5  # CPU pool -> remote store

    @property
    def src(self) -> Medium:
        return _OP_MEDIA[self][0]

    @property
    def dst(self) -> Medium:
        return _OP_MEDIA[self][1]


_OP_MEDIA: dict[OpType, tuple[Medium, Medium]] = {
    OpType.H2D: (Medium.CPU, Medium.GPU),
    OpType.D2H: (Medium.GPU, Medium.CPU),
    OpType.DISK2H: (Medium.SSD, Medium.CPU),
    OpType.H2DISK: (Medium.CPU, Medium.SSD),
    OpType.REMOTE2H: (Medium.REMOTE, Medium.CPU),
    OpType.H2REMOTE: (Medium.CPU, Medium.REMOTE),
}


class TaskType(enum.IntEnum):
    GET = 0
    PUT = 1


class TaskStatus(enum.IntEnum):
    """What ``wait``/``try_wait`` report for a task."""

    SUCCESS = 0
    NOTFOUND = 1  # unknown task id
    UNREADY = 2  # still running (try_wait) or not launched yet
    TIMEOUT = 3  # wait() gave up before the task finished
    CANCELLED = 4
    FAILED = 5


class BlockFormat(enum.Enum):
    """Byte order of one layer's K and V inside a CPU/SSD/remote block (part of the key fingerprint).

    SPLIT: a K chunk then a V chunk, each ``[T, H, D]`` (or one ``[T, D]`` latent for MLA). The packed
    formats keep an engine's packed block as it is (vLLM >= 0.26 packs K and V in the last dim), split
    in two halves: PACKED_HND ``[H, T, 2*D]``, PACKED_NHD ``[T, H, 2*D]``. Engines whose formats
    differ must never read each other's blocks.
    """

    SPLIT = "split"
    PACKED_HND = "packed_hnd"
    PACKED_NHD = "packed_nhd"


class EvictionPolicy(enum.Enum):
    """Which unlocked leaf a tier evicts first (scheduler/eviction.py)."""

    LRU = "lru"  # least recently used
    LFU = "lfu"  # fewest hits, then least recent
    SLRU = "slru"  # segmented LRU: probation before protected
    FLRU = "flru"  # frequency-aware LRU: each hit adds grace time
    FIFO = "fifo"  # oldest insertion
    HAZARD = "hazard"  # lowest learned reuse rate per conversation class (online)


class DType(enum.Enum):
    """KV element types; the value is the name torch and numpy use."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT8_E4M3FN = "float8_e4m3fn"
    FLOAT8_E5M2 = "float8_e5m2"
    UINT8 = "uint8"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @classmethod
    def parse(cls, value: object) -> DType:
        """Accept a DType, its name (``"bfloat16"``, ``"bf16"``) or a torch/numpy dtype."""
        if isinstance(value, DType):
            return value
        name = str(value).removeprefix("torch.").lower()
        name = _ALIASES.get(name, name)
        try:
            return cls(name)
        except ValueError:
            allowed = ", ".join(d.value for d in cls)
            raise ValueError(f"dtype: unsupported {value!r}; allowed: {allowed}") from None


_ITEMSIZE = {
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.FLOAT32: 4,
    DType.FLOAT8_E4M3FN: 1,
    DType.FLOAT8_E5M2: 1,
    DType.UINT8: 1,
}
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
            "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


class KVResponse(NamedTuple):
    """One task's result from ``wait``/``try_wait``. ``return_mask`` marks the tokens moved."""

    status: TaskStatus
    task_id: int
    return_mask: npt.NDArray[np.bool_] | None
    error: str = ""  # why a FAILED task failed


@dataclasses.dataclass(frozen=True)
class MatchInfo:
    """What ``KVManager.get_match_info`` reserved, and what loading it should cost.

    ``mask`` marks the tokens launch will load (as ``get_match``'s). The loaded blocks come from the
    tiers in prefix order: ``num_cpu_blocks`` already in CPU, then ``num_ssd_blocks`` read from SSD,
    then ``num_remote_blocks`` from the remote store (SSD/remote reads may include blocks before a
    token mask's first True: the CPU tier stays prefix-closed). ``read_bps`` is the server's measured
    read rate (bytes/s) per tier, an EWMA of completed ops (a prior before any ran): CPU = the CPU
    tier into the engine's memory (H2D), SSD = DISK2H, REMOTE = REMOTE2H.
    """

    task_id: int
    mask: npt.NDArray[np.bool_]
    num_cpu_blocks: int
    num_ssd_blocks: int
    num_remote_blocks: int
    block_bytes: int
    tokens_per_block: int
    read_bps: dict[Medium, float]

    @property
    def num_tokens(self) -> int:
        """Tokens that launch will load."""
        return int(np.count_nonzero(self.mask))

    @property
    def num_cpu_tokens(self) -> int:
        """Loaded tokens already in the CPU tier: the fast prefix."""
        return min(self.num_tokens, self.num_cpu_blocks * self.tokens_per_block)

    @property
    def load_s(self) -> float:
        """Estimated seconds from launch to the engine's copy done: the SSD and remote reads run side
        by side, then every loaded block goes CPU -> engine."""
        b = self.block_bytes
        lower = max(self.num_ssd_blocks * b / self.read_bps[Medium.SSD],
                    self.num_remote_blocks * b / self.read_bps[Medium.REMOTE])
        return lower + self.num_tokens // self.tokens_per_block * b / self.read_bps[Medium.CPU]

    @property
    def cpu_load_s(self) -> float:
        """Estimated seconds to load only the CPU-resident prefix (``num_cpu_tokens``)."""
        return self.num_cpu_tokens // self.tokens_per_block * self.block_bytes / self.read_bps[Medium.CPU]


class FlexKVError(Exception):
    """Base class of flexkv's own errors."""


class ConfigError(FlexKVError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class InvalidRequest(FlexKVError, ValueError):
    """A request is malformed (wrong dtype/length, unaligned slot mapping, unknown task, ...)."""


class CapacityError(FlexKVError):
    """A tier has no room for what a request needs right now (everything evictable is locked)."""

"""Framing: one typed header frame (msgpack) plus raw array frames; one decoder per direction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt
import zmq

from flexkv.protocol.client_msgs import ClientRequest, GetAsyncBatchMsg, ServerReplyMsg
from flexkv.protocol.worker_msgs import ServerToWorkerMsg, WorkerToServer

M = TypeVar("M")
Frame = bytes | memoryview | zmq.Frame
# One task of a batched get/put_async: token_ids, slot_mapping, token_mask (or None).
TaskFrames = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_] | None]

_encoder = msgspec.msgpack.Encoder()


class ProtocolError(ValueError):
    """A message could not be decoded (garbage, unknown type, missing frames)."""


class Codec(Generic[M]):
    """Encodes any message; decodes only the union of one direction."""

    def __init__(self, union: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(union)

    def encode(self, msg: msgspec.Struct, arrays: Sequence[npt.NDArray[Any] | bytes] = ()) -> list[Frame]:
        frames: list[Frame] = [_encoder.encode(msg)]
        for a in arrays:
            frames.append(a if isinstance(a, bytes) else np.ascontiguousarray(a).data.cast("B"))
        return frames

    def decode(self, frames: Sequence[Frame]) -> tuple[M, list[memoryview]]:
        if not frames:
            raise ProtocolError("empty message")
        try:
            msg = self._decoder.decode(_as_bytes(frames[0]))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProtocolError(f"cannot decode message: {e}") from None
        return msg, [_as_view(f) for f in frames[1:]]


def _as_bytes(f: Frame) -> bytes | memoryview:
    return f.buffer if isinstance(f, zmq.Frame) else f


def _as_view(f: Frame) -> memoryview:
    return f.buffer if isinstance(f, zmq.Frame) else memoryview(f)


def frame_array(frame: memoryview, dtype: npt.DTypeLike, name: str) -> npt.NDArray[Any]:
    """View a raw frame as a 1-D array of ``dtype``; ProtocolError naming ``name`` if the size is off."""
    itemsize = np.dtype(dtype).itemsize
    if frame.nbytes % itemsize:
        raise ProtocolError(f"{name}: frame of {frame.nbytes} bytes is not a whole number of {np.dtype(dtype)}")
    return np.frombuffer(frame, dtype=dtype)


def batch_frames(msg: GetAsyncBatchMsg, arrays: list[memoryview]) -> list[TaskFrames]:
    """Split a get/put_async_many message's frames per task: (token_ids, slot_mapping, token_mask or
    None). ProtocolError if the lists or the frame count do not fit its ``task_ids``."""
    n = len(msg.task_ids)
    masks = msg.has_masks or [False] * n
    if len(masks) != n or (msg.namespaces and len(msg.namespaces) != n):
        raise ProtocolError(f"{type(msg).__name__}: has_masks and namespaces need one entry per task id ({n})")
    want = 2 * n + sum(masks)
    if len(arrays) != want:
        raise ProtocolError(f"{type(msg).__name__}: expected {want} array frames, got {len(arrays)}")
    out: list[TaskFrames] = []
    at = 0
    for has_mask in masks:
        tokens = frame_array(arrays[at], np.int64, "token_ids")
        slots = frame_array(arrays[at + 1], np.int64, "slot_mapping")
        mask = frame_array(arrays[at + 2], np.bool_, "token_mask") if has_mask else None
        out.append((tokens, slots, mask))
        at += 2 + int(has_mask)
    return out


CLIENT_REQUESTS: Codec[ClientRequest] = Codec(ClientRequest)
SERVER_REPLIES: Codec[ServerReplyMsg] = Codec(ServerReplyMsg)
WORKER_TO_SERVER: Codec[WorkerToServer] = Codec(WorkerToServer)
SERVER_TO_WORKER: Codec[ServerToWorkerMsg] = Codec(ServerToWorkerMsg)


# Masks travel as token ranges: every mask flexkv returns is one contiguous run of whole blocks, and a
# (num_tokens, begin, end) triple is far cheaper than num_tokens bytes on the wire. A mask that is not
# one run (never produced today) still travels, as a raw frame, marked by begin = -1.
NO_MASK = -1


def mask_to_range(mask: npt.NDArray[np.bool_] | None) -> tuple[int, int, int, npt.NDArray[np.bool_] | None]:
    """(num_tokens, begin, end, frame or None); num_tokens == NO_MASK when there is no mask."""
    if mask is None:
        return NO_MASK, 0, 0, None
    n = int(mask.shape[0])
    count = int(np.count_nonzero(mask))
    if count == 0:
        return n, 0, 0, None
    begin = int(np.argmax(mask))
    if bool(mask[begin: begin + count].all()):
        return n, begin, begin + count, None
    return n, -1, -1, mask


def range_to_mask(num_tokens: int, begin: int, end: int, frames: list[memoryview]) -> npt.NDArray[np.bool_] | None:
    """Inverse of :func:`mask_to_range`; pops the frame of a non-contiguous mask from ``frames``."""
    if num_tokens == NO_MASK:
        return None
    if begin < 0:
        if not frames:
            raise ProtocolError("mask frame missing")
        mask = frame_array(frames.pop(0), np.bool_, "mask").copy()
        if mask.shape[0] != num_tokens:
            raise ProtocolError(f"mask frame has {mask.shape[0]} entries, expected {num_tokens}")
        return mask
    if not 0 <= begin <= end <= num_tokens:
        raise ProtocolError(f"mask range [{begin}, {end}) outside [0, {num_tokens}]")
    mask = np.zeros(num_tokens, dtype=np.bool_)
    mask[begin:end] = True
    return mask

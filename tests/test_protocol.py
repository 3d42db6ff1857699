"""Every message type round-trips through its direction's codec; garbage is a ProtocolError."""

from __future__ import annotations

import typing

import msgspec
import numpy as np
import pytest

from flexkv.protocol import client_msgs as cm
from flexkv.protocol import worker_msgs as wm
from flexkv.protocol.codec import (
    CLIENT_REQUESTS,
    SERVER_REPLIES,
    SERVER_TO_WORKER,
    WORKER_TO_SERVER,
    Codec,
    ProtocolError,
    batch_frames,
    frame_array,
    mask_to_range,
    range_to_mask,
)

SAMPLES: list[tuple[Codec[typing.Any], msgspec.Struct]] = [
    (CLIENT_REQUESTS, cm.HelloMsg(client_id=1, req_id=2, pid=3, host="h", role="manager")),
    (CLIENT_REQUESTS, cm.GetMatchMsg(client_id=0, req_id=1, task_id=7, namespace=["lora", "t1"], has_mask=True)),
    (CLIENT_REQUESTS, cm.PutMatchMsg(client_id=0, req_id=1, task_id=8)),
    (CLIENT_REQUESTS, cm.GetMatchInfoMsg(client_id=0, req_id=1, task_id=12, num_tokens=64)),
    (CLIENT_REQUESTS, cm.GetMatchLaunchMsg(client_id=0, req_id=1, task_id=13, num_tokens=64, layerwise=True)),
    (CLIENT_REQUESTS, cm.GetAsyncMsg(client_id=0, task_id=9, namespace=None)),
    (CLIENT_REQUESTS, cm.PutAsyncMsg(client_id=0, task_id=10, has_mask=True)),
    (CLIENT_REQUESTS, cm.GetAsyncBatchMsg(client_id=0, task_ids=[12, 13], has_masks=[False, True],
                                          namespaces=[None, ["lora-b"]])),
    (CLIENT_REQUESTS, cm.PutAsyncBatchMsg(client_id=0, task_ids=[14])),
    (CLIENT_REQUESTS, cm.PrefetchMsg(client_id=0, task_id=11, namespace=["lora-a"])),
    (CLIENT_REQUESTS, cm.LaunchMsg(client_id=0, task_ids=[1, 2])),
    (CLIENT_REQUESTS, cm.CancelMsg(client_id=0, task_ids=[3])),
    (CLIENT_REQUESTS, cm.WaitMsg(client_id=0, req_id=4, task_ids=[1], timeout_s=1.5, completely=True)),
    (CLIENT_REQUESTS, cm.RegisterKVMsg(client_id=0, req_id=5, tp_rank=1, device_id=1, layout_kind="sglang",
                                       num_blocks=4, tokens_per_block=16, num_heads=2, head_size=8, itemsize=2,
                                       num_layers=3, host_segment="/flexkv-x", tensor_offsets=[0, 4096],
                                       cuda_handles=[b"\x01" * 64])),
    (CLIENT_REQUESTS, cm.QueryMsg(client_id=0, req_id=6, what="stats")),
    (CLIENT_REQUESTS, cm.ByeMsg(client_id=0, session_id=12, req_id=7)),
    (SERVER_REPLIES, cm.OkReplyMsg(req_id=1, info={"a": 1, "b": "x", "c": True, "d": 0.5})),
    (SERVER_REPLIES, cm.MatchReplyMsg(req_id=1, task_id=2, num_tokens=40, mask_begin=16, mask_end=32)),
    (SERVER_REPLIES, cm.MatchInfoReplyMsg(req_id=1, task_id=2, num_tokens=40, mask_begin=0, mask_end=32,
                                          tier_blocks=[5, 3, 0], read_bps=[2e10, 3e9, 1.25e9])),
    (SERVER_REPLIES, cm.WaitReplyMsg(req_id=1, task_ids=[1], statuses=[0], errors=[""], num_tokens=[-1],
                                     mask_begins=[0], mask_ends=[0])),
    (SERVER_REPLIES, cm.ErrorReplyMsg(req_id=1, error="bad", kind="InvalidRequest")),
    (WORKER_TO_SERVER, wm.WorkerHelloMsg(worker_id="w", pid=1, op_types=[0, 1], credential="c0ffee", lane=1)),
    (WORKER_TO_SERVER, wm.WorkerByeMsg(worker_id="w", reason="closed")),
    (WORKER_TO_SERVER, wm.OpsDoneMsg(worker_id="w", op_ids=[1, 2], errors=["", "EIO"])),
    (WORKER_TO_SERVER, wm.OpsDoneMsg(worker_id="w", op_ids=[3, 4], errors=["", "checksum"], corrupt_at=[-1, 2])),
    (SERVER_TO_WORKER, wm.ExecuteOpMsg(op_id=3, op_type=2, task_id=9)),
    (SERVER_TO_WORKER, wm.ExecuteOpMsg(op_id=4, op_type=0, task_id=9, task_ids=[9, 10, 12])),
    (SERVER_TO_WORKER, wm.HelloAcceptedMsg()),
    (SERVER_TO_WORKER, wm.StopWorkerMsg(reason="bye")),
]


def test_samples_cover_every_message_type() -> None:
    unions = [cm.ClientRequest, cm.ServerReplyMsg, wm.WorkerToServer, wm.ServerToWorkerMsg]
    every = {t for u in unions for t in typing.get_args(u)}
    assert every == {type(m) for _, m in SAMPLES}


@pytest.mark.parametrize(("codec", "msg"), SAMPLES, ids=[type(m).__name__ for _, m in SAMPLES])
def test_round_trip_with_array_frames(codec: Codec[typing.Any], msg: msgspec.Struct) -> None:
    tokens = np.arange(10, dtype=np.int64)
    frames = [bytes(f) for f in codec.encode(msg, [tokens, b"raw"])]
    back, arrays = codec.decode(frames)
    assert back == msg and type(back) is type(msg)
    assert frame_array(arrays[0], np.int64, "tokens").tolist() == tokens.tolist()
    assert bytes(arrays[1]) == b"raw"


def test_a_direction_rejects_the_other_directions_messages() -> None:
    frames = WORKER_TO_SERVER.encode(wm.OpsDoneMsg(worker_id="w", op_ids=[], errors=[]))
    with pytest.raises(ProtocolError):
        CLIENT_REQUESTS.decode([bytes(f) for f in frames])


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe", b"not msgpack at all", msgspec.msgpack.encode({"type": "Nope"}),
                                     msgspec.msgpack.encode({"type": "WaitMsg", "client_id": "x"})])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        CLIENT_REQUESTS.decode([garbage])
    with pytest.raises(ProtocolError):
        CLIENT_REQUESTS.decode([])


def test_frame_array_checks_sizes() -> None:
    with pytest.raises(ProtocolError, match="token_ids"):
        frame_array(memoryview(b"\x00" * 7), np.int64, "token_ids")


@pytest.mark.parametrize("mask", [None, [], [False] * 5, [True] * 5, [False, True, True, False],
                                  [True, False, True], [False, False, True]])
def test_masks_travel_as_ranges_and_come_back_equal(mask: list[bool] | None) -> None:
    arr = None if mask is None else np.array(mask, dtype=np.bool_)
    n, begin, end, frame = mask_to_range(arr)
    frames = [memoryview(frame.tobytes())] if frame is not None else []
    if arr is not None and arr.any() and (frame is None):
        assert end - begin == arr.sum(), "a contiguous mask needs no frame"
    back = range_to_mask(n, begin, end, frames)
    assert (back is None) if arr is None else (back is not None and back.tolist() == arr.tolist())
    assert not frames, "the frame was consumed"


def test_bad_ranges_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="outside"):
        range_to_mask(4, 2, 9, [])
    with pytest.raises(ProtocolError, match="missing"):
        range_to_mask(4, -1, -1, [])


def test_batch_frames_split_per_task_and_refuse_what_does_not_fit() -> None:
    msg = cm.GetAsyncBatchMsg(client_id=0, task_ids=[1, 2], has_masks=[False, True])
    toks = [np.arange(4, dtype=np.int64), np.arange(8, dtype=np.int64)]
    mask = np.ones(8, dtype=np.bool_)
    _, arrays = CLIENT_REQUESTS.decode(CLIENT_REQUESTS.encode(msg, [toks[0], toks[0] * 2, toks[1], toks[1] + 1, mask]))
    (t0, s0, m0), (t1, s1, m1) = batch_frames(msg, arrays)
    assert t0.tolist() == toks[0].tolist() and s0.tolist() == (toks[0] * 2).tolist() and m0 is None
    assert t1.tolist() == toks[1].tolist() and s1.tolist() == (toks[1] + 1).tolist() and m1 is not None and m1.all()
    with pytest.raises(ProtocolError, match="expected 5 array frames, got 4"):
        batch_frames(msg, arrays[:4])
    with pytest.raises(ProtocolError, match="one entry per task id"):
        batch_frames(cm.GetAsyncBatchMsg(client_id=0, task_ids=[1, 2], has_masks=[True]), arrays)
    assert batch_frames(cm.PutAsyncBatchMsg(client_id=0, task_ids=[]), []) == []

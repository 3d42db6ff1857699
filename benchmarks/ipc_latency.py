"""Round trip of one small message between two processes, by mechanism: the floor under a hop.

A small op through the stack is four hops between three processes (client -> server -> worker ->
server -> client). This measures one round trip (two hops) of a ~100-byte message between a parent
and a child process, so the hops' share of a small op can be read beside the mechanisms it could use:

* ``zmq``: DEALER -> ROUTER over ipc, both sides blocking in ``poll`` (what flexkv uses today); each
  send goes through the sender's and the receiver's ZeroMQ I/O threads;
* ``zmq-spin``: the same sockets, both sides polling without sleeping (``poll(0)`` in a loop): saves
  the receiving thread's wake-up, not the I/O threads';
* ``unix``: an AF_UNIX SOCK_SEQPACKET socket pair, both sides blocking in ``recv``: one kernel wake-up
  per hop, no I/O threads;
* ``unix-spin``: the same pair, both sides reading with MSG_DONTWAIT in a loop: no sleep at all;
* ``shm-spin``: a sequence number in shared memory that each side spins on: no system call, the floor
  of any cross-process signal on this machine.

Print p50/p99 in microseconds per round trip.

    python benchmarks/ipc_latency.py                 # 5,000 round trips per mechanism
    python benchmarks/ipc_latency.py --iters 20000 --idle-us 500
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np
import zmq

MSG = b"x" * 96


def _zmq_echo(address: str, spin: bool) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    while True:
        if spin:
            while not sock.poll(0):
                pass
        frames = sock.recv_multipart()
        if frames[1] == b"stop":
            break
        sock.send_multipart(frames)
    sock.close(0)
    ctx.term()


def _unix_echo(fd: int, spin: bool) -> None:
    sock = socket.socket(fileno=fd)
    while True:
        if spin:
            while True:
                try:
                    data = sock.recv(4096, socket.MSG_DONTWAIT)
                    break
                except BlockingIOError:
                    pass
        else:
            data = sock.recv(4096)
        if data == b"stop":
            break
        sock.send(data)
    sock.close()


def _shm_echo(name: str) -> None:
    shm = shared_memory.SharedMemory(name=name)
    seq = np.ndarray((2,), np.int64, buffer=shm.buf)
    last = 0
    while True:
        while seq[0] == last:
            pass
        last = int(seq[0])
        if last < 0:
            break
        seq[1] = last
    del seq
    shm.close()


def _time(rounds: int, idle_us: int, one: Callable[[], None]) -> np.ndarray:
    out = np.empty(rounds)
    for i in range(rounds):
        if idle_us:
            time.sleep(idle_us / 1e6)
        t0 = time.perf_counter_ns()
        one()
        out[i] = (time.perf_counter_ns() - t0) / 1e3
    return out


def run_zmq(rounds: int, idle_us: int, spin: bool) -> np.ndarray:
    tmp = tempfile.mkdtemp(prefix="flexkv-ipc-")
    address = f"ipc://{tmp}/echo.sock"
    child = mp.get_context("spawn").Process(target=_zmq_echo, args=(address, spin), daemon=True)
    child.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)

    def one() -> None:
        sock.send(MSG)
        if spin:
            while not sock.poll(0):
                pass
        sock.recv()

    try:
        _time(200, 0, one)  # connect and warm up
        return _time(rounds, idle_us, one)
    finally:
        sock.send(b"stop")
        child.join(10)
        sock.close(0)
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)


def run_unix(rounds: int, idle_us: int, spin: bool) -> np.ndarray:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = mp.get_context("fork").Process(target=_unix_echo, args=(theirs.fileno(), spin), daemon=True)
    child.start()
    theirs.close()

    def one() -> None:
        mine.send(MSG)
        if spin:
            while True:
                try:
                    mine.recv(4096, socket.MSG_DONTWAIT)
                    return
                except BlockingIOError:
                    pass
        mine.recv(4096)

    try:
        _time(200, 0, one)
        return _time(rounds, idle_us, one)
    finally:
        mine.send(b"stop")
        child.join(10)
        mine.close()


def run_shm(rounds: int, idle_us: int) -> np.ndarray:
    shm = shared_memory.SharedMemory(create=True, size=64)
    box = [np.ndarray((2,), np.int64, buffer=shm.buf)]  # dropped before close: no export may outlive the map
    box[0][:] = 0
    child = mp.get_context("fork").Process(target=_shm_echo, args=(shm.name,), daemon=True)
    child.start()
    n = [0]

    def one() -> None:
        seq = box[0]
        n[0] += 1
        seq[0] = n[0]
        while seq[1] != n[0]:
            pass

    try:
        _time(200, 0, one)
        return _time(rounds, idle_us, one)
    finally:
        box[0][0] = -1
        child.join(10)
        box.clear()
        shm.close()
        shm.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5000, help="timed round trips per mechanism")
    ap.add_argument("--idle-us", type=int, default=0, help="sleep before each round trip (0: back to back)")
    args = ap.parse_args()
    cases: dict[str, Callable[[], np.ndarray]] = {
        "zmq": lambda: run_zmq(args.iters, args.idle_us, False),
        "zmq-spin": lambda: run_zmq(args.iters, args.idle_us, True),
        "unix": lambda: run_unix(args.iters, args.idle_us, False),
        "unix-spin": lambda: run_unix(args.iters, args.idle_us, True),
        "shm-spin": lambda: run_shm(args.iters, args.idle_us),
    }
    print(f"# round trip of a {len(MSG)}-byte message between two processes, {args.iters} rounds, "
          f"idle {args.idle_us} us before each; {os.cpu_count()} CPUs")
    print(f"{'mechanism':<10} {'p50 us':>8} {'p99 us':>8}")
    for name, run in cases.items():
        t = run()
        print(f"{name:<10} {np.percentile(t, 50):8.1f} {np.percentile(t, 99):8.1f}", flush=True)


if __name__ == "__main__":
    main()

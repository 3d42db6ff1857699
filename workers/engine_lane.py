"""Engine-side lane (DESIGN §7b): one TP rank's device worker as a thread of the engine process.

For KV memory no other process can map (vLLM's CPU backend, SGLang's host pool, plain torch CPU
tensors), or CUDA tensors whose copies should run in the engine's own CUDA context: the server spawns
nothing for the rank; the engine runs the same :class:`DeviceWorker` here, which attaches the CPU pool,
says hello with the credential from the registration reply, and copies between the pool and the
engine's tensors with the C host copy engine, or the CUDA copy engine on streams of its own (the
engine's kernels and these copies then overlap; a worker process's context time-slices with the
engine's, and its copies stall while the engine computes). Closing the lane says goodbye,
and the server treats the rank as gone (its ops fail).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence

from flexkv.types import FlexKVError
from flexkv.workers.device_worker import DeviceWorker

log = logging.getLogger("flexkv.worker")


class EngineLane:
    """A running engine-side device worker. Create with :meth:`start`; :meth:`close` stops it."""

    def __init__(self, worker: DeviceWorker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"flexkv-lane-{worker.worker_id}", daemon=True)

    @classmethod
    def start(cls, lane_spec_json: str, addresses: Sequence[int], timeout_s: float, cuda: bool = False) -> EngineLane:
        """Start the worker thread for the tensors at ``addresses`` (kept alive by the caller until
        :meth:`close`; device addresses with ``cuda``) and return once the server accepted its hello.
        Raises FlexKVError naming why not."""
        spec = json.loads(lane_spec_json)
        spec["registration"]["engine_addresses"] = [int(a) for a in addresses]
        spec["registration"]["engine_cuda"] = cuda
        lane = cls(DeviceWorker(spec))
        lane._thread.start()
        deadline = time.monotonic() + timeout_s
        while not lane.worker.accepted.wait(0.02):
            why = lane._failure()
            if why is None and time.monotonic() > deadline:
                why = f"the server did not accept its hello within {timeout_s:.0f} s"
            if why is not None:
                lane.close()
                raise FlexKVError(f"engine-side lane {lane.worker.worker_id} could not start: {why}")
        return lane

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:  # reported by start() and alive
            self.error = e
            log.exception("engine-side lane %s failed", self.worker.worker_id)

    def _failure(self) -> str | None:
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        if self.worker.stop_reason:
            return self.worker.stop_reason
        if not self._thread.is_alive():
            return "its thread ended"
        return None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the worker (after the batch it runs) and wait for its thread. Idempotent."""
        self.worker.stop()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

"""The request trace file: JSON lines, rotated by size, the oldest dropped; and the telemetry histogram."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexkv.scheduler.telemetry import Histogram
from flexkv.scheduler.trace import TraceWriter

pytestmark = pytest.mark.timeout(30)


def _read(path: Path) -> list[int]:
    return [json.loads(line)["n"] for line in path.read_text().splitlines()] if path.exists() else []


def test_rotation_keeps_the_newest_lines_in_order(tmp_path: Path) -> None:
    path = tmp_path / "t" / "trace.jsonl"  # the folder is created
    line_bytes = len(json.dumps({"n": 100, "pad": "x" * 40}, separators=(",", ":"))) + 1
    w = TraceWriter(str(path), max_bytes=10 * line_bytes, backups=2)
    for n in range(100, 145):
        w.write({"n": n, "pad": "x" * 40})
    w.close()
    files = [path, Path(f"{path}.1"), Path(f"{path}.2")]
    assert not Path(f"{path}.3").exists()
    assert all(f.stat().st_size <= 10 * line_bytes for f in files)
    kept = _read(files[2]) + _read(files[1]) + _read(files[0])
    assert kept == list(range(145 - len(kept), 145)) and len(kept) == 25  # 2 full backups + 5 lines now
    assert w.num_lines == 45


def test_reopening_appends_and_no_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    w = TraceWriter(str(path), max_bytes=1 << 20, backups=0)
    w.write({"n": 1})
    w.close()
    w = TraceWriter(str(path), max_bytes=1 << 20, backups=0)
    w.write({"n": 2})
    w.flush()
    assert _read(path) == [1, 2]
    w.close()
    small = TraceWriter(str(path), max_bytes=len('{"n":3}\n'), backups=0)
    small.write({"n": 3})
    small.close()
    assert _read(path) == [3] and list(tmp_path.iterdir()) == [path]


def test_bad_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        TraceWriter(str(tmp_path / "x"), max_bytes=0, backups=1)


def test_histogram_counts_values_at_their_upper_bound() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.002, 0.1, 7.0):
        h.observe(v)
    assert h.counts == [2, 1, 1, 1] and h.count == 5 and h.sum == pytest.approx(7.1035)

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flexkv.shm import list_flexkv_segments


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every runtime test must leave /dev/shm as it found it."""
    before = set(list_flexkv_segments())
    yield
    leaked = set(list_flexkv_segments()) - before
    assert not leaked, f"shared-memory segments leaked: {sorted(leaked)}"

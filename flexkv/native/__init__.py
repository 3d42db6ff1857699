"""Thin wrappers over the C modules in ``c_src/``.

Each C file has exactly one wrapper module here; only that wrapper imports the raw cffi module
(``flexkv.native._<name>``) and it turns C error codes into Python exceptions. ``blockids`` (pure
Python) is the bad-block-id message both copy wrappers share.
"""

from __future__ import annotations

import importlib.util

URING_FIX = "install liburing (Debian/Ubuntu: liburing-dev) and run ./build.sh again"
URING_MISSING = ("flexkv's io_uring extension (flexkv.native._uring) is not built here, and the SSD tier "
                 f"needs it: {URING_FIX}")


def built(name: str) -> bool:
    """Whether the C module ``flexkv.native._<name>`` was built (found, not imported: a build may skip
    one, e.g. ``FLEXKV_SKIP_EXTENSIONS=uring`` where liburing is missing)."""
    return importlib.util.find_spec(f"flexkv.native._{name}") is not None

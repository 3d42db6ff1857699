"""The one error both copy backends (host :mod:`hostcopy`, CUDA :mod:`cudacopy`) raise for a bad block id.

Pure Python, no C module: both wrappers import it so an out-of-range engine or pool block id reads the
same whichever backend validated it, e.g. ``engine_ids[3] = 400 out of range [0, 16); nothing was copied``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from flexkv.types import InvalidRequest


def out_of_range(name: str, ids: npt.NDArray[np.int64], limit: int) -> InvalidRequest | None:
    """The error naming the first id of ``ids`` outside ``[0, limit)`` (index, value, range), or None if all fit."""
    bad = np.flatnonzero((ids < 0) | (ids >= limit))
    if not bad.size:
        return None
    i = int(bad[0])
    return InvalidRequest(f"{name}[{i}] = {int(ids[i])} out of range [0, {limit}); nothing was copied")

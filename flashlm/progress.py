"""A byte progress bar (tqdm on stderr) that is a no-op when disabled."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def byte_progress(total: int, desc: str, *, enabled: bool = True) -> Iterator[Callable[[int], None] | None]:
    """Yield ``update(n_bytes)`` for a tqdm bar, or None when disabled."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False) as bar:
        yield bar.update

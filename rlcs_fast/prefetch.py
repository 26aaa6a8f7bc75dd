"""Host work one item ahead of the device: a worker thread prepares item k+1 while the caller computes k.

Used for packing micro-batches (pack + pin, so the device never waits on the host between micro-batches)
and for SFT's data (decode, resize and process step k+1's rows while step k trains). The results come
back in order and are the same as a plain loop's: only the timing changes. An exception in the worker is
raised in the caller when it reaches that item.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(fn: Callable[[T], R], items: Iterable[T], *, ahead: int = 1) -> Iterator[R]:
    """``fn(item)`` for each item, in order, with up to ``ahead`` items computed in advance on one worker
    thread (torch ops release the GIL, so packing and image processing overlap the caller's compute)."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlcs-prefetch") as pool:
        pending: deque[Future] = deque()

        def submit_next() -> None:
            for item in it:
                pending.append(pool.submit(fn, item))
                return

        for _ in range(ahead + 1):
            submit_next()
        try:
            while pending:
                result = pending.popleft().result()
                submit_next()
                yield result
        finally:
            for future in pending:
                future.cancel()

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


class DeferredSkips:
    """Records skipped rows on the worker; ``replay`` counts them in the run's ``SkipCounter`` when the
    caller consumes their step, so a checkpoint holds exactly the skips of the steps it has trained (the
    resume rules of a plain loop) and the one warning per kind comes from the caller's counter."""

    def __init__(self) -> None:
        self.entries: list[tuple] = []

    def add(self, kind: str, detail: str = "", where: str = "", key: object = None) -> None:
        self.entries.append((kind, detail, where, key))

    def replay(self, counter) -> None:
        for kind, detail, where, key in self.entries:
            counter.add(kind, detail, where, key=key)


def prefetched_steps(load: Callable[[int, DeferredSkips], R], steps: Iterable[int],
                     skips) -> Iterator[tuple[int, R]]:
    """(step, ``load(step, recorder)``) for each step, step k+1 loaded on the worker while step k computes;
    the skips a step's load records reach ``skips`` when that step is yielded."""

    def run(step: int):
        recorder = DeferredSkips()
        return step, load(step, recorder), recorder

    for step, batch, recorder in prefetched(run, steps):
        recorder.replay(skips)
        yield step, batch

"""An ordered parallel map over spawned processes, for the CPU tools (sharder, synthetic videos)."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator


def map_in_order(function: Callable, items: Iterable, workers: int) -> Iterator:
    """function(item) for each item, in order, over `workers` spawned processes (this process for 1),
    with at most 2 x workers items in flight so memory stays bounded however long one item takes.
    A worker that dies (out of memory, a crash in a decoder) raises BrokenProcessPool, not a hang."""
    if workers == 1:
        yield from map(function, items)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        in_flight: collections.deque = collections.deque()
        try:
            for item in items:
                in_flight.append(pool.submit(function, item))
                if len(in_flight) >= 2 * workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:  # on an error or an early stop, only the items already being worked on are finished
            for future in in_flight:
                future.cancel()


def _init_worker(parent_pid: int) -> None:
    # Ctrl-C is the parent's to handle (it terminates the pool). A worker whose parent was killed
    # (kill -9) would wait for tasks forever, since its siblings keep the task pipe open: watch for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1)
    os._exit(1)

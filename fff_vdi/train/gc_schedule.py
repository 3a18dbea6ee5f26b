"""Python's garbage collector on a schedule that every rank shares.

Automatic collection starts whenever allocations cross a threshold, at a different moment on each
rank. In a process holding compiled graphs and a large model a collection can take long enough to
matter, and under FSDP every other rank waits for it at the next collective: with N ranks a step
pays for the pauses of all N. torchtitan and Megatron-LM therefore turn automatic collection off and
collect on a fixed step count, the same step on every rank. So does this: generation 1 (the young
objects, cheap) every `every` steps, and a full collection at points where the ranks stop together
anyway (checkpoints), so that reference cycles that reached the oldest generation are freed too.

`every` = 0 leaves Python's automatic collection as it is.
"""

from __future__ import annotations

import gc


class ScheduledGC:
    """`start()` (or `with ScheduledGC(every) as schedule:`), `tick()` after each step, `stop()`."""

    def __init__(self, every: int):
        if every < 0:
            raise ValueError(f"every={every}: use 0 (automatic collection) or a number of steps")
        self.every = every
        self.steps = 0
        self._was_enabled = False

    def start(self) -> "ScheduledGC":
        if self.every > 0:
            self._was_enabled = gc.isenabled()
            gc.collect()  # start from a clean heap: what the build left is not carried into the loop
            gc.disable()
        return self

    def tick(self) -> bool:
        """One step done; collects generation 1 every `every` steps. Returns whether it collected."""
        self.steps += 1
        if self.every > 0 and self.steps % self.every == 0:
            gc.collect(1)
            return True
        return False

    def collect_all(self) -> None:
        """A full collection, for points where every rank waits anyway (a checkpoint)."""
        if self.every > 0:
            gc.collect()

    def stop(self) -> None:
        """Automatic collection back as it was (idempotent)."""
        if self.every > 0 and self._was_enabled:
            gc.enable()
            self._was_enabled = False

    def __enter__(self) -> "ScheduledGC":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

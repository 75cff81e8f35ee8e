"""A bounded queue and a dynamic batcher: one worker thread runs the model, batching what waits.

The HTTP handlers only enqueue and wait; every model call happens on the worker thread, one batch at
a time, so the event loop stays free to answer health checks, metrics and refusals while a batch
runs. The worker takes the oldest waiting job, then up to ``max_batch`` images' worth of jobs with
the same key (same shape, steps, scheduler, guidance), waiting at most ``max_wait_ms`` after the
oldest job arrived for more to come. Jobs of another key keep their place in the queue.

A job's future is cancelled when its caller gives up (timeout, disconnect); the worker skips cancelled
jobs, so a timed-out request does not cost model time unless its batch had already started.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs already."""


@dataclass
class Job:
    item: Any
    key: Hashable
    size: int  # images: what counts against max_batch
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """``run(items) -> results`` (one result per item, same order) is called on the worker thread."""

    def __init__(self, run: Callable[[list], list], max_batch: int = 4, max_wait_ms: float = 10.0, queue_size: int = 16,
                 on_batch: Callable[[int, int, float], None] | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be at least 1, max_wait_ms at least 0")
        self.run, self.max_batch, self.max_wait, self.queue_size = run, max_batch, max_wait_ms / 1000, queue_size
        self.on_batch = on_batch  # (requests, images, seconds) after each batch, for metrics
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.busy = False
        self._thread = threading.Thread(target=self._loop, name="deploykit-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the batch being run)."""
        with self._cond:
            return sum(1 for j in self._pending if not j.future.cancelled())

    def submit(self, item: Any, key: Hashable, size: int = 1) -> Future:
        job = Job(item, key, size)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._pending = [j for j in self._pending if not j.future.cancelled()]
            if len(self._pending) >= self.queue_size:
                raise QueueFull
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        """The next batch; None when stopping. Called with the lock held."""
        while True:
            self._pending = [j for j in self._pending if not j.future.cancelled()]
            if self._stopping:
                return None
            if not self._pending:
                self._cond.wait()
                continue
            first = self._pending[0]
            batch = self._same_key(first)
            images = sum(j.size for j in batch)
            deadline = first.arrived + self.max_wait
            now = time.monotonic()
            if images >= self.max_batch or now >= deadline:
                for j in batch:
                    self._pending.remove(j)
                return batch
            self._cond.wait(deadline - now)  # more jobs of this key may arrive

    def _same_key(self, first: Job) -> list[Job]:
        batch, images = [first], first.size
        for job in self._pending[1:]:
            if job.key == first.key and images + job.size <= self.max_batch:
                batch.append(job)
                images += job.size
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
            if batch is None:
                return
            # a job cancelled between taking and now is dropped; the others are marked running
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.busy = True
            started = time.perf_counter()
            try:
                results = self.run([j.item for j in batch])
                for job, result in zip(batch, results):
                    job.future.set_result(result)
            except Exception as e:  # a failed batch fails its requests, never the worker
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self.busy = False
            if self.on_batch is not None:
                self.on_batch(len(batch), sum(j.size for j in batch), time.perf_counter() - started)

"""A bounded queue and a dynamic batcher: one worker thread runs the model, batching what waits.

The HTTP handlers only enqueue and wait; every model call happens on the worker thread, one batch at
a time, so the event loop stays free to answer health checks, metrics and refusals while a batch
runs. The worker takes the oldest waiting job, then up to ``max_batch`` images' worth of jobs with
the same key (same shape, steps, scheduler, guidance), waiting at most ``max_wait_ms`` after the
oldest job arrived for more to come. Jobs of another key keep their place in the queue.

A job's future is cancelled when its caller gives up (timeout, disconnect), and a job may carry a
deadline of its own: the worker drops cancelled jobs and jobs past their deadline (their future raises
:class:`Expired`) without running them, whether or not the caller got round to cancelling, so a
request that timed out while queued never costs model time nor delays the jobs behind it. A batch
already running when its callers give up runs to its end: the model has no way to stop mid-batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs already."""


class Expired(TimeoutError):
    """The job's deadline passed before the worker got to it; it was not run."""


@dataclass
class Job:
    item: Any
    key: Hashable
    size: int  # images: what counts against max_batch
    deadline: float | None = None  # time.monotonic() past which the job is not started
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)

    def expire_if_late(self, now: float) -> bool:
        """Fail the job's future with Expired if its deadline has passed; whether it is now finished."""
        if self.deadline is not None and now >= self.deadline and not self.future.done():
            try:
                self.future.set_exception(Expired(f"not started within its deadline ({now - self.arrived:.1f} s queued)"))
            except InvalidStateError:  # cancelled by its caller in the meantime
                pass
        return self.future.done()


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
            return sum(1 for j in self._pending if not j.future.done())

    def submit(self, item: Any, key: Hashable, size: int = 1, deadline: float | None = None) -> Future:
        """Queue ``item``; ``deadline`` (``time.monotonic()`` seconds) is when it is no longer worth starting."""
        job = Job(item, key, size, deadline)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._drop_finished()
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

    def _drop_finished(self) -> None:
        """Forget jobs cancelled by their callers or past their deadline. Called with the lock held."""
        now = time.monotonic()
        self._pending = [j for j in self._pending if not j.expire_if_late(now)]

    def _take(self) -> list[Job] | None:
        """The next batch; None when stopping. Called with the lock held."""
        while True:
            self._drop_finished()
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
            # a job cancelled or expired between taking and now is dropped; the others are marked running
            now = time.monotonic()
            batch = [j for j in batch if not j.expire_if_late(now) and j.future.set_running_or_notify_cancel()]
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

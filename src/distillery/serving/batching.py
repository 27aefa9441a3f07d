"""Dynamic batching with a bounded queue and request deadlines, shared by the predictors.

Requests are queued with a compatibility key (e.g. steps and guidance for text-to-image). One worker takes the
oldest request, waits up to `window_s` for more with the same key, and runs up to `max_items` items in one model
call on its own thread; the results are split back to each request. Clients that got their answers from one call
come back together but not at once (each reads its answer and sends again, on cores it shares with the server):
a fixed window then splits them into a full call and a straggler call that costs nearly as much. So while fewer
items wait than the last call held, the worker waits longer, up to `patience` times the average model call; with
one client at a time that call held one item and nothing waits beyond `window_s`. Beyond `max_queue` waiting requests a new one
is refused at once (`Overloaded`: 503 with Retry-After) instead of waiting behind an ever longer queue. A request
whose deadline passes is answered `DeadlineExceeded` and, if it has not started, never runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from kserve.errors import InvalidInput, ServerNotReady

log = logging.getLogger(__name__)


class Overloaded(ServerNotReady):
    """The queue is full: answered 503 with Retry-After (gRPC UNAVAILABLE)."""

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServerNotReady):
    """The request's deadline passed before its result was ready: answered 504 (gRPC UNAVAILABLE)."""


class RequestFailed(ServerNotReady):
    """This request could not be served (e.g. a store it needs failed) but the model is fine: 503, still ready."""


class ModelFailed(ServerNotReady):
    """The model raised something other than a client error; the predictor turns not-ready (503)."""


@dataclass
class _Entry:
    key: Hashable
    items: list
    deadline: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """`run(key, items) -> results` (one result per item, in order) called on one worker thread.

    `on_fatal(exc)` is called when `run` raises anything but `InvalidInput`; every request of that batch is
    answered `ModelFailed`."""

    def __init__(self, run: Callable[[Hashable, list], Sequence], *, max_items: int, window_s: float = 0.01,
                 max_queue: int = 32, patience: float = 0.5,
                 on_fatal: Callable[[BaseException], None] | None = None):
        if max_items < 1 or max_queue < 1 or window_s < 0 or patience < 0:
            raise ValueError(f"max_items and max_queue must be >= 1, window_s and patience >= 0, got {max_items}, "
                             f"{max_queue}, {window_s}, {patience}")
        self.run, self.max_items, self.window_s, self.max_queue = run, max_items, window_s, max_queue
        self.patience = patience
        self.on_fatal = on_fatal
        self._pending: deque[_Entry] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._batch_s = 0.0  # moving average of one model call, for Retry-After and the wait for stragglers
        self._last_items = 1  # items in the last call: as many are expected back from a closed loop of clients
        self.batches = self.items = 0  # counters: how much merging happened

    def retry_after_s(self) -> int:
        waiting = sum(len(e.items) for e in self._pending)
        return max(1, math.ceil((waiting / self.max_items + 1) * self._batch_s))

    async def submit(self, key: Hashable, items: list, deadline: float | None = None) -> list:
        """Queue `items` (at most max_items) under `key`; returns their results. `deadline` is time.monotonic()."""
        if not 1 <= len(items) <= self.max_items:
            raise InvalidInput(f"{len(items)} items in one request; between 1 and {self.max_items} allowed")
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline has already passed")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"{len(self._pending)} requests are waiting (the limit): try again later",
                             self.retry_after_s())
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work())
        entry = _Entry(key, list(items), deadline, loop.create_future())
        self._pending.append(entry)
        self._arrived.set()
        timeout = None if deadline is None else deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout)
        except asyncio.TimeoutError:
            entry.future.cancel()  # still queued: it is skipped; already running: its result is dropped
            raise DeadlineExceeded(f"no result within the request's deadline ({timeout:.3f} s)") from None

    def _take(self) -> list[_Entry]:
        """The oldest live entry and the queued entries with its key that fit in one call."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        if not self._pending:
            return []
        key, batch, size = self._pending[0].key, [], 0
        for e in list(self._pending):
            if e.future.done():
                self._pending.remove(e)
            elif e.key == key and size + len(e.items) <= self.max_items:
                batch.append(e)
                size += len(e.items)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take()
            if not batch:
                continue
            # Wait out the window for more compatible requests unless the call is already full; longer while
            # fewer items wait than the last call held (its clients are coming back).
            short = batch[0].enqueued + self.window_s
            long = batch[0].enqueued + max(self.window_s, self.patience * self._batch_s)
            while (size := sum(len(e.items) for e in batch)) < self.max_items:
                left = (long if size < self._last_items else short) - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    pass
                batch = self._take()
            batch = [e for e in batch if not e.future.done()]
            for e in batch:
                self._pending.remove(e)
            if not batch:
                continue
            items = [x for e in batch for x in e.items]
            t = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self.run, batch[0].key, items)
                if len(results) != len(items):
                    raise RuntimeError(f"the batch call returned {len(results)} results for {len(items)} items")
            except (InvalidInput, RequestFailed) as exc:
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - anything else means the model itself is broken
                log.exception("model call failed; the predictor is no longer ready")
                if self.on_fatal:
                    self.on_fatal(exc)
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(ModelFailed(f"the model failed: {type(exc).__name__}: {exc}"))
                continue
            took = time.monotonic() - t
            self._batch_s = took if not self.batches else 0.8 * self._batch_s + 0.2 * took
            self.batches, self.items = self.batches + 1, self.items + len(items)
            self._last_items = min(len(items), self.max_items)
            start = 0
            for e in batch:
                if not e.future.done():
                    e.future.set_result(list(results[start:start + len(e.items)]))
                start += len(e.items)


def deadline_from(headers: dict | None, default_s: float | None = None) -> float | None:
    """A request's deadline (time.monotonic()) from its `x-request-timeout` header (seconds; REST header or gRPC
    metadata), else `default_s` from now. A malformed value is a client error."""
    value = None
    for k, v in (headers or {}).items():
        if k.lower() == "x-request-timeout":
            value = v
    if value is None:
        return None if default_s is None else time.monotonic() + default_s
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"header x-request-timeout must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInput(f"header x-request-timeout must be a positive number of seconds, got {value!r}")
    return time.monotonic() + seconds


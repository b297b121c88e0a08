"""Micro-batching: concurrent requests share one model call.

One consumer task takes the first waiting request, then whatever else is already queued (and,
with ``max_wait_ms > 0``, whatever arrives within that window) up to ``max_batch_size``
samples, groups it by (version, patch mode), and runs each group as one forward pass on a single
model thread. At low load nothing waits (the first request runs at once); under load requests
queue while the model is busy and the next call takes them together.

Results equal unbatched ones: every operation in the models is per sample (AtPatch detects and
patches per sample too), so a sample's answer does not depend on its batch mates; the only
difference is float32 rounding from the GEMM kernel chosen for a given batch size (≤ 1e-6 in
probabilities), never a different label or flagged column set beyond that rounding.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("repair.server")


@dataclass
class _Item:
    served: Any
    mode: str
    x: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Timing:
    queue_seconds: float
    model_seconds: float
    batch_size: int


class MicroBatcher:
    def __init__(self, runner: Callable[[Any, str, Any], Any], max_batch_size: int = 32,
                 max_wait_ms: float = 0.0, on_batch: Callable[[int], None] | None = None,
                 inline: bool = False, on_idle: Callable[[], Any] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max batch size must be ≥ 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max wait must be ≥ 0 ms, got {max_wait_ms}")
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        # on_idle: upkeep on the model thread once a batch's responses are out and nothing
        # waits (the server refreshes its plain forward timings); a request arriving meanwhile
        # waits for it.
        self.on_idle = on_idle
        # inline: run the model on the event-loop thread. On a CPU that saves two thread
        # hand-offs per batch (each a scheduler wake-up); requests arriving meanwhile wait in
        # the socket buffers and form the next batch. On a GPU the loop should not block.
        self.inline = inline
        # One model thread: AtPatch hooks are per model instance and not re-entrant.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Item | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Drain: everything queued before the stop still runs."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, served, mode: str, x) -> tuple[Any, Timing]:
        """Queue ``x`` (a batch of this request's samples); returns its slice of the result."""
        if self._task is None:
            raise RuntimeError("batcher is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(served, mode, x, future))
        return await future

    async def _collect(self, first: _Item) -> list[_Item]:
        items, n = [first], len(first.x)
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if time.perf_counter() >= deadline:
                    break
                await asyncio.sleep(min(0.0005, max(0.0, deadline - time.perf_counter())))
                continue
            if nxt is None:  # stop requested: run what we have, then stop
                self._queue.put_nowait(None)
                break
            if n + len(nxt.x) > self.max_batch_size:
                self._carry = nxt
                break
            items.append(nxt)
            n += len(nxt.x)
        return items

    async def _loop(self) -> None:
        while True:
            if self._carry is not None:
                first, self._carry = self._carry, None
            else:
                first = await self._queue.get()
                if first is None:
                    return
            items = await self._collect(first)
            groups: dict[tuple[int, str], list[_Item]] = {}
            for item in items:
                groups.setdefault((id(item.served), item.mode), []).append(item)
            for group in groups.values():
                await self._run(group)
            await self._idle()

    async def _idle(self) -> None:
        if self.on_idle is None or self._carry is not None or not self._queue.empty():
            return
        await asyncio.sleep(0)  # the batch's handlers write their responses first
        if not self._queue.empty():
            return
        try:
            if self.inline:
                self.on_idle()
            else:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.on_idle)
        except Exception as err:  # noqa: BLE001 - upkeep must never stop the batcher
            log.warning("idle upkeep failed: %s", err)

    async def _run(self, group: list[_Item]) -> None:
        import torch

        loop = asyncio.get_running_loop()
        x = group[0].x if len(group) == 1 else torch.cat([item.x for item in group])
        started = time.perf_counter()
        try:
            if self.inline:
                result = self.runner(group[0].served, group[0].mode, x)
            else:
                result = await loop.run_in_executor(self._executor, self.runner, group[0].served,
                                                    group[0].mode, x)
        except Exception as err:  # every request of the batch gets the error
            for item in group:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        model_seconds = time.perf_counter() - started
        if self.on_batch is not None:
            self.on_batch(len(x))
        offset = 0
        for item in group:
            n = len(item.x)
            if not item.future.done():  # the client may have gone away
                timing = Timing(started - item.enqueued, model_seconds, len(x))
                item.future.set_result((result.slice(offset, offset + n), timing))
            offset += n

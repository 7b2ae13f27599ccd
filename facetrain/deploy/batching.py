"""Batching across callers: the images of concurrent requests embedded together, on one model thread.

Requests that arrive within `window_s` of each other (or while a batch runs) share one model call, up to
`max_batch` images, so the service's throughput grows with the number of concurrent callers.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class Batcher:
    """Embeds the images of concurrent requests together, on one model thread.

    The loop takes the first waiting request and everything queued behind it; while the batch is smaller
    than `max_batch` images it waits `window_s` once for more callers. Requests that arrive while a batch
    runs are queued and go in the next one, so under load the batches fill without waiting."""

    def __init__(self, run, max_batch: int, window_s: float):
        self.run, self.max_batch, self.window_s = run, max_batch, window_s
        self.batches = self.images = self.largest = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facetrain-model")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def embed(self, arrays: list[np.ndarray]) -> np.ndarray:
        """(len(arrays), D) embeddings of one request's prepared images."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((arrays, future))
        return await future

    def _drain(self, items: list, n: int, carry: list) -> int:
        while n < self.max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            if n + len(item[0]) > self.max_batch:  # would overflow: first in the next batch
                carry.append(item)
                break
            items.append(item)
            n += len(item[0])
        return n

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: list = []
        while True:
            items = [carry.pop() if carry else await self._queue.get()]
            n = self._drain(items, len(items[0][0]), carry)
            if n < self.max_batch and not carry and self.window_s > 0:
                await asyncio.sleep(self.window_s)
                n = self._drain(items, n, carry)
            live = [(arrays, future) for arrays, future in items if not future.done()]  # callers still there
            if not live:
                continue
            batch = np.stack([a for arrays, _ in live for a in arrays])
            try:
                emb = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as err:  # the model failed: every caller of this batch gets the error
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches, self.images, self.largest = self.batches + 1, self.images + n, max(self.largest, n)
            start = 0
            for arrays, future in live:
                if not future.done():
                    future.set_result(emb[start:start + len(arrays)])
                start += len(arrays)

"""Dynamic batching: images from requests that arrive within a few milliseconds go through the model as one batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class _Waiting:
    images: np.ndarray
    answer: asyncio.Future


class DynamicBatcher:
    """``await batcher.predict(images)``: the model's probabilities for ``images``, predicted with whatever
    other requests' images arrive within ``max_delay`` seconds, up to ``max_batch`` images a call. A
    request reading its body or decoding images (:meth:`arriving`) is waited for; nothing else is.

    One thread calls the model, so a model call never waits for a decode and requests never wait for
    each other's Python work; ``on_batch(size)`` hears each call's batch size (the metrics' histogram).
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 32,
        max_delay: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._predict = predict
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._on_batch = on_batch or (lambda size: None)
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._worker: asyncio.Task | None = None
        self._held: _Waiting | None = None
        self._arriving = 0
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve_batches())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._model_thread.shutdown(wait=False)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's reading and decoding: while one is on its way, a batch waits for it (up to
        ``max_delay``); with none on the way, a batch goes at once, so a lone client never waits the delay."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def on_model_thread(self, work: Callable[[], T]) -> T:
        """``work()`` on the model's thread, between batches (a heatmap's gradients, say)."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, work)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        if self._queue is None:
            raise RuntimeError("the batcher has not been started")
        answer = asyncio.get_running_loop().create_future()
        await self._queue.put(_Waiting(images, answer))
        return await answer

    async def _serve_batches(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [self._held if self._held is not None else await self._queue.get()]
            self._held = None
            size = len(batch[0].images)
            deadline = loop.time() + self.max_delay
            while size < self.max_batch:
                # What is already queued joins at once; then wait out the rest of the delay for more.
                try:
                    waiting = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0 or not self._arriving:
                        break
                    try:
                        waiting = await asyncio.wait_for(self._queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if size + len(waiting.images) > self.max_batch:
                    self._held = waiting  # too big to join: it leads the next batch instead
                    break
                batch.append(waiting)
                size += len(waiting.images)
            await self._run(batch, loop)

    async def _run(self, batch: list[_Waiting], loop: asyncio.AbstractEventLoop) -> None:
        images = np.concatenate([waiting.images for waiting in batch])
        self._on_batch(len(images))
        try:
            probabilities = await loop.run_in_executor(self._model_thread, self._predict, images)
        except Exception as error:  # noqa: BLE001 - every waiting request hears of the model's failure
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)
            return
        start = 0
        for waiting in batch:
            end = start + len(waiting.images)
            if not waiting.answer.done():  # a client that went away has cancelled its answer
                waiting.answer.set_result(probabilities[start:end])
            start = end

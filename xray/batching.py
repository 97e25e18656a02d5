"""The micro-batcher: one worker thread owns the model; callers queue pixels and wait on futures.

Concurrent requests each queue their model-size uint8 images; the worker takes what is waiting
(up to `max_batch` images), scores them in one forward pass and hands every request its own slice
of the result. While a forward pass runs, new requests gather in the queue, so under load batches
form by themselves; when the last batch held several requests the worker also waits up to
`max_wait_ms` for company, and after a lone request it does not (one client pays no wait). One
worker means one forward pass at a time, so torch's threads never compete with another forward
pass, and the batch grows with load instead of the latency. The queue is bounded: a full queue
refuses new work (`QueueFullError`) rather than letting latency grow without end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

Score = Callable[[np.ndarray], np.ndarray]
"""N x H x W uint8 pixels -> N scores; called only from the worker thread."""


class QueueFullError(RuntimeError):
    """The batcher already holds as many images as it may; the caller should retry later."""


@dataclass(frozen=True)
class BatchOptions:
    """How large a batch may grow, how long the worker waits for it, and how many images may wait."""

    max_batch: int = 16
    max_wait_ms: float = 2.0
    max_queued: int = 128
    idle_exit_s: float = 30.0


@dataclass
class _Request:
    pixels: np.ndarray
    future: Future


class MicroBatcher:
    """A bounded queue of pixel arrays and one worker thread that scores them in batches.

    The worker starts on the first `submit` and exits after `idle_exit_s` without work, so a
    batcher whose model was swapped out frees its thread (and model) once its last request is done.
    """

    def __init__(self, score: Score, options: BatchOptions = BatchOptions(), name: str = "xray-batcher") -> None:
        self.score = score
        self.options = options
        self.name = name
        self._pending: deque[_Request] = deque()
        self._queued_images = 0
        self._condition = threading.Condition()
        self._worker: threading.Thread | None = None
        self._busy = False  # the last batch held more than one request: others are likely on their way

    @property
    def queued_images(self) -> int:
        """Images waiting for the worker now."""
        return self._queued_images

    def submit(self, pixels: np.ndarray, block: bool = False) -> Future:
        """Queue N x H x W (or H x W) uint8 pixels; the future holds their N scores.

        A full queue raises QueueFullError, or with `block` waits for room (batch callers such as
        the CLI, which would rather wait than fail). A request larger than the queue is always taken
        when the queue is empty, so a big synchronous batch cannot wait forever.
        """
        if pixels.ndim == 2:
            pixels = pixels[None]
        count = len(pixels)
        future: Future = Future()
        if count == 0:
            future.set_result(np.empty(0))
            return future
        with self._condition:
            while self._queued_images and self._queued_images + count > self.options.max_queued:
                if not block:
                    raise QueueFullError(f"{self._queued_images} images already wait for the model "
                                         f"(at most {self.options.max_queued})")  # fmt: skip
                self._condition.wait()
            self._pending.append(_Request(pixels, future))
            self._queued_images += count
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._worker.start()
            self._condition.notify_all()
        return future

    def score_now(self, pixels: np.ndarray) -> np.ndarray:
        """Scores for N x H x W pixels through the queue, waiting as long as it takes (synchronous callers)."""
        return self.submit(pixels, block=True).result()

    def _take_batch(self) -> list[_Request] | None:
        """Wait for work, then gather up to max_batch images or until max_wait_ms passed; None when idle too long."""
        options = self.options
        with self._condition:
            idle_deadline = time.monotonic() + options.idle_exit_s
            while not self._pending:
                remaining = idle_deadline - time.monotonic()
                if remaining <= 0:
                    self._worker = None
                    return None
                self._condition.wait(remaining)
            deadline = time.monotonic() + (options.max_wait_ms / 1000.0 if self._busy or len(self._pending) > 1 else 0)
            while self._queued_images < options.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            taken, images = [], 0
            while self._pending and (not taken or images + len(self._pending[0].pixels) <= options.max_batch):
                request = self._pending.popleft()
                taken.append(request)
                images += len(request.pixels)
            self._queued_images -= images
            self._busy = len(taken) > 1
            self._condition.notify_all()
            return taken

    def _run(self) -> None:
        """The worker loop: the only thread that calls `score`."""
        while (batch := self._take_batch()) is not None:
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                pixels = live[0].pixels if len(live) == 1 else np.concatenate([request.pixels for request in live])
                scores = self.score(pixels)
            except Exception as error:  # every waiting caller learns of the failure; the worker lives on
                logger.exception("scoring a batch of %d requests failed", len(live))
                for request in live:
                    request.future.set_exception(error)
                continue
            start = 0
            for request in live:
                request.future.set_result(scores[start : start + len(request.pixels)])
                start += len(request.pixels)

"""The micro-batcher: concurrent requests share forward passes, each gets its own answer, a full queue sheds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from xray.batching import BatchOptions, MicroBatcher, QueueFullError


class RecordingScore:
    """A score function that records each batch it gets and which thread ran it; optionally blocks."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.gate = gate

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(len(pixels))
        self.threads.add(threading.current_thread().name)
        return pixels.reshape(len(pixels), -1)[:, 0].astype(float)


def image(value: int) -> np.ndarray:
    return np.full((4, 4), value, dtype=np.uint8)


def wait_until_taken(batcher: MicroBatcher) -> None:
    """Until the worker has taken everything queued (it may then block inside the score function)."""
    deadline = time.monotonic() + 5
    while batcher.queued_images and time.monotonic() < deadline:
        time.sleep(0.005)
    assert batcher.queued_images == 0


def test_concurrent_requests_share_one_forward_pass_and_each_gets_its_own_result():
    gate = threading.Event()
    score = RecordingScore(gate)
    batcher = MicroBatcher(score, BatchOptions(max_batch=16, max_wait_ms=50))
    first = batcher.submit(image(0))
    wait_until_taken(batcher)  # the worker blocks on the gate with it
    futures = [batcher.submit(image(value)) for value in range(1, 21)]
    gate.set()
    assert first.result(5).tolist() == [0.0]
    assert [future.result(5).tolist() for future in futures] == [[float(value)] for value in range(1, 21)]
    assert score.batches == [1, 16, 4]  # 20 waiting requests: a full batch of 16, then the rest
    assert len(score.threads) == 1  # one worker owns the model


def test_a_lone_request_waits_at_most_the_batch_wait():
    batcher = MicroBatcher(RecordingScore(), BatchOptions(max_batch=16, max_wait_ms=5))
    batcher.submit(image(1)).result(5)  # the worker has started
    started = time.perf_counter()
    assert batcher.submit(image(7)).result(5).tolist() == [7.0]
    assert time.perf_counter() - started < 0.5


def test_a_full_queue_refuses_instead_of_growing():
    gate = threading.Event()
    batcher = MicroBatcher(RecordingScore(gate), BatchOptions(max_batch=2, max_wait_ms=0, max_queued=3))
    batcher.submit(image(0))
    wait_until_taken(batcher)  # the worker now blocks on the gate
    waiting = [batcher.submit(image(value)) for value in (1, 2, 3)]
    with pytest.raises(QueueFullError, match="3 images already wait"):
        batcher.submit(image(4))
    gate.set()
    assert [future.result(5).tolist() for future in waiting] == [[1.0], [2.0], [3.0]]
    assert batcher.submit(image(5)).result(5).tolist() == [5.0]  # room again once drained


def test_blocking_callers_wait_for_room_and_large_requests_are_split_by_the_scorer():
    batcher = MicroBatcher(RecordingScore(), BatchOptions(max_batch=4, max_queued=4))
    many = np.stack([image(value) for value in range(10)])
    assert batcher.score_now(many).tolist() == [float(value) for value in range(10)]


def test_a_failing_batch_fails_its_requests_and_the_worker_carries_on():
    calls = []

    def score(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("model broke")
        return np.zeros(len(pixels))

    batcher = MicroBatcher(score, BatchOptions(max_wait_ms=0))
    with pytest.raises(RuntimeError, match="model broke"):
        batcher.submit(image(1)).result(5)
    assert batcher.submit(image(2)).result(5).tolist() == [0.0]


def test_an_idle_worker_exits_and_a_new_request_starts_another():
    batcher = MicroBatcher(RecordingScore(), BatchOptions(idle_exit_s=0.05))
    assert batcher.submit(image(1)).result(5).tolist() == [1.0]
    deadline = time.monotonic() + 5
    while batcher._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher._worker is None
    assert batcher.submit(image(2)).result(5).tolist() == [2.0]

"""Every instance follows production: poll `production.json`, hot-swap the model when its version changes.

`ProductionFollower` runs beside `ModelHolder` in a background thread. Each check is one small
GET of the pointer; an unchanged ETag ends it there. A new version is downloaded (complete, or
not at all), loaded and swapped in; the cache keeps the current and the previous package. When
storage cannot be reached the follower retries with backoff (1 s, 2 s, 4 s ... up to the poll
interval), so an instance started while storage was down becomes ready once it is back.

`problem` says, in words fit for anonymous callers (no paths, URIs or credentials), why no model
is in service; the server log has the full error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from xray.config import ConfigError
from xray.inference import ModelHolder, Predictor
from xray.package import PRODUCTION_POINTER, PackageError, fetch_package, parse_pointer, prune_cache
from xray.storage import Storage, StorageError, StorageNotFoundError

logger = logging.getLogger(__name__)

NOT_PROMOTED = "no model has been promoted yet"
STARTING = "the production model is being loaded"
FIRST_RETRY_SECONDS = 1.0


def describe_problem(error: Exception) -> str:
    """Why no model could be loaded, naming the problem without internal paths or credentials."""
    if isinstance(error, StorageNotFoundError):
        return NOT_PROMOTED
    if isinstance(error, StorageError):
        return "model storage cannot be reached; retrying in the background"
    if isinstance(error, PackageError) and "refusing model version" in str(error):
        return f"{PRODUCTION_POINTER} names an invalid model version; it was refused"
    if isinstance(error, PackageError | ConfigError):
        return "the production model package is incomplete or unreadable"
    return "the production model could not be loaded; see the server log"


class ProductionFollower:
    """Keeps `holder` on the model `production.json` names, checking every `poll_seconds`."""

    def __init__(self, holder: ModelHolder, storage: Storage, cache_dir: str | Path, models_prefix: str,
                 poll_seconds: float) -> None:  # fmt: skip
        self.holder = holder
        self.storage = storage
        self.cache_dir = Path(cache_dir)
        self.models_prefix = models_prefix
        self.poll_seconds = poll_seconds
        self.problem: str | None = STARTING if holder.current is None else None
        self.etag: str | None = None
        self.previous: str | None = None
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.checked = threading.Event()  # set once the first check has ended, model or not
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def check(self) -> bool:
        """Load production if it changed; True when a model is in service. Raises what stopped it."""
        with self.lock:
            try:
                data, etag = self.storage.read_bytes_with_etag(f"{self.models_prefix}/{PRODUCTION_POINTER}")
            except StorageNotFoundError:
                self.problem = None if self.holder.current is not None else NOT_PROMOTED
                return self.holder.current is not None
            if etag == self.etag and self.holder.current is not None:
                return True
            version = parse_pointer(data)
            current = self.holder.current
            if current is None or current.version != version:
                try:
                    directory = fetch_package(self.storage, version, self.cache_dir, self.models_prefix)
                except StorageNotFoundError:
                    raise PackageError(f"production names {version}, whose package is missing") from None
                self.holder.swap(Predictor.from_package(directory))
                self.previous = current.version if current is not None else self.previous
                prune_cache(self.cache_dir, {version} | ({self.previous} if self.previous else set()))
            self.etag, self.problem = etag, None
            return True

    def check_safely(self) -> bool:
        """`check`, with any failure logged and turned into `problem`; the model in service stays."""
        try:
            return self.check()
        except Exception as error:  # keep following: the next check may succeed
            logger.error("could not follow production: %s", error)
            if self.holder.current is None:
                self.problem = describe_problem(error)
            return False

    def run(self, before: Callable[[], None] | None = None) -> None:
        """The background loop: check, then wait the poll interval (or less, backing off, after a failure).

        `before` runs first, in this thread (a server sets torch's thread count there, off its start-up path).
        """
        retry = FIRST_RETRY_SECONDS
        if before is not None:
            before()
        while not self.stopped.is_set():
            healthy = self.check_safely()
            self.checked.set()
            if healthy or self.problem == NOT_PROMOTED:
                delay, retry = self.poll_seconds, FIRST_RETRY_SECONDS
            else:
                delay, retry = min(retry, self.poll_seconds), min(retry * 2, self.poll_seconds)
            self.wake.wait(delay)
            self.wake.clear()

    def start(self, before: Callable[[], None] | None = None) -> None:
        """Start following in a daemon thread (`before` runs there first)."""
        self.thread = threading.Thread(target=self.run, args=(before,), name="production-follower", daemon=True)
        self.thread.start()

    def poke(self) -> None:
        """Check now rather than at the next interval (a training on this instance just ended)."""
        self.wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

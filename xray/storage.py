"""Where the pipeline keeps its files: a local folder by default, or an S3 bucket.

This is the only module that talks to boto3. Everything else asks `open_storage()` for a
`Storage` and uses '/'-separated keys relative to its root, so the same code runs on a
laptop folder, MinIO, moto or AWS S3.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import email.utils
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import boto3
import botocore.config
import botocore.exceptions
import botocore.utils
from boto3.exceptions import S3UploadFailedError
from botocore.client import BaseClient

from xray.settings import Settings

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
SHA256_METADATA_KEY = "sha256"

# Measured with scripts/benchmark_storage.py (5,216 X-rays of 60 kB against a moto server): see README, "Storage".
DEFAULT_TRANSFER_WORKERS = 32
# Objects up to this size move in one GET or PUT; larger ones use s3transfer's ranged or multipart transfer.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
DIGEST_CACHE_NAME = ".xray-digests.json"

_PARTIAL_SUFFIX = ".partial"
_CHUNK_SIZE = 1024 * 1024
# Downloaded small files are made durable together: one filesystem sync per batch, then renamed into place.
_BATCH_FILES = 512
_BATCH_BYTES = 64 * 1024 * 1024
# A cached local digest is trusted only for files last modified this long before it was recorded, so an edit in
# the same filesystem clock tick as the download cannot hide behind an unchanged size and mtime.
_RACY_WINDOW_NS = 200_000_000
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_REJECTED_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)
_CREDENTIALS_HELP = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary "
    "credentials), or AWS_PROFILE naming a profile in ~/.aws/credentials"
)


class StorageError(Exception):
    """A storage problem explained in words a user can act on."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A key (or local file) that does not exist; also a FileNotFoundError for callers that expect one."""


@dataclass(frozen=True)
class TransferReport:
    """How many files a folder transfer copied and how many it skipped because they were unchanged."""

    transferred: int
    skipped: int


@dataclass(frozen=True)
class _ObjectInfo:
    """What a listing tells cheaply about a stored object: its size and, when known, its MD5."""

    size: int
    md5: str | None = None


@dataclass(frozen=True)
class _FileDigests:
    """Size and hashes of a local file, computed in one read."""

    size: int
    md5: str
    sha256: str


def _digest_file(path: Path) -> _FileDigests:
    """Hash a local file with MD5 (to compare with S3 ETags) and SHA-256 in a single pass."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha256 = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_SIZE):
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return _FileDigests(size=size, md5=md5.hexdigest(), sha256=sha256.hexdigest())


def _digest_bytes(data: bytes) -> _FileDigests:
    """Hash content already in memory, as `_digest_file` does for a file."""
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return _FileDigests(size=len(data), md5=md5, sha256=hashlib.sha256(data).hexdigest())


class _DigestCache:
    """Digests of the files under one local folder, kept in a hidden file there so a re-sync reads no file.

    An entry is used only while the file's size, mtime and inode are those it was hashed with, and is kept
    only for files older than the filesystem's clock tick when saved (an edit in the same tick as the
    download would otherwise keep size and mtime).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / DIGEST_CACHE_NAME
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] = {}
        self._changed = False
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self._entries = {
                    key: value for key, value in loaded.items() if isinstance(value, list) and len(value) == 5
                }

    @staticmethod
    def _stamp(status: os.stat_result) -> list[int]:
        """What must not change for a cached digest to stay valid."""
        return [status.st_size, status.st_mtime_ns, status.st_ino]

    def digests(self, relative: str, path: Path, status: os.stat_result | None = None) -> _FileDigests:
        """The digests of `path` (whose `status` the caller may have), from the cache if untouched, else read."""
        status = status or path.stat()
        entry = self._entries.get(relative)
        if entry is not None and entry[:3] == self._stamp(status):
            return _FileDigests(size=entry[0], md5=entry[3], sha256=entry[4])
        digests = _digest_file(path)
        self.record(relative, path, digests, status)
        return digests

    def record(self, relative: str, path: Path, digests: _FileDigests, status: os.stat_result | None = None) -> None:
        """Remember the digests of a file just written or hashed."""
        stamp = self._stamp(status or path.stat())
        with self._lock:
            self._entries[relative] = [*stamp, digests.md5, digests.sha256]
            self._changed = True

    def save(self) -> None:
        """Write the cache beside the files, dropping entries too fresh to trust; a failure only costs speed."""
        if not self._changed:
            return
        now = time.time_ns()
        with self._lock:
            entries = {key: value for key, value in self._entries.items() if now - value[1] > _RACY_WINDOW_NS}
        if not entries and not self.path.exists():
            return
        try:
            with _atomic_destination(self.path) as target:
                target.write(json.dumps(entries, separators=(",", ":")).encode())
        except OSError as error:
            logger.debug("Could not save the digest cache %s: %s", self.path, error)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), which flushes one filesystem, or None where the C library lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


def _sync_filesystem(folder: Path) -> None:
    """Flush every written file of the filesystem holding `folder` with one call (syncfs, else sync)."""
    syncfs = _syncfs()
    if syncfs is not None:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(descriptor) == 0:
                return
        finally:
            os.close(descriptor)
    if hasattr(os, "sync"):
        os.sync()


def _fsync_directory(folder: Path) -> None:
    """Make renames inside `folder` durable; a filesystem that cannot fsync folders is left as it is."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class _DurableBatch:
    """Files written under temporary names, synced to disk together, and only then renamed to their final names.

    One filesystem sync per batch replaces an fsync per small file; a crash leaves at most temporary files
    (ignored and cleaned up by the next transfer), never a half-written file under a final name.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[Path, Path, Callable[[Path], None]]] = []
        self._bytes = 0

    def write(self, final_path: Path, data: bytes, on_commit: Callable[[Path], None]) -> None:
        """Write `data` beside `final_path`; it gets its final name when its batch is committed."""
        final_path.parent.mkdir(parents=True, exist_ok=True)
        temporary_path = _temporary_path(final_path)
        descriptor = os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary_path.unlink()
            raise
        with self._lock:
            self._pending.append((temporary_path, final_path, on_commit))
            self._bytes += len(data)
            full = len(self._pending) >= _BATCH_FILES or self._bytes >= _BATCH_BYTES
            batch = self._take() if full else []
        if batch:
            self._commit(batch)

    def flush(self) -> None:
        """Commit whatever is pending."""
        with self._lock:
            batch = self._take()
        if batch:
            self._commit(batch)

    def discard(self) -> None:
        """Remove the temporary files of an abandoned transfer."""
        with self._lock:
            batch = self._take()
        for temporary_path, _, _ in batch:
            with contextlib.suppress(FileNotFoundError):
                temporary_path.unlink()

    def _take(self) -> list[tuple[Path, Path, Callable[[Path], None]]]:
        """Hand over the pending files (call with the lock held)."""
        batch, self._pending, self._bytes = self._pending, [], 0
        return batch

    @staticmethod
    def _commit(batch: list[tuple[Path, Path, Callable[[Path], None]]]) -> None:
        """Sync the batch's data once, rename each file into place, then make the renames durable."""
        renamed = 0
        try:
            _sync_filesystem(batch[0][1].parent)
            for temporary_path, final_path, on_commit in batch:
                os.replace(temporary_path, final_path)
                renamed += 1
                on_commit(final_path)
            for folder in {final_path.parent for _, final_path, _ in batch}:
                _fsync_directory(folder)
        except BaseException:
            for temporary_path, _, _ in batch[renamed:]:
                with contextlib.suppress(FileNotFoundError):
                    temporary_path.unlink()
            raise


def _validate_key(key: str) -> str:
    """Return `key` if it is a relative "/"-separated key; raise StorageError if it could escape the root."""
    if not isinstance(key, str) or not key:
        raise StorageError(f"Storage key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise StorageError(f"Storage key {key!r} must be relative: remove the leading '/'")
    if "\x00" in key or any(segment in ("", ".", "..") for segment in key.split("/")):
        raise StorageError(
            f"Storage key {key!r} is not allowed: use '/'-separated names without empty, '.' or '..' parts"
        )
    return key


def _normalize_prefix(prefix: str) -> str:
    """Return a folder prefix without trailing '/', or '' for the whole storage; reject unsafe prefixes."""
    stripped = prefix.rstrip("/")
    if prefix and not stripped:
        raise StorageError(f"Storage prefix {prefix!r} must be relative: use '' for the whole storage")
    return _validate_key(stripped) if stripped else ""


def _join_key(prefix: str, key: str) -> str:
    """Join a normalized prefix and a key with '/'."""
    return f"{prefix}/{key}" if prefix else key


def _temporary_path(final_path: Path) -> Path:
    """A hidden, unique in-progress name beside `final_path`, which listings and folder uploads ignore."""
    return final_path.with_name(f".{final_path.name}.{secrets.token_hex(6)}{_PARTIAL_SUFFIX}")


@contextlib.contextmanager
def _atomic_destination(final_path: Path) -> Iterator[BinaryIO]:
    """Yield a temporary file beside `final_path` and move it into place only if the block succeeds.

    Readers never see a half-written file under the final name; on failure the temporary file is removed.
    """
    final_path.parent.mkdir(parents=True, exist_ok=True)
    temporary_path = _temporary_path(final_path)
    # os.open with mode 0o666 honours the umask, unlike tempfile's private 0o600 files.
    descriptor = os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_path, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary_path.unlink()
        raise


def _is_partial_file(name: str) -> bool:
    """Tell whether a file name is one of our in-progress temporary files."""
    return name.startswith(".") and name.endswith(_PARTIAL_SUFFIX)


class Storage(abc.ABC):
    """A place to keep files under '/'-separated keys: the interface shared by local folders and S3."""

    uri: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @abc.abstractmethod
    def upload_file(self, local_path: Path, key: str) -> None:
        """Copy a local file into the storage under `key`, replacing what was there."""

    @abc.abstractmethod
    def download_file(self, key: str, local_path: Path) -> None:
        """Copy the object at `key` to `local_path`, creating folders; never leaves a partial file there."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the whole content of the object at `key`."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing what was there."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Tell whether an object is stored under `key`."""

    @abc.abstractmethod
    def _inventory(self, prefix: str) -> dict[str, _ObjectInfo]:
        """Map every key under the normalized folder `prefix` to its size (and MD5 when cheap)."""

    @abc.abstractmethod
    def _stored_sha256(self, key: str) -> str | None:
        """Return the SHA-256 of the stored object at `key`, or None when it cannot be known."""

    def read_json(self, key: str) -> Any:
        """Return the JSON document stored at `key`."""
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StorageError(f"Object '{key}' in {self.uri} is not valid JSON: {error}") from error

    def write_json(self, key: str, value: Any) -> None:
        """Store `value` as stable, human-readable JSON (indented, sorted keys) under `key`."""
        text = json.dumps(value, indent=2, sort_keys=True) + "\n"
        self.write_bytes(key, text.encode("utf-8"))

    def list(self, prefix: str = "") -> list[str]:
        """Return all keys under the folder `prefix` ('a' matches 'a/x', not 'ab'), recursive and sorted."""
        return sorted(self._inventory(_normalize_prefix(prefix)))

    def upload_folder(
        self, local_dir: Path, prefix: str, workers: int | None = None, include: Callable[[Path], bool] | None = None
    ) -> TransferReport:
        """Upload every non-hidden file under `local_dir` (for which `include` is true) to `prefix/<relative path>`.

        Files whose stored copy has the same size and content are skipped (sizes and MD5s come from one
        listing, so the check costs no request per file), so a rerun resumes an interrupted upload.
        The first failure stops the transfer and is raised.
        """
        local_dir = Path(local_dir)
        folder_prefix = _normalize_prefix(prefix)
        if not local_dir.is_dir():
            raise StorageNotFoundError(f"Cannot upload folder {local_dir}: it does not exist or is not a folder")
        files: dict[str, Path] = {}
        for directory, folder_names, file_names in os.walk(local_dir):
            folder_names[:] = sorted(name for name in folder_names if not name.startswith("."))
            for name in sorted(file_names):
                if not name.startswith(".") and (include is None or include(Path(directory, name))):
                    path = Path(directory, name)
                    files[_join_key(folder_prefix, path.relative_to(local_dir).as_posix())] = path
        stored = self._inventory(folder_prefix) if files else {}

        def upload_one(key: str, path: Path) -> bool:
            info = stored.get(key)
            unchanged = (
                info is not None
                and path.stat().st_size == info.size
                and self._is_unchanged(key, info, _digest_file(path))
            )
            if unchanged:
                logger.debug("Skipping unchanged %s", key)
                return False
            self.upload_file(path, key)
            return True

        tasks = [functools.partial(upload_one, key, path) for key, path in files.items()]
        report = self._run_transfers(tasks, workers, f"upload of {local_dir} to {self.uri}")
        logger.debug(  # the caller reports the outcome
            "Uploaded %d files from %s to %s (%d unchanged, skipped)",
            report.transferred,
            local_dir,
            self._describe(folder_prefix),
            report.skipped,
        )
        return report

    def download_prefix(
        self,
        prefix: str,
        local_dir: Path,
        workers: int | None = None,
        on_file: Callable[[str, bytes], None] | None = None,
    ) -> TransferReport:
        """Download every key under the folder `prefix` into `local_dir` (prefix/a/b.jpg -> local_dir/a/b.jpg).

        Local files with the same size and content are skipped without a request per file (digests of local
        files are cached in `local_dir`). Small objects take one GET each and are made durable once per
        batch. `on_file(key, content)`, when given, runs on the transfer threads as each file arrives (or
        is found unchanged), so callers can process the first files while the rest download; every file is
        in place under its final name when this returns. Raises StorageNotFoundError when nothing is stored
        under `prefix`, since that is almost always a wrong URI or prefix.
        """
        local_dir = Path(local_dir)
        folder_prefix = _normalize_prefix(prefix)
        stored = self._inventory(folder_prefix)
        if not stored:
            raise StorageNotFoundError(f"Nothing is stored under '{folder_prefix}' in {self.uri}")
        skip = len(folder_prefix) + 1 if folder_prefix else 0
        cache = _DigestCache(local_dir)
        batch = _DurableBatch()

        def local_copy_is_current(key: str, info: _ObjectInfo, destination: Path, ask: bool) -> bool | None:
            """Whether the local file matches the object; None when only a request could tell and `ask` is False."""
            try:
                status = destination.stat()
            except (FileNotFoundError, NotADirectoryError):
                return False
            if not stat.S_ISREG(status.st_mode) or status.st_size != info.size:
                return False
            local = cache.digests(destination.relative_to(local_dir).as_posix(), destination, status)
            if info.md5 is not None and info.md5 == local.md5:
                return True
            return self._stored_sha256(key) == local.sha256 if ask else None

        def download_one(key: str, info: _ObjectInfo, destination: Path, current: bool | None) -> bool:
            if current is None:
                current = local_copy_is_current(key, info, destination, ask=True)
            if current:
                logger.debug("Skipping unchanged %s", destination)
                if on_file is not None:
                    on_file(key, destination.read_bytes())
                return False
            relative = destination.relative_to(local_dir).as_posix()
            if info.size > MULTIPART_THRESHOLD:
                self.download_file(key, destination)
                cache.record(relative, destination, _digest_file(destination))
                if on_file is not None:
                    on_file(key, destination.read_bytes())
                return True
            data = self.read_bytes(key)
            digests = _digest_bytes(data)
            if info.md5 is not None and digests.md5 != info.md5:  # the listing's ETag is the object's MD5
                raise StorageError(f"Download of '{key}' from {self.uri} does not match its stored MD5: retry")
            batch.write(destination, data, lambda path: cache.record(relative, path, digests))
            if on_file is not None:
                on_file(key, data)
            return True

        # Files the listing's MD5 proves current are settled here, without a thread or a request each.
        tasks, settled = [], 0
        for key, info in sorted(stored.items()):
            destination = local_dir.joinpath(*_validate_key(key[skip:]).split("/"))
            current = local_copy_is_current(key, info, destination, ask=False)
            if current and on_file is None:
                settled += 1
            else:
                tasks.append(functools.partial(download_one, key, info, destination, current))
        try:
            report = self._run_transfers(tasks, workers, f"download of {self._describe(folder_prefix)} to {local_dir}")
            batch.flush()
        finally:
            batch.discard()
            cache.save()
        report = TransferReport(transferred=report.transferred, skipped=report.skipped + settled)
        logger.debug(  # the caller reports the outcome
            "Downloaded %d files from %s to %s (%d unchanged, skipped)",
            report.transferred,
            self._describe(folder_prefix),
            local_dir,
            report.skipped,
        )
        return report

    def _describe(self, prefix: str) -> str:
        """Name a folder of this storage for log and error messages."""
        return f"{self.uri.rstrip('/')}/{prefix}" if prefix else self.uri

    def _is_unchanged(self, key: str, info: _ObjectInfo, local: _FileDigests) -> bool:
        """Tell whether a local file (by its digests) and the stored object have the same size and content.

        The MD5 from the listing decides without a request; only objects without one (multipart, or
        encrypted so the ETag is no MD5) cost a request for their SHA-256 metadata.
        """
        if local.size != info.size:
            return False
        if info.md5 is not None and info.md5 == local.md5:
            return True
        return self._stored_sha256(key) == local.sha256

    def _prepare_transfers(self, workers: int) -> None:
        """Get ready to run `workers` transfers at once (S3 widens its connection pool)."""
        return None

    def _run_transfers(self, tasks: list[Callable[[], bool]], workers: int | None, description: str) -> TransferReport:
        """Run transfer tasks (each returns True if it copied, False if it skipped) on a thread pool."""
        workers = DEFAULT_TRANSFER_WORKERS if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._prepare_transfers(workers)
        transferred = skipped = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xray-storage") as executor:
            futures = [executor.submit(task) for task in tasks]
            try:
                for future in as_completed(futures):
                    if future.result():
                        transferred += 1
                    else:
                        skipped += 1
            except BaseException:
                for future in futures:
                    future.cancel()
                logger.error(
                    "Stopped the %s after %d transferred and %d skipped files; rerun it to resume",
                    description,
                    transferred,
                    skipped,
                )
                raise
        return TransferReport(transferred=transferred, skipped=skipped)

    # Conditional writes: the training lease and the production pointer change only when nobody else changed them
    # first. An ETag names one stored content: S3's own, or the quoted MD5 of a local file (S3's form).

    @abc.abstractmethod
    def read_bytes_with_etag(self, key: str) -> tuple[bytes, str]:
        """Return the content of the object at `key` and the ETag of that very content."""

    @abc.abstractmethod
    def write_bytes_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the object at `key` only if none is stored there; its new ETag, or None when one already was."""

    @abc.abstractmethod
    def write_bytes_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object at `key` only if it still has `etag`; the new ETag, or None when it changed or is gone."""

    @abc.abstractmethod
    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete the object at `key` only if it still has `etag`; False when it changed or is gone."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object at `key`; nothing happens when none is stored there."""

    def with_timeouts(self, seconds: float, attempts: int) -> Storage:
        """This storage with network calls bounded by `seconds` and `attempts` (a server must not hang on it)."""
        return self


class LocalStorage(Storage):
    """Storage in a local folder: the default, needs no cloud account."""

    def __init__(self, root: Path) -> None:
        """Use the folder `root` (created if missing) as the storage root."""
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            raise StorageError(f"Storage folder {self.root} cannot be created: a file is in the way") from error
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        """Return the file path of a validated key."""
        return self.root.joinpath(*_validate_key(key).split("/"))

    def _existing_path(self, key: str) -> Path:
        """Return the file path of `key`, or raise StorageNotFoundError when no file is stored there."""
        path = self._path(key)
        if not path.is_file():
            raise StorageNotFoundError(f"No object '{key}' in {self.uri}")
        return path

    def upload_file(self, local_path: Path, key: str) -> None:
        """Copy a local file into the storage folder under `key` atomically."""
        destination = self._path(key)
        local_path = Path(local_path)
        if not local_path.is_file():
            raise StorageNotFoundError(f"Cannot upload {local_path}: no such file")
        with local_path.open("rb") as source, _atomic_destination(destination) as target:
            shutil.copyfileobj(source, target, _CHUNK_SIZE)

    def download_file(self, key: str, local_path: Path) -> None:
        """Copy the stored file at `key` to `local_path` atomically."""
        source_path = self._existing_path(key)
        with source_path.open("rb") as source, _atomic_destination(Path(local_path)) as target:
            shutil.copyfileobj(source, target, _CHUNK_SIZE)

    def read_bytes(self, key: str) -> bytes:
        """Return the content of the stored file at `key`."""
        return self._existing_path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write `data` to the stored file at `key` atomically."""
        with _atomic_destination(self._path(key)) as target:
            target.write(data)

    def exists(self, key: str) -> bool:
        """Tell whether a file is stored at `key`."""
        return self._path(key).is_file()

    def _inventory(self, prefix: str) -> dict[str, _ObjectInfo]:
        """Walk the folder of `prefix`, ignoring our in-progress temporary files."""
        base = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        inventory: dict[str, _ObjectInfo] = {}
        if not base.is_dir():
            return inventory
        for directory, _folder_names, file_names in os.walk(base):
            for name in file_names:
                if _is_partial_file(name):
                    continue
                path = Path(directory, name)
                with contextlib.suppress(FileNotFoundError):  # removed while we walked
                    inventory[path.relative_to(self.root).as_posix()] = _ObjectInfo(size=path.stat().st_size)
        return inventory

    def _stored_sha256(self, key: str) -> str | None:
        """Hash the stored file (local storage keeps no metadata)."""
        return _digest_file(self._existing_path(key)).sha256

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[Path]:
        """Hold an exclusive lock on `key` (a hidden lock file beside it, which listings skip); yield its path."""
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = path.with_name(f".{path.name}.lock{_PARTIAL_SUFFIX}")
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _etag(data: bytes) -> str:
        """A local object's ETag: the quoted MD5 of its content, as S3 gives for a plain upload."""
        return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'

    def read_bytes_with_etag(self, key: str) -> tuple[bytes, str]:
        """Return the stored file's content and its ETag, from one read."""
        data = self.read_bytes(key)
        return data, self._etag(data)

    def write_bytes_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the file under the key's lock (written beside it, then renamed) unless it exists."""
        with self._key_lock(key) as path:
            if path.is_file():
                return None
            with _atomic_destination(path) as target:
                target.write(data)
        return self._etag(data)

    def write_bytes_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the file under the key's lock only while its content still has `etag`."""
        with self._key_lock(key) as path:
            if not path.is_file() or self._etag(path.read_bytes()) != etag:
                return None
            with _atomic_destination(path) as target:
                target.write(data)
        return self._etag(data)

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Remove the file under the key's lock only while its content still has `etag`."""
        with self._key_lock(key) as path:
            if not path.is_file() or self._etag(path.read_bytes()) != etag:
                return False
            path.unlink()
        return True

    def delete(self, key: str) -> None:
        """Remove the stored file at `key`, if any."""
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def _endpoint_from_environment() -> str | None:
    """Return the S3 endpoint override (MinIO, moto server) from the environment, if any."""
    for variable in ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def create_s3_client(max_pool_connections: int = DEFAULT_TRANSFER_WORKERS) -> BaseClient:
    """Build an S3 client with retries, and path-style addressing when an endpoint override is set.

    boto3 reads credentials, region and AWS_ENDPOINT_URL(_S3) itself; S3-compatible servers need path style.
    The connection pool holds one connection per transfer worker, so parallel transfers never wait for one.
    Per-request work is kept to what S3 needs, measured with scripts/benchmark_storage.py (about 5% of a
    5,216-file transfer): standard retries (adaptive mode adds client-side rate bookkeeping to every
    request), no parameter validation (every call is built here), and checksums only where S3 requires
    them: a small download is checked against the listing's MD5 instead (`download_prefix`), and TLS
    protects uploads to AWS.
    """
    options: dict[str, Any] = {
        "retries": {"max_attempts": 10, "mode": "standard"},
        "max_pool_connections": max_pool_connections,
        "parameter_validation": False,
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    if _endpoint_from_environment():
        options["s3"] = {"addressing_style": "path"}
    session = boto3.session.Session()
    session._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    return session.client("s3", config=botocore.config.Config(**options))


def _parse_timestamp(value: str) -> datetime:
    """botocore's timestamp parsing without dateutil's cost on the two forms S3 sends (half a listing's time)."""
    try:
        return datetime.fromisoformat(value)  # listings: 2026-11-22T10:00:00.000Z
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value)  # headers: Sun, 22 Nov 2026 10:00:00 GMT
    except (TypeError, ValueError):
        return botocore.utils.parse_timestamp(value)


def _without_credentials(url: str) -> str:
    """Drop any user:password@ part of a URL so it can be shown."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


class S3Storage(Storage):
    """Storage in an S3 bucket (or an S3-compatible server) under an optional key prefix.

    Skipping unchanged files compares sizes, then the MD5 in the ETag when it is a plain MD5, else the
    `sha256` metadata entry written at upload time; an object with neither (e.g. a multipart upload by
    another tool) counts as changed and is transferred again.
    """

    def __init__(self, bucket: str, prefix: str = "", client: BaseClient | None = None) -> None:
        """Use `bucket`, keys under `prefix`, and `client` (default: `create_s3_client()`); no request is made yet."""
        if not bucket or "/" in bucket:
            raise StorageError(f"Invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = _normalize_prefix(prefix)
        self._owns_client = client is None
        self.client = client if client is not None else create_s3_client()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint={self._endpoint!r})"

    @property
    def _endpoint(self) -> str:
        """The endpoint the client talks to, without credentials."""
        return _without_credentials(str(self.client.meta.endpoint_url))

    def _full_key(self, key: str) -> str:
        """Return the bucket key of a storage key."""
        return _join_key(self.prefix, _validate_key(key))

    @contextlib.contextmanager
    def _translated_errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore and boto3 transfer errors raised inside the block into StorageErrors."""
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, S3UploadFailedError) as error:
            raise self._storage_error(error, action, key) from error
        except Exception as error:
            # boto3/s3transfer RetriesExceededError wraps the last botocore error.
            cause = getattr(error, "last_exception", None)
            if isinstance(cause, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError):
                raise self._storage_error(cause, action, key) from error
            raise

    def _storage_error(self, error: Exception, action: str, key: str | None) -> StorageError:
        """Explain a botocore error in words a user can act on."""
        if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, botocore.exceptions.ClientError):
            error = error.__context__
        target = f"'{key}' in {self.uri}" if key is not None else self.uri
        if isinstance(error, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return StorageError(f"No usable AWS credentials to {action} {target}: {_CREDENTIALS_HELP}")
        if isinstance(error, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError):
            return StorageError(
                f"Cannot reach the S3 endpoint {self._endpoint} to {action} {target}: {error}. "
                "Check AWS_ENDPOINT_URL and that the server is running."
            )
        if not isinstance(error, botocore.exceptions.ClientError):
            return StorageError(f"S3 could not {action} {target}: {error}")
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = error.response.get("Error", {}).get("Message") or code
        if code == "NoSuchBucket" or (code in _NOT_FOUND_CODES and (key is None or not self._bucket_exists())):
            return self._missing_bucket_error()
        if code in _NOT_FOUND_CODES:
            return StorageNotFoundError(f"No object '{key}' in {self.uri}")
        if code in _REJECTED_CREDENTIAL_CODES:
            return StorageError(f"S3 rejected the AWS credentials ({code}) to {action} {target}: {_CREDENTIALS_HELP}")
        if code in _ACCESS_DENIED_CODES:
            return StorageError(
                f"Access denied to {action} {target}: the AWS credentials in use lack permission on "
                f"bucket '{self.bucket}' ({message})"
            )
        return StorageError(f"S3 could not {action} {target}: {code}: {message}")

    def _missing_bucket_error(self) -> StorageError:
        """The error for a bucket that does not exist."""
        return StorageError(
            f"S3 bucket '{self.bucket}' does not exist ({self.uri}, "
            f"endpoint {self._endpoint}); create it or fix the URI"
        )

    def _bucket_exists(self) -> bool:
        """Tell whether the bucket exists, to tell a missing key from a missing bucket (HEAD 404s look alike)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as error:
            return str(error.response.get("Error", {}).get("Code")) not in ({"NoSuchBucket"} | _NOT_FOUND_CODES)
        except botocore.exceptions.BotoCoreError:
            return True
        return True

    def upload_file(self, local_path: Path, key: str) -> None:
        """Upload a local file to `key` (one PUT when small, multipart when large), recording its SHA-256."""
        full_key = self._full_key(key)
        local_path = Path(local_path)
        if not local_path.is_file():
            raise StorageNotFoundError(f"Cannot upload {local_path}: no such file")
        if local_path.stat().st_size <= MULTIPART_THRESHOLD:
            self.write_bytes(key, local_path.read_bytes())
            return
        sha256 = _digest_file(local_path).sha256
        with self._translated_errors("upload", key):
            self.client.upload_file(
                str(local_path), self.bucket, full_key, ExtraArgs={"Metadata": {SHA256_METADATA_KEY: sha256}}
            )

    def _prepare_transfers(self, workers: int) -> None:
        """Widen the connection pool of a client this storage built to one connection per worker."""
        if self._owns_client and self.client.meta.config.max_pool_connections < workers:
            self.client = create_s3_client(max_pool_connections=workers)

    def download_file(self, key: str, local_path: Path) -> None:
        """Download `key` into a temporary file beside `local_path`, then move it into place."""
        full_key = self._full_key(key)
        with self._translated_errors("download", key), _atomic_destination(Path(local_path)) as target:
            self.client.download_fileobj(self.bucket, full_key, target)

    def read_bytes(self, key: str) -> bytes:
        """Return the content of the object at `key`."""
        full_key = self._full_key(key)
        with self._translated_errors("read", key):
            response = self.client.get_object(Bucket=self.bucket, Key=full_key)
            return response["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store `data` as the object at `key`, recording its SHA-256 in the object metadata."""
        full_key = self._full_key(key)
        sha256 = hashlib.sha256(data).hexdigest()
        with self._translated_errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=full_key, Body=data, Metadata={SHA256_METADATA_KEY: sha256})

    def exists(self, key: str) -> bool:
        """Tell whether an object is stored at `key`; a missing bucket is an error, not False."""
        full_key = self._full_key(key)
        with self._translated_errors("check", key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=full_key)
            except botocore.exceptions.ClientError as error:
                if str(error.response.get("Error", {}).get("Code")) not in _NOT_FOUND_CODES:
                    raise
                if not self._bucket_exists():
                    raise self._missing_bucket_error() from error
                return False
        return True

    def _inventory(self, prefix: str) -> dict[str, _ObjectInfo]:
        """List the objects under `prefix` with their sizes and, for plain ETags, their MD5.

        A listing is a chain of 1,000-key pages; each first-level sub-folder gets its own chain, listed in
        parallel, so a large prefix waits for the longest folder rather than for every page in turn.
        """
        bucket_prefix = _join_key(self.prefix, prefix) if prefix else self.prefix
        request_prefix = f"{bucket_prefix}/" if bucket_prefix else ""
        with self._translated_errors("list"):
            inventory, folders = self._list_pages(request_prefix, delimiter="/")
            if folders:
                with ThreadPoolExecutor(max_workers=min(len(folders), DEFAULT_TRANSFER_WORKERS)) as pool:
                    for part, _ in pool.map(self._list_pages, folders):
                        inventory.update(part)
        return inventory

    def _list_pages(self, request_prefix: str, delimiter: str = "") -> tuple[dict[str, _ObjectInfo], list[str]]:
        """The objects of one chain of listing pages (storage key -> info), and its sub-folders when `delimiter`."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        inventory: dict[str, _ObjectInfo] = {}
        folders: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        options = {"Delimiter": delimiter} if delimiter else {}
        for page in paginator.paginate(Bucket=self.bucket, Prefix=request_prefix, **options):
            folders += [entry["Prefix"] for entry in page.get("CommonPrefixes", [])]
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue  # a console "folder" marker, not a file
                etag = str(item.get("ETag", "")).strip('"')
                md5 = etag.lower() if len(etag) == 32 and "-" not in etag else None
                inventory[item["Key"][strip:]] = _ObjectInfo(size=int(item["Size"]), md5=md5)
        return inventory, folders

    def _stored_sha256(self, key: str) -> str | None:
        """Read the SHA-256 that `upload_file`/`write_bytes` put in the object's metadata, if any."""
        full_key = self._full_key(key)
        with self._translated_errors("inspect", key):
            response = self.client.head_object(Bucket=self.bucket, Key=full_key)
        return response.get("Metadata", {}).get(SHA256_METADATA_KEY)

    def read_bytes_with_etag(self, key: str) -> tuple[bytes, str]:
        """Return the content of the object at `key` and the ETag S3 sent with it."""
        full_key = self._full_key(key)
        with self._translated_errors("read", key):
            response = self.client.get_object(Bucket=self.bucket, Key=full_key)
            return response["Body"].read(), str(response["ETag"])

    def _put_if(self, key: str, data: bytes, **condition: str) -> str | None:
        """put_object with an If-None-Match/If-Match condition: the new ETag, or None when S3 refuses it."""
        full_key = self._full_key(key)
        sha256 = hashlib.sha256(data).hexdigest()
        with self._translated_errors("write", key):
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=full_key, Body=data,
                                                   Metadata={SHA256_METADATA_KEY: sha256}, **condition)  # fmt: skip
            except botocore.exceptions.ClientError as error:
                if self._is_condition_failure(error, missing_counts="IfMatch" in condition):
                    return None
                raise
        return str(response["ETag"])

    @staticmethod
    def _is_condition_failure(error: botocore.exceptions.ClientError, missing_counts: bool) -> bool:
        """412 (condition false), 409 (a concurrent conditional write) and, where asked, 404 (object gone)."""
        code = str(error.response.get("Error", {}).get("Code", ""))
        refused = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
        return code in refused or (missing_counts and code in {"NoSuchKey", "404"})

    def write_bytes_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the object only if the key is free (`IfNoneMatch="*"`)."""
        return self._put_if(key, data, IfNoneMatch="*")

    def write_bytes_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object only while it still has `etag` (`IfMatch`)."""
        return self._put_if(key, data, IfMatch=etag)

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete the object only while it still has `etag` (`IfMatch` on DeleteObject)."""
        full_key = self._full_key(key)
        with self._translated_errors("delete", key):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=full_key, IfMatch=etag)
            except botocore.exceptions.ClientError as error:
                if self._is_condition_failure(error, missing_counts=True):
                    return False
                raise
        return True

    def delete(self, key: str) -> None:
        """Delete the object at `key` (S3 answers success for a missing key too)."""
        full_key = self._full_key(key)
        with self._translated_errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=full_key)

    def with_timeouts(self, seconds: float, attempts: int) -> S3Storage:
        """The same bucket and prefix through a client that gives up after `attempts` tries of `seconds` each."""
        meta = self.client.meta
        limits = botocore.config.Config(connect_timeout=seconds, read_timeout=seconds,
                                        retries={"total_max_attempts": attempts, "mode": "standard"})  # fmt: skip
        config = meta.config.merge(limits)
        client = boto3.session.Session().client("s3", endpoint_url=meta.endpoint_url, region_name=meta.region_name,
                                                config=config)  # fmt: skip
        return S3Storage(self.bucket, self.prefix, client=client)


def open_storage(uri: str | None = None) -> Storage:
    """Open the storage at `uri`: 's3://bucket/prefix', 'file:///path' or a plain folder path.

    Without `uri`, uses the deployment setting (XRAY_STORAGE_URI, default the folder 'store').
    """
    if uri is None:
        uri = Settings.from_environment().storage_uri
    if "://" not in uri:
        return LocalStorage(Path(uri))
    scheme = uri.split("://", 1)[0].lower()
    parts = urlsplit(uri)
    if scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"S3 URI {uri!r} names no bucket: use s3://bucket/optional/prefix")
        return S3Storage(parts.netloc, prefix=parts.path.strip("/"))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"File URI {uri!r} must be absolute: use file:///absolute/path or a plain path")
        return LocalStorage(Path(unquote(parts.path)))
    raise StorageError(
        f"Unsupported storage scheme '{scheme}' in storage URI {uri!r}: use a folder path, file:// or s3://"
    )

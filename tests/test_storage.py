"""Contract tests for xray.storage: one suite run against a local folder, in-process moto and a moto server.

Nothing here can reach AWS: credentials are fake, and every S3 request goes to moto.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.config
import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws
from moto.server import ThreadedMotoServer

import xray.storage
from xray.storage import (
    DEFAULT_TRANSFER_WORKERS,
    DIGEST_CACHE_NAME,
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    StorageNotFoundError,
    TransferReport,
    create_s3_client,
    open_storage,
)

S3_BACKENDS = ["s3-in-process", "s3-server"]
AWS_VARIABLES_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "XRAY_STORAGE_URI",
)


@pytest.fixture(autouse=True)
def fake_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fake credentials, empty AWS config files and no instance metadata, so nothing can reach real AWS."""
    empty_file = tmp_path_factory.mktemp("aws") / "empty"
    empty_file.write_text("")
    for name in AWS_VARIABLES_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty_file))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty_file))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, speaking real HTTP, for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@contextlib.contextmanager
def moto_admin_client(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BaseClient]:
    """A plain boto3 client on a moto backend, to set up and inspect buckets behind the storage's back."""
    if backend == "s3-in-process":
        with mock_aws():
            yield boto3.client("s3")
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("moto_endpoint"))
        yield boto3.client("s3")


@pytest.fixture(params=S3_BACKENDS)
def s3_admin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[BaseClient]:
    """An admin client on each moto backend, for S3-only tests."""
    with moto_admin_client(request.param, request, monkeypatch) as admin:
        yield admin


def new_bucket_name() -> str:
    """A bucket name no other test uses."""
    return f"xray-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", *S3_BACKENDS])
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    """The storage under contract test: a local folder, or S3Storage (with its own default client) on moto."""
    if request.param == "local":
        yield LocalStorage(tmp_path / "store")
        return
    with moto_admin_client(request.param, request, monkeypatch) as admin:
        bucket = new_bucket_name()
        admin.create_bucket(Bucket=bucket)
        # The in-process bucket also exercises a key prefix inside the bucket.
        yield S3Storage(bucket, prefix="runs/7" if request.param == "s3-in-process" else "")


def partial_files(folder: Path) -> list[Path]:
    """Temporary files a transfer might have left behind."""
    return [path for path in folder.rglob("*") if path.name.endswith(".partial")]


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Create files (relative '/'-paths) under root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


# --- contract: every backend behaves the same ---------------------------------------------------


def test_bytes_and_json_round_trip(storage: Storage) -> None:
    payload = bytes(range(256)) * 3
    storage.write_bytes("blobs/raw.bin", payload)
    assert storage.read_bytes("blobs/raw.bin") == payload

    storage.write_bytes("blobs/raw.bin", b"replaced")
    assert storage.read_bytes("blobs/raw.bin") == b"replaced"

    metrics = {"recall": 0.97, "auc": 0.99, "classes": ["NORMAL", "PNEUMONIA"]}
    storage.write_json("runs/metrics.json", metrics)
    assert storage.read_json("runs/metrics.json") == metrics
    assert storage.read_bytes("runs/metrics.json").decode() == json.dumps(metrics, indent=2, sort_keys=True) + "\n"


def test_file_round_trip_creates_local_folders(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes(os.urandom(70_000))
    storage.upload_file(source, "models/v1/model.safetensors")

    destination = tmp_path / "fresh" / "nested" / "model.safetensors"
    storage.download_file("models/v1/model.safetensors", destination)
    assert destination.read_bytes() == source.read_bytes()
    assert partial_files(tmp_path) == []


def test_list_is_recursive_sorted_and_prefix_scoped(storage: Storage) -> None:
    for key in ["b.txt", "a/2.txt", "a/sub/3.txt", "a/1.txt", "ab/4.txt"]:
        storage.write_bytes(key, key.encode())

    assert storage.list() == ["a/1.txt", "a/2.txt", "a/sub/3.txt", "ab/4.txt", "b.txt"]
    assert storage.list("a") == ["a/1.txt", "a/2.txt", "a/sub/3.txt"]
    assert storage.list("a/") == ["a/1.txt", "a/2.txt", "a/sub/3.txt"]
    assert storage.list("a/sub") == ["a/sub/3.txt"]
    assert storage.list("nothing-here") == []


def test_exists_only_for_stored_objects(storage: Storage) -> None:
    storage.write_bytes("data/labels.csv", b"path,label\n")
    assert storage.exists("data/labels.csv")
    assert not storage.exists("data/other.csv")
    assert not storage.exists("data")  # a folder is not an object


def test_missing_key_raises_not_found_naming_key_and_storage(storage: Storage, tmp_path: Path) -> None:
    attempts = {
        "read_bytes": lambda: storage.read_bytes("models/missing.bin"),
        "read_json": lambda: storage.read_json("models/missing.bin"),
        "download_file": lambda: storage.download_file("models/missing.bin", tmp_path / "out" / "missing.bin"),
    }
    for operation, attempt in attempts.items():
        with pytest.raises(StorageNotFoundError) as raised:
            attempt()
        assert "models/missing.bin" in str(raised.value), operation
        assert storage.uri in str(raised.value), operation
        assert isinstance(raised.value, FileNotFoundError), operation


UNSAFE_KEYS = ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a//b", "a/./b", ""]


def test_unsafe_keys_and_prefixes_are_refused(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_bytes(b"x")
    for key in UNSAFE_KEYS:
        with pytest.raises(StorageError, match="key"):
            storage.write_bytes(key, b"x")
        with pytest.raises(StorageError, match="key"):
            storage.upload_file(source, key)
        with pytest.raises(StorageError, match="key"):
            storage.read_bytes(key)
    for prefix in ["../", "/", "a/../.."]:
        with pytest.raises(StorageError):
            storage.list(prefix)
    assert not (tmp_path / "escape.txt").exists()
    assert storage.list() == []


def test_upload_folder_skips_unchanged_and_resends_changed(storage: Storage, tmp_path: Path) -> None:
    folder = tmp_path / "dataset"
    write_tree(
        folder,
        {
            "train/NORMAL/1.jpg": b"normal-one",
            "train/PNEUMONIA/2.jpg": b"pneumonia-two",
            "labels.csv": b"path,label\n",
            ".DS_Store": b"junk",
            ".cache/ignored.bin": b"junk",
        },
    )

    assert storage.upload_folder(folder, "data", workers=4) == TransferReport(transferred=3, skipped=0)
    assert storage.list("data") == ["data/labels.csv", "data/train/NORMAL/1.jpg", "data/train/PNEUMONIA/2.jpg"]

    assert storage.upload_folder(folder, "data", workers=4) == TransferReport(transferred=0, skipped=3)

    (folder / "train/NORMAL/1.jpg").write_bytes(b"NORMAL-ONE")  # same size, new content
    (folder / "train/NORMAL/3.jpg").write_bytes(b"normal-three")
    assert storage.upload_folder(folder, "data/", workers=4) == TransferReport(transferred=2, skipped=2)
    assert storage.read_bytes("data/train/NORMAL/1.jpg") == b"NORMAL-ONE"
    assert storage.read_bytes("data/train/NORMAL/3.jpg") == b"normal-three"


def test_download_prefix_recreates_tree_and_skips_unchanged(storage: Storage, tmp_path: Path) -> None:
    stored = {"data/a/b.jpg": b"bee", "data/a/c/d.jpg": b"dee", "data/top.csv": b"x,y\n"}
    for key, content in stored.items():
        storage.write_bytes(key, content)
    storage.write_bytes("other/outside.txt", b"not mine")
    destination = tmp_path / "downloaded"

    assert storage.download_prefix("data", destination, workers=3) == TransferReport(transferred=3, skipped=0)
    downloaded = {
        p.relative_to(destination).as_posix(): p.read_bytes()
        for p in destination.rglob("*")
        if p.is_file() and p.name != DIGEST_CACHE_NAME
    }
    assert downloaded == {"a/b.jpg": b"bee", "a/c/d.jpg": b"dee", "top.csv": b"x,y\n"}

    assert storage.download_prefix("data", destination) == TransferReport(transferred=0, skipped=3)

    (destination / "a/b.jpg").write_bytes(b"BEE")  # same size, local edit
    assert storage.download_prefix("data", destination) == TransferReport(transferred=1, skipped=2)
    assert (destination / "a/b.jpg").read_bytes() == b"bee"


def test_a_download_that_does_not_match_the_listed_md5_is_refused(
    s3_admin: BaseClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's own response checksums are off (speed): the listing's MD5 catches a corrupted transfer."""
    bucket = new_bucket_name()
    s3_admin.create_bucket(Bucket=bucket)
    storage = S3Storage(bucket)
    storage.write_bytes("data/a.jpg", b"the real bytes")
    storage.write_bytes("data/b.jpg", b"fine")
    real_read = S3Storage.read_bytes
    corrupted = {"data/a.jpg": b"the fake bytes"}  # same size, other content
    monkeypatch.setattr(S3Storage, "read_bytes", lambda self, key: corrupted.get(key) or real_read(self, key))
    with pytest.raises(StorageError, match="'data/a.jpg'.*does not match its stored MD5"):
        storage.download_prefix("data", tmp_path / "downloaded")
    assert not (tmp_path / "downloaded" / "a.jpg").exists() and partial_files(tmp_path / "downloaded") == []


def test_download_prefix_with_nothing_stored_is_an_error(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageNotFoundError, match="no-such-prefix"):
        storage.download_prefix("no-such-prefix", tmp_path / "out")


def test_upload_folder_of_missing_folder_is_an_error(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageNotFoundError, match="not-there"):
        storage.upload_folder(tmp_path / "not-there", "data")


def test_failed_download_leaves_no_file_under_final_name(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    with pytest.raises(StorageNotFoundError):
        storage.download_file("missing.bin", folder / "missing.bin")
    assert not (folder / "missing.bin").exists()
    assert partial_files(tmp_path) == []

    storage.write_bytes("model.bin", b"new weights" * 1000)
    destination = folder / "model.bin"
    folder.mkdir(exist_ok=True)
    destination.write_bytes(b"old weights")

    def fail_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.download_file("model.bin", destination)
    monkeypatch.undo()

    assert destination.read_bytes() == b"old weights"
    assert partial_files(tmp_path) == []


def test_resync_with_trusted_digests_reads_no_file_and_still_sees_edits(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, content in {"data/a.jpg": b"aaa", "data/b/c.jpg": b"ccc"}.items():
        storage.write_bytes(key, content)
    destination = tmp_path / "downloaded"
    storage.download_prefix("data", destination)
    long_ago = time.time() - 60
    for path in [destination / "a.jpg", destination / "b/c.jpg"]:
        os.utime(path, (long_ago, long_ago))  # as after a download that finished a minute ago
    assert storage.download_prefix("data", destination) == TransferReport(transferred=0, skipped=2)

    digest_file = xray.storage._digest_file

    def refuse_local_copies(path: Path) -> object:
        assert destination not in path.parents, f"hashed {path} again although its digest is cached"
        return digest_file(path)  # a local store hashes its own side: it keeps no MD5s

    monkeypatch.setattr(xray.storage, "_digest_file", refuse_local_copies)
    assert storage.download_prefix("data", destination) == TransferReport(transferred=0, skipped=2)
    monkeypatch.undo()

    (destination / "a.jpg").write_bytes(b"AAA")  # same size, new mtime
    assert storage.download_prefix("data", destination) == TransferReport(transferred=1, skipped=1)
    assert (destination / "a.jpg").read_bytes() == b"aaa"


def test_downloads_are_synced_once_per_batch_and_a_failure_leaves_no_final_file(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(6):
        storage.write_bytes(f"data/{index}.jpg", b"x" * (index + 1))
    syncs = []
    monkeypatch.setattr(xray.storage, "_sync_filesystem", syncs.append)
    destination = tmp_path / "downloaded"
    assert storage.download_prefix("data", destination, workers=3).transferred == 6
    assert len(syncs) == 1

    storage.write_bytes("data/6.jpg", b"new")
    original_read = type(storage).read_bytes

    def fail_on_one(self: Storage, key: str) -> bytes:
        if key.endswith("6.jpg"):
            raise StorageError("connection reset")
        return original_read(self, key)

    (destination / "0.jpg").write_bytes(b"?")  # changed: downloaded again in the failing batch
    monkeypatch.setattr(type(storage), "read_bytes", fail_on_one)
    with pytest.raises(StorageError, match="connection reset"):
        storage.download_prefix("data", destination, workers=1)
    assert not (destination / "6.jpg").exists()
    assert (destination / "0.jpg").read_bytes() in (b"?", b"x")  # old or new, never half-written
    assert partial_files(tmp_path) == []


# --- S3 specifics -------------------------------------------------------------------------------


def test_missing_bucket_is_named_by_every_operation(s3_admin: BaseClient, tmp_path: Path) -> None:
    bucket = new_bucket_name()
    storage = S3Storage(bucket, prefix="runs")
    folder = tmp_path / "folder"
    write_tree(folder, {"a.txt": b"a"})
    attempts = {
        "read_bytes": lambda: storage.read_bytes("a.txt"),
        "write_bytes": lambda: storage.write_bytes("a.txt", b"a"),
        "list": lambda: storage.list(),
        "exists": lambda: storage.exists("a.txt"),
        "upload_file": lambda: storage.upload_file(folder / "a.txt", "a.txt"),
        "download_file": lambda: storage.download_file("a.txt", tmp_path / "a.txt"),
        "upload_folder": lambda: storage.upload_folder(folder, "x"),
        "download_prefix": lambda: storage.download_prefix("x", tmp_path / "down"),
    }
    for operation, attempt in attempts.items():
        with pytest.raises(StorageError) as raised:
            attempt()
        message = str(raised.value)
        assert f"S3 bucket '{bucket}' does not exist" in message, operation
        assert f"s3://{bucket}/runs" in message, operation
        assert not isinstance(raised.value, StorageNotFoundError), operation


@pytest.mark.parametrize("operation", ["read_bytes", "list"])
def test_missing_credentials_say_which_variables_to_set(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    storage = open_storage("s3://xray-bucket/runs")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        storage.read_bytes("a.json") if operation == "read_bytes" else storage.list()


def test_unreachable_endpoint_is_named() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    config = botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=2)
    storage = S3Storage("xray-bucket", client=boto3.client("s3", endpoint_url=endpoint, config=config))
    with pytest.raises(StorageError, match=re.escape(f"Cannot reach the S3 endpoint {endpoint}")):
        storage.list()


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, "Access denied to read 'a.json' in s3://xray-bucket"),
        ("InvalidAccessKeyId", 403, "rejected the AWS credentials"),
        ("SlowDown", 503, "SlowDown: please slow down"),
    ],
)
def test_s3_errors_are_explained_not_raw(code: str, status: int, expected: str) -> None:
    client = boto3.client("s3")
    storage = S3Storage("xray-bucket", client=client)
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "get_object", service_error_code=code, service_message="please slow down", http_status_code=status
        )
        with pytest.raises(StorageError, match=re.escape(expected)) as raised:
            storage.read_bytes("a.json")
    assert isinstance(raised.value.__cause__, ClientError)
    assert not isinstance(raised.value, StorageNotFoundError)


def test_multipart_objects_are_compared_by_sha256_metadata(tmp_path: Path) -> None:
    with mock_aws():
        admin = boto3.client("s3")
        admin.create_bucket(Bucket="xray-big")
        storage = S3Storage("xray-big")
        folder = tmp_path / "weights"
        big = bytearray(os.urandom(9 * 1024 * 1024))  # above boto3's 8 MiB multipart threshold
        write_tree(folder, {"model.bin": bytes(big)})

        assert storage.upload_folder(folder, "models") == TransferReport(transferred=1, skipped=0)
        etag = admin.head_object(Bucket="xray-big", Key="models/model.bin")["ETag"]
        assert "-" in etag, "the upload must be multipart for this test to mean anything"
        assert storage.upload_folder(folder, "models") == TransferReport(transferred=0, skipped=1)

        big[-1] ^= 0xFF  # same size, different content
        (folder / "model.bin").write_bytes(bytes(big))
        assert storage.upload_folder(folder, "models") == TransferReport(transferred=1, skipped=0)
        assert storage.download_prefix("models", folder) == TransferReport(transferred=0, skipped=1)

        # A multipart object from another tool has no sha256 metadata: it counts as changed.
        admin.upload_file(str(folder / "model.bin"), "xray-big", "models/model.bin")
        assert storage.download_prefix("models", folder) == TransferReport(transferred=1, skipped=0)
        assert (folder / "model.bin").read_bytes() == bytes(big)


def count_requests(client: BaseClient) -> Counter[str]:
    """Count the S3 operations a client sends from now on."""
    counts: Counter[str] = Counter()
    client.meta.events.register("before-call.s3", lambda model, **_: counts.update([model.name]))
    return counts


def test_small_objects_take_one_request_each_and_a_no_op_sync_only_lists(tmp_path: Path) -> None:
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="xray-small")
        storage = S3Storage("xray-small")
        requests = count_requests(storage.client)
        folder = tmp_path / "images"
        write_tree(folder, {f"NORMAL/{index}.jpeg": os.urandom(60_000) for index in range(5)})

        assert storage.upload_folder(folder, "data").transferred == 5
        assert set(requests) == {"ListObjectsV2", "PutObject"} and requests["PutObject"] == 5
        requests.clear()
        assert storage.download_prefix("data", tmp_path / "copy").transferred == 5
        assert set(requests) == {"ListObjectsV2", "GetObject"} and requests["GetObject"] == 5
        requests.clear()
        assert storage.download_prefix("data", tmp_path / "copy").skipped == 5
        assert storage.upload_folder(folder, "data").skipped == 5
        assert set(requests) == {"ListObjectsV2"}


def test_connection_pool_matches_the_worker_count() -> None:
    storage = S3Storage("xray-pool")
    assert storage.client.meta.config.max_pool_connections == DEFAULT_TRANSFER_WORKERS
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="xray-pool")
        storage.write_bytes("data/a.txt", b"a")
        storage.download_prefix("data", Path("out"), workers=DEFAULT_TRANSFER_WORKERS + 16)
    assert storage.client.meta.config.max_pool_connections == DEFAULT_TRANSFER_WORKERS + 16


def test_path_style_addressing_when_an_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (create_s3_client().meta.config.s3 or {}).get("addressing_style") != "path"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    client = create_s3_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:9000"
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.retries["mode"] == "standard"


def test_repr_shows_location_without_credentials(tmp_path: Path) -> None:
    client = boto3.client("s3", endpoint_url="http://minio-user:minio-password@127.0.0.1:9000")
    storage = S3Storage("xray-bucket", prefix="runs/7", client=client)
    assert storage.uri == "s3://xray-bucket/runs/7"
    text = repr(storage)
    assert "s3://xray-bucket/runs/7" in text and "127.0.0.1:9000" in text
    assert "minio-password" not in text and "testing-secret" not in text
    assert repr(LocalStorage(tmp_path / "store")) == f"LocalStorage({str(tmp_path / 'store')!r})"


# --- open_storage -------------------------------------------------------------------------------


def test_open_storage_plain_path_and_file_uri(tmp_path: Path) -> None:
    by_path = open_storage(str(tmp_path / "store"))
    assert isinstance(by_path, LocalStorage)
    assert by_path.uri == str(tmp_path / "store")
    assert (tmp_path / "store").is_dir()

    by_uri = open_storage(f"file://{tmp_path}/other%20store")
    assert isinstance(by_uri, LocalStorage)
    assert by_uri.root == tmp_path / "other store"


def test_open_storage_defaults_to_store_folder_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = open_storage()
    assert isinstance(default, LocalStorage) and default.root == tmp_path / "store"

    monkeypatch.setenv("XRAY_STORAGE_URI", "s3://xray-bucket/env/prefix")
    from_environment = open_storage()
    assert isinstance(from_environment, S3Storage)
    assert from_environment.uri == "s3://xray-bucket/env/prefix"


def test_open_storage_s3_uri() -> None:
    storage = open_storage("s3://xray-bucket/some/prefix/")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.uri) == (
        "xray-bucket",
        "some/prefix",
        "s3://xray-bucket/some/prefix",
    )
    assert open_storage("s3://xray-bucket").uri == "s3://xray-bucket"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("gs://bucket/data", "Unsupported storage scheme 'gs'"),
        ("http://example.com/store", "Unsupported storage scheme 'http'"),
        ("s3://", "names no bucket"),
        ("s3://bucket/../escape", "not allowed"),
        ("file://somehost/store", "must be absolute"),
    ],
)
def test_open_storage_rejects_bad_uris(uri: str, expected: str) -> None:
    with pytest.raises(StorageError, match=re.escape(expected)):
        open_storage(uri)


# --- conditional writes: the training lease and the production pointer ------------------------------


def test_create_if_absent_lets_exactly_one_writer_in(storage: Storage) -> None:
    first = storage.write_bytes_if_absent("jobs/lease.json", b"first")
    assert first is not None
    assert storage.write_bytes_if_absent("jobs/lease.json", b"second") is None
    assert storage.read_bytes_with_etag("jobs/lease.json") == (b"first", first)
    assert storage.list("jobs") == ["jobs/lease.json"]  # no lock file or temporary file shows up


def test_replace_and_delete_only_while_the_etag_still_matches(storage: Storage) -> None:
    first = storage.write_bytes_if_absent("pointer.json", b"v1")
    second = storage.write_bytes_if_match("pointer.json", b"v2", first)
    assert second is not None and second != first
    assert storage.write_bytes_if_match("pointer.json", b"stale", first) is None
    assert storage.read_bytes("pointer.json") == b"v2"
    assert storage.delete_if_match("pointer.json", first) is False
    assert storage.exists("pointer.json")
    assert storage.delete_if_match("pointer.json", second) is True
    assert not storage.exists("pointer.json")
    assert storage.write_bytes_if_match("pointer.json", b"gone", second) is None
    assert storage.delete_if_match("pointer.json", second) is False
    storage.write_bytes("old.json", b"x")
    storage.delete("old.json")
    storage.delete("old.json")
    assert not storage.exists("old.json")


def test_racing_local_writers_one_wins(tmp_path: Path) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    storage = LocalStorage(tmp_path / "store")
    etag = storage.write_bytes_if_absent("pointer.json", b"base")
    barrier = threading.Barrier(8)

    def replace(index: int) -> str | None:
        barrier.wait()
        return LocalStorage(tmp_path / "store").write_bytes_if_match("pointer.json", f"w{index}".encode(), etag)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(replace, range(8)))
    assert sum(result is not None for result in results) == 1


def test_short_timeouts_keep_bucket_prefix_and_endpoint(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    boto3.client("s3").create_bucket(Bucket=(bucket := new_bucket_name()))
    quick = S3Storage(bucket, prefix="p").with_timeouts(2, attempts=1)
    assert quick.client.meta.config.connect_timeout == 2 and quick.client.meta.config.retries["total_max_attempts"] == 1
    quick.write_bytes("k", b"v")
    assert S3Storage(bucket, prefix="p").read_bytes("k") == b"v"

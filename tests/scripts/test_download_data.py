"""scripts/download_data.py against a loopback HTTP server serving archives built here.

Nothing leaves 127.0.0.1: every run passes --url, and proxies are switched off.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_script

dd = load_script("download_data")


class FileHandler(BaseHTTPRequestHandler):
    """Serves `server.files` by path; honours `Range: bytes=N-` like a real file host."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    httpd.files, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def serve(httpd: ThreadingHTTPServer, path: str, body: bytes) -> str:
    httpd.files[path] = body
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


KERMANY_ENTRIES = {
    "chest_xray/train/NORMAL/IM-0115-0001.jpeg": b"\xff\xd8 normal train",
    "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg": b"\xff\xd8 pneumonia train",
    "chest_xray/test/NORMAL/IM-0001-0001.jpeg": b"\xff\xd8 normal test",
    "chest_xray/test/PNEUMONIA/person100_virus_184.jpeg": b"\xff\xd8 pneumonia test",
    "chest_xray/val/PNEUMONIA/person1946_bacteria_4874.jpeg": b"\xff\xd8 pneumonia val",
    # macOS litter and stray files the real archive may carry: skipped
    "__MACOSX/chest_xray/train/NORMAL/._IM-0115-0001.jpeg": b"resource fork",
    "chest_xray/train/NORMAL/.DS_Store": b"finder",
    "chest_xray/README.txt": b"not an image",
}
KERMANY_ZIP = make_zip(KERMANY_ENTRIES)


def files_under(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def run_script(url: str, tmp_path: Path, *extra: str, source: str = "kermany") -> int:
    return dd.main(
        ["--source", source, "--url", url, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
        + list(extra)
    )


def assert_nothing_left(tmp_path: Path) -> None:
    """No output folder, no half-unpacked folder, no download left in the cache."""
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".*partial")) == []
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_kermany_zip_is_laid_out_by_split_and_class(server, tmp_path):
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)

    assert run_script(url, tmp_path, "--sha256", sha256(KERMANY_ZIP)) == 0

    assert files_under(tmp_path / "out") == {
        "train/NORMAL/IM-0115-0001.jpeg": b"\xff\xd8 normal train",
        "train/PNEUMONIA/person1_bacteria_1.jpeg": b"\xff\xd8 pneumonia train",
        "test/NORMAL/IM-0001-0001.jpeg": b"\xff\xd8 normal test",
        "test/PNEUMONIA/person100_virus_184.jpeg": b"\xff\xd8 pneumonia test",
        "val/PNEUMONIA/person1946_bacteria_4874.jpeg": b"\xff\xd8 pneumonia val",
    }
    assert list(tmp_path.glob(".*partial")) == []
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # archive removed after unpacking


def test_merge_val_puts_val_images_into_train(server, tmp_path):
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)

    assert run_script(url, tmp_path, "--sha256", sha256(KERMANY_ZIP), "--merge-val") == 0

    files = files_under(tmp_path / "out")
    assert "train/PNEUMONIA/person1946_bacteria_4874.jpeg" in files
    assert not (tmp_path / "out" / "val").exists()


def test_pneumoniamnist_npz_becomes_pngs(server, tmp_path):
    generator = np.random.default_rng(0)
    arrays = {}
    for split, labels in {"train": [0, 1, 1], "val": [0], "test": [1, 0]}.items():
        arrays[f"{split}_images"] = generator.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8).reshape(-1, 1)  # MedMNIST's (n, 1)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    url = serve(server, "/pneumoniamnist.npz", buffer.getvalue())

    code = run_script(url, tmp_path, "--sha256", sha256(buffer.getvalue()), source="pneumoniamnist")

    assert code == 0
    out = tmp_path / "out"
    counts = {f"{p.parent.parent.name}/{p.parent.name}": 0 for p in out.glob("*/*/*.png")}
    for path in out.glob("*/*/*.png"):
        counts[f"{path.parent.parent.name}/{path.parent.name}"] += 1
    assert counts == {"train/NORMAL": 1, "train/PNEUMONIA": 2, "val/NORMAL": 1, "test/NORMAL": 1, "test/PNEUMONIA": 1}
    first = out / "train" / "PNEUMONIA" / "pneumoniamnist_train_00001.png"
    assert np.array_equal(np.asarray(Image.open(first)), arrays["train_images"][1])


def test_checksum_mismatch_fails_clearly_and_leaves_nothing(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="download_data")
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)

    assert run_script(url, tmp_path, "--sha256", "0" * 64) == 1

    assert "checksum mismatch" in caplog.text
    assert f"expected sha256:{'0' * 64}, got sha256:{sha256(KERMANY_ZIP)}" in caplog.text
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("evil", ["../evil.jpeg", "chest_xray/train/NORMAL/../../../../evil.jpeg", "/tmp/evil.jpeg"])
def test_zip_path_traversal_is_refused(server, tmp_path, caplog, evil):
    archive = make_zip({"chest_xray/train/NORMAL/IM-0001-0001.jpeg": b"fine", evil: b"payload"})
    url = serve(server, "/ChestXRay2017.zip", archive)

    assert run_script(url, tmp_path, "--sha256", sha256(archive)) == 1

    assert "path traversal" in caplog.text
    assert_nothing_left(tmp_path)
    assert not (tmp_path / "evil.jpeg").exists()


def test_no_known_checksum_refuses_before_downloading(server, tmp_path, caplog):
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)

    assert run_script(url, tmp_path) == 1

    assert "--sha256" in caplog.text and "--no-verify" in caplog.text
    assert server.requests == []


def test_no_verify_downloads_and_logs_the_sha256(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="download_data")
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)

    assert run_script(url, tmp_path, "--no-verify") == 0

    assert sha256(KERMANY_ZIP) in caplog.text
    assert (tmp_path / "out" / "train" / "NORMAL" / "IM-0115-0001.jpeg").is_file()


def test_a_partial_download_resumes(server, tmp_path):
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    half = len(KERMANY_ZIP) // 2
    (downloads / (dd._cache_name(dd.KERMANY, url) + ".part")).write_bytes(KERMANY_ZIP[:half])

    assert run_script(url, tmp_path, "--sha256", sha256(KERMANY_ZIP)) == 0

    assert server.requests == [("/ChestXRay2017.zip", f"bytes={half}-")]
    assert len(files_under(tmp_path / "out")) == 5


def test_existing_output_needs_force(server, tmp_path):
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")

    assert run_script(url, tmp_path, "--sha256", sha256(KERMANY_ZIP)) == 1
    assert server.requests == []
    assert run_script(url, tmp_path, "--sha256", sha256(KERMANY_ZIP), "--force") == 0
    assert "old.txt" not in files_under(tmp_path / "out")


def test_upload_runs_the_cli_on_the_output(server, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dd.subprocess, "run", lambda command, **kwargs: calls.append((command, kwargs)))
    url = serve(server, "/ChestXRay2017.zip", KERMANY_ZIP)

    assert run_script(url, tmp_path, "--sha256", sha256(KERMANY_ZIP), "--upload") == 0

    [(command, kwargs)] = calls
    assert command == [sys.executable, "-m", "xray", "upload-data", str((tmp_path / "out").resolve())]
    assert kwargs["check"] is True

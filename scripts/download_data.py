#!/usr/bin/env python3
"""Download a public chest X-ray data set and lay it out as OUT/<split>/<CLASS>/<image>,
the layout `python -m xray upload-data` and the ingestion stage read.

Sources
  kermany         ChestXRay2017.zip of Kermany, Zhang and Goldbaum (2018), Mendeley Data
                  v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0: 5,856 JPEGs, about 1.2 GB,
                  laid out as chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg. Its
                  splits are kept (a `val` folder, where an archive has one, stays
                  `val` unless --merge-val).
                  This script knows no checksum for it (none could be confirmed from
                  the publisher): pass --sha256 of a copy you trust, or --no-verify
                  (the script then logs the archive's sha256, to pin it next time).
  pneumoniamnist  MedMNIST v2 PneumoniaMNIST (Zenodo record 10519652, CC BY 4.0), the
                  same images centre-cropped and resized (28 px by default; --size 64,
                  128 or 224), as one .npz with train/val/test arrays (labels 0 normal,
                  1 pneumonia), written out as PNGs. Checksums are built in.

The download is streamed to a cache folder (a broken download resumes where it
stopped), verified, and only then unpacked, into a temporary folder that becomes OUT
when everything is written: a failed run leaves no OUT behind. OUT defaults to a folder
in the cache, outside the repository (the full sets are large and not for git).
--upload then copies OUT into storage ($XRAY_STORAGE_URI) with `python -m xray
upload-data OUT`.

Examples
  python scripts/download_data.py --source pneumoniamnist --size 224
  python scripts/download_data.py --source kermany --sha256 <hex> --out /srv/xray/kermany
  XRAY_STORAGE_URI=s3://bucket/xray python scripts/download_data.py --source kermany --no-verify --upload

Licence: both sets are CC BY 4.0; cite Kermany D., Zhang K., Goldbaum M. (2018),
doi:10.17632/rscbjbr9sj.2 (and, for PneumoniaMNIST, Yang J. et al. (2023), MedMNIST v2,
Scientific Data 10, 41).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger("download_data")

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
CLASSES = ("NORMAL", "PNEUMONIA")  # PneumoniaMNIST labels: 0 normal, 1 pneumonia
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
USER_AGENT = "xray-download-data/1.0 (python-urllib)"
CHUNK = 1 << 20


class DownloadError(Exception):
    """A failure to report to the user as one clear line."""


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # "sha256" or "md5"
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


@dataclass(frozen=True)
class Dataset:
    name: str  # the default output folder's name
    url: str
    filename: str
    checksum: Checksum | None
    kind: str  # "zip" or "npz"


KERMANY = Dataset(
    name="kermany",
    # The "ChestXRay2017.zip" file of the Mendeley record; this address redirects to
    # the file on S3.
    url=(
        "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
        "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"
    ),
    filename="ChestXRay2017.zip",
    checksum=None,
    kind="zip",
)


def _pneumoniamnist(size: int, checksum: Checksum) -> Dataset:
    name = "pneumoniamnist" if size == 28 else f"pneumoniamnist_{size}"
    url = f"https://zenodo.org/records/10519652/files/{name}.npz?download=1"
    return Dataset(name, url, f"{name}.npz", checksum, "npz")


# 28 px: the sha256 that TensorFlow Datasets records for this file (its md5,
# 28209eda62fecd6e6a2d98b1501bb15f, is the one MedMNIST publishes). Larger sizes: the
# md5 sums that MedMNIST publishes in medmnist/info.py.
PNEUMONIAMNIST = {
    28: _pneumoniamnist(28, Checksum("sha256", "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8")),
    64: _pneumoniamnist(64, Checksum("md5", "8f4eceb4ccffa70c672198ea285246c6")),
    128: _pneumoniamnist(128, Checksum("md5", "05b46931834c231683c68f40c47b2971")),
    224: _pneumoniamnist(224, Checksum("md5", "d6a3c71de1b945ea11211b03746c1fe1")),
}


# --------------------------------------------------------------------------- download


def _cache_name(dataset: Dataset, url: str) -> str:
    """The cache file for this download; another URL gets another file."""
    if url == dataset.url:
        return dataset.filename
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{dataset.filename}"


def _opener() -> urllib.request.OpenerDirector:
    # Built per call so that proxy settings are read from the environment now.
    return urllib.request.build_opener()


def download(url: str, dest: Path, *, timeout: float) -> Path:
    """Stream `url` into `dest`, resuming from `dest`.part when a server allows it."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        log.info("resuming %s at %s", part, _size(offset))
    request = urllib.request.Request(url, headers=headers)
    try:
        response = _opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Nothing left to send: the partial file is complete (the checksum decides).
            error.close()
            part.replace(dest)
            return dest
        raise DownloadError(f"download failed: HTTP {error.code} {error.reason} from {url}") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"download failed: {url}: {error}") from error

    with response:
        if offset and response.status == 206:
            if _range_start(response) != offset:
                part.unlink()
                raise DownloadError(
                    f"the server answered the resume request with another range; discarded {part}, run again"
                )
            mode = "ab"
        else:
            if offset:
                log.info("the server sent the whole file; starting again")
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        log.info("downloading %s (%s) to %s", url, _size(total) if total else "size unknown", dest)
        done, last_report = offset, time.monotonic()
        try:
            with open(part, mode) as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if time.monotonic() - last_report >= 5:
                        last_report = time.monotonic()
                        share = f" ({100 * done / total:.0f}%)" if total else ""
                        log.info("  %s%s", _size(done), share)
        except OSError as error:
            raise DownloadError(
                f"download interrupted after {_size(done)}: {error}; run again to resume from {part}"
            ) from error
    if total is not None and done != total:
        raise DownloadError(
            f"download incomplete: got {_size(done)} of {_size(total)}; run again to resume from {part}"
        )
    part.replace(dest)
    log.info("downloaded %s", _size(done))
    return dest


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: Checksum | None, url: str) -> None:
    """Check `path` against `expected`; on a mismatch delete it and raise."""
    if expected is None:
        log.warning(
            "NOT VERIFIED (--no-verify): %s has sha256 %s; pass --sha256 with it next time",
            path.name,
            file_digest(path, "sha256"),
        )
        return
    actual = file_digest(path, expected.algorithm)
    if actual != expected.hexdigest:
        path.unlink()
        raise DownloadError(
            f"checksum mismatch for {url}: expected {expected}, got {expected.algorithm}:{actual}. "
            "The download was deleted and nothing was unpacked. If the publisher changed the file "
            "on purpose, pass its new checksum with --sha256 (or --md5)."
        )
    log.info("checksum ok (%s)", expected)


# ----------------------------------------------------------------------------- unpack


def _check_member(info: zipfile.ZipInfo) -> None:
    """Refuse entries that could write outside the output folder."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise DownloadError(
            f"refusing the archive: entry {info.filename!r} points outside the output folder "
            "(path traversal); nothing was unpacked"
        )
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise DownloadError(f"refusing the archive: entry {info.filename!r} is a symbolic link; nothing was unpacked")


def _locate(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, CLASS) for an entry like any/prefix/<split>/<CLASS>/<file>, else None."""
    if len(parts) < 3:
        return None
    split, cls = parts[-3].lower(), parts[-2].upper()
    if split in SPLITS and cls in CLASSES:
        return split, cls
    return None


def unpack_zip(archive: Path, staging: Path, *, merge_val: bool) -> Counter:
    counts: Counter = Counter()
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:  # every entry is checked before anything is written
            _check_member(info)
        for info in members:
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.is_dir() or "__MACOSX" in parts or parts[-1].startswith("."):
                continue
            where = _locate(parts)
            if where is None or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                log.debug("skipping %s", info.filename)
                continue
            split, cls = where
            if split == "val" and merge_val:
                split = "train"
            target = staging / split / cls / parts[-1]
            if target.exists():
                raise DownloadError(f"two archive entries would both be written to {split}/{cls}/{parts[-1]}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            counts[split, cls] += 1
    if not counts:
        raise DownloadError(f"no images laid out as <split>/<CLASS>/<image> in {archive.name}")
    return counts


def unpack_npz(archive: Path, staging: Path) -> Counter:
    import numpy as np
    from PIL import Image

    counts: Counter = Counter()
    with np.load(archive, allow_pickle=False) as data:
        wanted = [f"{split}_{what}" for split in SPLITS for what in ("images", "labels")]
        missing = [key for key in wanted if key not in data.files]
        if missing:
            raise DownloadError(f"{archive.name} lacks {', '.join(missing)} (it has {', '.join(data.files)})")
        for split in SPLITS:
            images = data[f"{split}_images"]
            labels = data[f"{split}_labels"].reshape(-1)
            if len(images) != len(labels):
                raise DownloadError(f"{archive.name}: {len(images)} {split} images but {len(labels)} labels")
            for cls in CLASSES:
                (staging / split / cls).mkdir(parents=True, exist_ok=True)
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                if int(label) not in (0, 1):
                    raise DownloadError(f"{archive.name}: {split} image {index} has label {label}, expected 0 or 1")
                cls = CLASSES[int(label)]
                name = f"pneumoniamnist_{split}_{index:05d}.png"
                Image.fromarray(np.asarray(image, dtype=np.uint8)).save(staging / split / cls / name)
                counts[split, cls] += 1
    return counts


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, choices=("kermany", "pneumoniamnist"))
    parser.add_argument("--out", type=Path, help="output folder (default: <cache dir>/data/<data set>)")
    parser.add_argument("--url", help="download from here instead (a mirror); the checksum still applies")
    parser.add_argument(
        "--size", type=int, choices=sorted(PNEUMONIAMNIST), help="pneumoniamnist image size (default 28)"
    )
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--sha256", help="expected sha256 of the downloaded file")
    check.add_argument("--md5", help="expected md5 of the downloaded file")
    check.add_argument("--no-verify", action="store_true", help="skip the checksum (logs the file's sha256)")
    parser.add_argument("--merge-val", action="store_true", help="kermany: put the val images into train")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xray",
        help="where downloads (and partial ones) are kept (default: %(default)s)",
    )
    parser.add_argument("--keep-archive", action="store_true", help="keep the downloaded file in the cache")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--upload", action="store_true", help="then run `python -m xray upload-data OUT`")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    args = parser.parse_args(argv)
    if args.size is not None and args.source != "pneumoniamnist":
        parser.error("--size applies to --source pneumoniamnist only")
    if args.merge_val and args.source != "kermany":
        parser.error("--merge-val applies to --source kermany only")
    for name, length in (("sha256", 64), ("md5", 32)):
        value = getattr(args, name)
        if value is not None and not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value.strip()):
            parser.error(f"--{name} takes {length} hexadecimal digits")
    return args


def _expected_checksum(args: argparse.Namespace, dataset: Dataset) -> Checksum | None:
    if args.sha256:
        return Checksum("sha256", args.sha256.strip().lower())
    if args.md5:
        return Checksum("md5", args.md5.strip().lower())
    if args.no_verify:
        return None
    if dataset.checksum is None:
        raise DownloadError(
            f"no checksum is known for --source {args.source}: pass --sha256 with the sha256 of a copy "
            "you trust, or --no-verify to download without checking (the sha256 is then logged)"
        )
    return dataset.checksum


def run(args: argparse.Namespace) -> Path:
    dataset = KERMANY if args.source == "kermany" else PNEUMONIAMNIST[args.size or 28]
    url = args.url or dataset.url
    expected = _expected_checksum(args, dataset)
    # Not inside the repository by default: the full sets are large and not for git.
    out = (args.out or args.cache_dir / "data" / dataset.name).resolve()
    if out.exists() and not out.is_dir():
        raise DownloadError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise DownloadError(
            f"{out} exists and is not empty: pass --force to replace it"
            + (f", or upload it as it is with `python -m xray upload-data {out}`" if args.upload else "")
        )

    downloads = args.cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / _cache_name(dataset, url)
    if archive.exists():
        log.info("using the cached %s", archive)
    else:
        download(url, archive, timeout=args.timeout)
    verify(archive, expected, url)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        log.info("unpacking into %s", out)
        if dataset.kind == "zip":
            counts = unpack_zip(archive, staging, merge_val=args.merge_val)
        else:
            counts = unpack_npz(archive, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, DownloadError) and not args.keep_archive:
            archive.unlink()  # its content is unusable: do not reuse it from the cache
        raise
    for (split, cls), n in sorted(counts.items()):
        log.info("  %s/%s: %d images", split, cls, n)
    if not args.keep_archive:
        archive.unlink()

    if args.upload:
        command = [sys.executable, "-m", "xray", "upload-data", str(out)]
        log.info("uploading: %s", shlex.join(command))
        try:
            subprocess.run(command, check=True, cwd=REPO_ROOT)
        except (OSError, subprocess.CalledProcessError) as error:
            raise DownloadError(
                f"upload failed ({error}); the data is in {out}: run `python -m xray upload-data {out}` again"
            ) from error
    log.info("done: %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run(parse_args(argv))
    except DownloadError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume the download")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

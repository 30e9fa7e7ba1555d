"""``clip-etl manifest SRC -o manifest.parquet``: a manifest from a folder of images, for one-off runs.

``SRC`` is a local folder or an ``s3://bucket/prefix``, listed recursively. Every image (by
extension: :data:`IMAGE_EXTENSIONS`, any case) becomes one row that ``clip-etl run
input.path=manifest.parquet`` reads as it is:

- ``id``: the image's path relative to ``SRC`` with ``/`` separators (``2024/cat_01.jpg``), so
  the same folder always gives the same ids, whatever order the files were listed in, and a
  local copy and an S3 copy of a folder give the same ids;
- ``image``: the absolute local path or the full ``s3://`` URI;
- ``text``: the sidecar caption ``name.txt`` beside ``name.jpg`` (UTF-8, stripped), null when
  there is none or it is blank;
- ``width``, ``height``: from the image header (PIL opens the file without decoding pixels);
  null when the header cannot be read, or when sizes are not probed. An unreadable image still
  gets its row: the job reports it as that row's error;
- ``bytes``: the file size.

Why it streams: a folder may hold millions of images. Files are listed lazily (``os.scandir``
one directory at a time, S3 ``ListObjectsV2`` one page at a time), described in batches in a
small thread pool, and each batch is written as one Parquet row group; nothing holds the whole
listing. Both listings are in the same order, the lexicographic order of the relative paths
(S3's own order; locally each directory's entries are sorted, a folder as ``name/``). In that
order every key that starts with ``name.`` lies between ``name.jpg`` and ``name.txt``, so a
sidecar is found with a window of the few keys in between (:func:`pair_captions`).

Sizes on S3 cost one ranged GET of the first :data:`PROBE_BYTES` per image, so they are off by
default there (``--probe-size`` turns them on) and on by default for local folders. A header
that does not fit in those bytes (a JPEG with a very large EXIF block) gives a null size.

Names starting with ``.`` (hidden files and folders, ``._name.jpg`` resource forks) are skipped,
and so, with a warning, are local names that are not valid UTF-8 (a manifest cannot hold them);
symbolic links to folders are not followed (no cycles). S3 access goes through
:mod:`pipelines.storage`, configured like the jobs: the ``s3`` section of ``-c CONFIG``, then
``--s3-endpoint-url``, then the standard AWS environment. The output (local or ``s3://``) is
published whole or not at all, and an existing one is only replaced with ``--force``.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
import tempfile
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage as pio
from pipelines.storage import S3Options

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_SUFFIX = ".txt"
# Bytes fetched from the start of an S3 image to read its header (width, height).
PROBE_BYTES = 64 * 1024
# Keys per ListObjectsV2 page (S3's maximum).
LIST_PAGE_KEYS = 1000
DEFAULT_BATCH_ROWS = 10_000
DEFAULT_THREADS = 16

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.string(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes", pa.int64()),
])


class ManifestBuildError(RuntimeError):
    """The manifest cannot be built as asked (no images, output exists); the message says why."""


@dataclass(frozen=True)
class Listed:
    """One file of the listing."""

    key: str  # path relative to SRC, "/"-separated: the row id and the sort key
    uri: str  # absolute local path or full s3:// URI
    size: int | None  # bytes; None when a local stat failed


@dataclass
class Summary:
    """What a build wrote, for the final report line and for callers."""

    rows: int = 0
    captions: int = 0
    unreadable: int = 0  # images whose header could not be read (when sizes are probed)
    total_bytes: int = 0


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------
def _sorted_entries(folder: str) -> list[tuple[str, os.DirEntry]]:
    """A directory's visible entries sorted as their paths sort in a flat listing: a folder
    ``name`` sorts as ``name/``, so a depth-first walk yields paths in lexicographic order."""
    with os.scandir(folder) as it:
        entries = [e for e in it if not e.name.startswith(".") and _utf8(e)]
    keyed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        keyed.append((entry.name + "/" if is_dir else entry.name, entry))
    keyed.sort(key=lambda pair: pair[0])
    return keyed


def _utf8(entry: os.DirEntry) -> bool:
    """False (and a warning) for a name that is not valid UTF-8: a manifest cannot store it."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        print(f"[manifest] skipped, name is not UTF-8: {os.fsencode(entry.path)!r}", file=sys.stderr)
        return False
    return True


def walk_local(root: str) -> Iterator[Listed]:
    """Files under the local folder ``root``, recursively, in lexicographic order of their
    relative paths; only one directory's entries are held per level. Checks ``root`` at once."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ManifestBuildError(f"not a folder: {root}")

    def walk(folder: str, prefix: str) -> Iterator[Listed]:
        for sort_name, entry in _sorted_entries(folder):
            if sort_name.endswith("/"):
                yield from walk(entry.path, prefix + sort_name)
                continue
            try:
                if not entry.is_file():
                    continue
                size: int | None = entry.stat().st_size
            except OSError:
                size = None  # a dangling link or a file that vanished: still listed, the job reports it
            yield Listed(prefix + entry.name, entry.path, size)

    return walk(root, "")


def _s3_root(src: str) -> tuple[str, str, str]:
    """``s3://bucket/prefix`` -> (scheme, bucket, key prefix ending in ``/`` or empty)."""
    scheme, rest = src.split("://", 1)
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ManifestBuildError(f"no bucket in {src}")
    prefix = prefix.strip("/")
    return scheme, bucket, prefix + "/" if prefix else ""


def walk_s3(src: str, s3: S3Options | None = None) -> Iterator[Listed]:
    """Objects under ``s3://bucket/prefix``, one ``ListObjectsV2`` page at a time,
    in S3's lexicographic key order; keys with a hidden path part are skipped."""
    scheme, bucket, prefix = _s3_root(src)
    fs = pio.fsspec_filesystem(src, s3)
    token: str | None = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE_KEYS}
        if token:
            kwargs["ContinuationToken"] = token
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            rel = key[len(prefix):]
            if not rel or rel.endswith("/") or any(part.startswith(".") for part in rel.split("/")):
                continue  # folder markers and hidden files
            yield Listed(rel, f"{scheme}://{bucket}/{key}", int(obj.get("Size", 0)))
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")
        if not token:
            raise ManifestBuildError(f"the listing of {src} was cut short without a continuation token")


def list_source(src: str, s3: S3Options | None = None) -> Iterator[Listed]:
    """The files under ``src`` (local folder or ``s3://`` prefix), sorted by relative path."""
    return walk_s3(src, s3) if pio.is_s3(src) else walk_local(src)


# --------------------------------------------------------------------------------------------
# Pairing images with their captions
# --------------------------------------------------------------------------------------------
def is_image(key: str) -> bool:
    return posixpath.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def caption_key(image_key: str) -> str:
    """``a/name.jpg`` -> ``a/name.txt``: the sidecar that holds the image's caption."""
    return posixpath.splitext(image_key)[0] + CAPTION_SUFFIX


def _stem_prefix(key: str) -> str:
    """``a/name.txt`` -> ``a/name.``: every key of the same stem starts with this."""
    return posixpath.splitext(key)[0] + "."


@dataclass
class _Waiting:
    """An image whose caption is not known yet: decided once the listing reaches its caption key."""

    image: Listed
    caption_key: str
    decided: bool = False
    caption: Listed | None = None


def pair_captions(listing: Iterable[Listed]) -> Iterator[tuple[Listed, Listed | None]]:
    """(image, its sidecar caption file or None) for every image, in listing order.

    ``listing`` must be sorted by key. Image ``name.jpg`` and caption ``name.txt`` both start with
    ``name.``, and in sorted order all keys with that prefix are contiguous, so only the keys
    inside the current prefix range are held: images wait until the listing has reached their
    caption key (``name.webp`` sorts after ``name.txt``: at once), and a caption is forgotten
    once the listing has left its ``name.`` range.
    """
    pending: deque[_Waiting] = deque()  # in listing order
    captions: dict[str, Listed] = {}  # caption files whose prefix range the listing may still be in
    previous: str | None = None

    for item in listing:
        key = item.key
        if previous is not None and key < previous:
            raise ManifestBuildError(f"the listing is not sorted ({key!r} after {previous!r}); cannot pair captions")
        previous = key
        if key.endswith(CAPTION_SUFFIX):
            captions[key] = item
        if is_image(key):
            pending.append(_Waiting(item, caption_key(key)))
        for waiting in pending:
            if not waiting.decided and waiting.caption_key <= key:
                waiting.decided, waiting.caption = True, captions.get(waiting.caption_key)
        while pending and pending[0].decided:
            done = pending.popleft()
            yield done.image, done.caption
        while captions:
            first = next(iter(captions))
            if first < key and not key.startswith(_stem_prefix(first)):
                del captions[first]  # no later key can share its stem
            else:
                break
    for waiting in pending:
        yield waiting.image, waiting.caption if waiting.decided else captions.get(waiting.caption_key)


# --------------------------------------------------------------------------------------------
# Describing one image
# --------------------------------------------------------------------------------------------
class _Reader:
    """Reads images and captions from the source's storage: local files directly, S3 through
    the retrying client of :mod:`pipelines.storage` (safe to share between threads)."""

    def __init__(self, src: str, s3: S3Options | None):
        self.fs = pio.fsspec_filesystem(src, s3) if pio.is_s3(src) else None

    def head(self, uri: str, size: int | None) -> bytes:
        """The first :data:`PROBE_BYTES` of an S3 object (its whole body when smaller)."""
        end = PROBE_BYTES if size is None else min(PROBE_BYTES, size)
        return self.fs.cat_file(pio.strip_scheme(uri), start=0, end=end) if end > 0 else b""

    def whole(self, item: Listed) -> bytes:
        if self.fs is None:
            with open(item.uri, "rb") as f:
                return f.read()
        if not item.size:
            return b""
        return self.fs.cat_file(pio.strip_scheme(item.uri), start=0, end=item.size)  # no extra HEAD


def _image_size(source) -> tuple[int, int] | None:
    """(width, height) from an image header, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(source) as im:
            width, height = im.size
    except Exception:  # not an image, truncated, unsupported, a decompression bomb: no size
        return None
    return int(width), int(height)


def _caption_text(reader: _Reader, caption: Listed | None) -> str | None:
    """The sidecar's text, stripped; None when there is none, it is blank or cannot be read."""
    if caption is None:
        return None
    try:
        raw = reader.whole(caption)
    except OSError:
        return None
    text = raw.decode("utf-8-sig", errors="replace").strip()
    return text or None


def describe(reader: _Reader, image: Listed, caption: Listed | None, probe: bool) -> dict:
    """One manifest row; reading problems become nulls, never exceptions."""
    size = None
    if probe:
        if reader.fs is None:
            size = _image_size(image.uri)
        else:
            try:
                size = _image_size(BytesIO(reader.head(image.uri, image.size)))
            except OSError:
                size = None
    return {
        "id": image.key,
        "image": image.uri,
        "text": _caption_text(reader, caption),
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "bytes": image.size,
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _batches(pairs: Iterable, size: int) -> Iterator[list]:
    batch = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _publish(tmp: str, out: str, s3: S3Options | None) -> None:
    """Move the finished local file to ``out``: a rename locally, one upload to S3 (the object
    appears when the upload completes, whole)."""
    if pio.is_s3(out):
        pio.fsspec_filesystem(out, s3).put_file(tmp, pio.strip_scheme(out))
        os.unlink(tmp)
    else:
        os.replace(tmp, pio.strip_scheme(out))


def _temp_file(out: str) -> str:
    """A temporary file next to a local output (so the final rename stays on one filesystem),
    or in the system temp folder for an S3 output."""
    folder = None
    if not pio.is_s3(out):
        folder = os.path.dirname(pio.strip_scheme(out))
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-manifest-", suffix=".parquet", dir=folder)
    os.close(fd)
    return tmp


def build_manifest(
    src: str,
    out: str,
    *,
    s3: S3Options | None = None,
    probe_size: bool | None = None,
    force: bool = False,
    threads: int = DEFAULT_THREADS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """List ``src``, describe every image, and write the manifest to ``out`` (local or s3://).

    ``probe_size`` None means: on for a local folder, off for S3. ``progress`` is called after
    every written batch with the counts so far.
    """
    if batch_rows < 1 or threads < 1:
        raise ManifestBuildError("--batch-rows and --threads must be at least 1")
    if pio.exists(out, s3) and not force:
        raise ManifestBuildError(f"{out} already exists; pass --force to replace it")
    probe = (not pio.is_s3(src)) if probe_size is None else probe_size
    listing = list_source(src, s3)
    reader = _Reader(src, s3)
    summary = Summary()
    tmp = _temp_file(out)
    try:
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads) as pool, \
                pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            # headers of big or odd images: decompression-bomb and EXIF warnings, one per file
            warnings.filterwarnings("ignore", module=r"PIL\.")
            for batch in _batches(pair_captions(listing), batch_rows):
                rows = list(pool.map(lambda pair: describe(reader, pair[0], pair[1], probe), batch))
                writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
                summary.rows += len(rows)
                summary.captions += sum(r["text"] is not None for r in rows)
                summary.unreadable += sum(probe and r["width"] is None for r in rows)
                summary.total_bytes += sum(r["bytes"] or 0 for r in rows)
                if progress:
                    progress(summary)
        if summary.rows == 0:
            raise ManifestBuildError(f"no images under {src} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        _publish(tmp, out, s3)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clip-etl manifest``."""
    parser.add_argument("src", metavar="SRC",
                        help="folder of images, listed recursively: a local path or s3://bucket/prefix")
    parser.add_argument("-o", "--out", required=True,
                        help="manifest Parquet to write (local or s3://), for clip-etl run input.path=...")
    parser.add_argument("--force", action="store_true", help="replace the output if it exists")
    parser.add_argument("--probe-size", action=argparse.BooleanOptionalAction, default=None,
                        help="read each image header for width/height (default: on for local folders, off for "
                        f"S3, where it costs a ranged GET of {PROBE_BYTES // 1024} KiB per image)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"parallel header and caption reads (default {DEFAULT_THREADS})")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS,
                        help="rows per Parquet row group, described and written together "
                        f"(default {DEFAULT_BATCH_ROWS})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    parser.add_argument("-c", "--config", help="job config whose s3 section (endpoint, region, credentials) is used")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint (default: the config, else the AWS environment)")


def _s3_options(args: argparse.Namespace) -> S3Options:
    """S3 settings as the jobs build them: the config's ``s3`` section, then the endpoint flag."""
    from pipelines.config import load_config

    options = load_config(args.config).s3_options()
    if args.s3_endpoint_url:
        options.endpoint_url = args.s3_endpoint_url
    return options


class _Progress:
    """One progress line on stderr, rewritten in place after every batch (terminals only)."""

    def __init__(self, stream):
        self.stream = stream
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, summary: Summary) -> None:
        rate = summary.rows / max(time.monotonic() - self.started, 1e-9)
        self.stream.write(f"\r[manifest] {summary.rows} images, {summary.captions} with captions | {rate:.0f} images/s")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        """Finish the progress line so that the next message starts on its own line."""
        if self.shown:
            self.stream.write("\n")
            self.shown = False


def run_manifest(args: argparse.Namespace) -> int:
    """Run ``clip-etl manifest``; returns the exit status: 2 for a bad config, 1 when nothing
    was written (no images, the output exists without ``--force``), 0 otherwise."""
    from pipelines.config import ConfigError

    try:
        s3 = _s3_options(args)
    except ConfigError as e:
        print(f"clip-etl: error: {e}", file=sys.stderr)
        return 2
    progress = _Progress(sys.stderr) if not args.quiet and sys.stderr.isatty() else None
    try:
        try:
            summary = build_manifest(args.src, args.out, s3=s3, probe_size=args.probe_size, force=args.force,
                                     threads=args.threads, batch_rows=args.batch_rows, progress=progress)
        finally:
            if progress:
                progress.end()
    except ManifestBuildError as e:
        print(f"clip-etl: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        unreadable = f", {summary.unreadable} without a readable header" if summary.unreadable else ""
        print(f"[manifest] wrote {summary.rows} images ({summary.captions} with captions{unreadable}, "
              f"{summary.total_bytes} bytes) to {args.out}", file=sys.stderr)
    return 0


__all__ = [
    "CAPTION_SUFFIX",
    "IMAGE_EXTENSIONS",
    "Listed",
    "ManifestBuildError",
    "PROBE_BYTES",
    "SCHEMA",
    "Summary",
    "add_manifest_arguments",
    "build_manifest",
    "caption_key",
    "is_image",
    "list_source",
    "pair_captions",
    "run_manifest",
    "walk_local",
    "walk_s3",
]

"""WebDataset input (``input.format=webdataset``): tar shards of samples, as img2dataset writes them.

Layout: each tar holds samples whose members share a key, the member name up to the first dot
of its base name with its folder kept (``dir/000001.jpg`` and ``dir/000001.txt`` are sample
``dir/000001``); members of one sample follow each other, as webdataset reads them. The image is
the first of ``jpg``, ``jpeg``, ``png``, ``webp`` the sample has; the text is its ``txt``, else
the ``caption`` or ``text`` field of its ``json``, whose whole text passes through as the ``json``
column. Other members are ignored. The sample's key is its row's id.

One tar is one shard, the unit of resume. Its samples must be known when the plan is made, so
the driver lists the tars and Ray tasks, one per tar, read each tar once, sequentially
(``tarfile`` in streaming mode, local or S3) and return only its size, ETag, sample count and a
hash of its keys, with its keys split into the id check's hash buckets, which stay in the object
store. The read task reads the tar again and yields one row per sample, the image as raw bytes.

A tar that ends early or turns to garbage keeps the samples before the damage, and gets one more
row, ``<tar>#tail``, with the error ``row.truncated_tar`` (it ends without its end-of-archive
marker) or ``row.corrupt_tar`` (a damaged header, or no tar at all: then it is the tar's only
row). A member cut off by the end is its row's ``image.truncated_tar``/``text.truncated_tar``
(``row.truncated_tar`` for another member). Planning and reading see the same headers, so they
count the same rows; a read that counts otherwise, or other keys, means the tar changed since
the plan and fails its task. A tar missing at planning time is a job-level error.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import IO

import pyarrow as pa

from pipelines import storage as pio
from pipelines.etl.read import (
    FILE_COL,
    ID_BUCKETS,
    READ_CPUS,
    READ_ERROR_COL,
    ROW_COL,
    SHARD_COL,
    Manifest,
    ManifestError,
    ManifestFile,
    Shard,
    relative_names,
    add_stage_time,
    duplicate_ids,
    hash_buckets,
    passthrough_columns,
    plan_shards,
    ray_get,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in priority order
TEXT_EXT, JSON_EXT = "txt", "json"
JSON_TEXT_FIELDS = ("caption", "text")  # where a sample without a txt finds its text
TAIL_SUFFIX = "#tail"  # id of the row that stands for an unreadable tail: "<tar>#tail"
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a larger member is not loaded: its row's "<input>.too_large"
BLOCK_BYTES = 32 * 1024 * 1024  # a read task yields a block every this many encoded bytes
TAR_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("text", pa.string()), ("json", pa.string())])
_LOADED = (*IMAGE_EXTS, TEXT_EXT, JSON_EXT)


# --------------------------------------------------------------------------------------------
# Driver side: find the tars
# --------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``{00000..00099}`` (zero padded like its bounds), ``{a,b}``,
    nested braces; a brace group that is neither stays literal."""
    start = pattern.find("{")
    while start >= 0:
        depth, stop = 0, -1
        for i in range(start, len(pattern)):
            depth += {"{": 1, "}": -1}.get(pattern[i], 0)
            if depth == 0:
                stop = i
                break
        if stop < 0:
            return [pattern]
        alternatives = _brace_alternatives(pattern[start + 1:stop])
        if alternatives is not None:
            head, tail = pattern[:start], pattern[stop + 1:]
            return [out for alt in alternatives for out in expand_braces(head + alt + tail)]
        start = pattern.find("{", start + 1)
    return [pattern]


def _brace_alternatives(body: str) -> list[str] | None:
    """What one brace group stands for, or None when it is literal text."""
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in m.groups())
        width = max(len(b) for b in m.groups()) if padded else 0
        step = 1 if hi >= lo else -1
        return [str(v).zfill(width) for v in range(lo, hi + step, step)]
    parts, depth, begin = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[begin:i])
            begin = i + 1
    return parts + [body[begin:]] if parts else None


def find_tars(paths: str | list[str], s3: pio.S3Options | None = None) -> list[str]:
    """The tar files ``input.path`` names: brace patterns, files, folders (``*.tar`` below them)
    and globs, local or ``s3://``, in the order written (sorted within a folder or glob). A name
    a brace pattern spells out must exist, as a file named directly must."""
    out: list[str] = []
    for entry in [paths] if isinstance(paths, str) else list(paths):
        names = expand_braces(entry)
        try:
            kinds = _kinds([n for n in names if not any(ch in n for ch in "*?[")], s3)
            found, missing = [], []
            for name in names:
                kind = kinds.get(name, "glob")
                if kind == "file":
                    found.append(name)
                elif kind is None:
                    missing.append(name)
                else:
                    found += pio.list_files(name, suffix=".tar", s3=s3)
        except Exception as e:  # permissions, unreachable endpoint, ...
            raise ManifestError(f"cannot list tars {entry}: {type(e).__name__}: {e}") from e
        if not found:
            raise ManifestError(f"no .tar files found at {entry}")
        if missing:
            raise ManifestError(f"{len(missing)} tar(s) named by {entry} do not exist, e.g. {missing[0]}")
        out += [p if pio.is_s3(p) else pio.strip_scheme(p) for p in found]
    if len(set(out)) != len(out):
        raise ManifestError("the same tar is named twice in input.path")
    return out


def _kinds(names: list[str], s3: pio.S3Options | None) -> dict[str, str | None]:
    """``"file"``, ``"directory"`` or None (missing) for each name, from one listing per folder:
    a brace pattern may name thousands of tars, one request each would be slow on S3."""
    listed: dict[str, dict[str, str]] = {}
    out: dict[str, str | None] = {}
    for name in names:
        folder = pio.dirname(name)
        if folder not in listed:
            fs = pio.fsspec_filesystem(name, s3)
            try:
                entries = fs.ls(pio.strip_scheme(folder), detail=True, refresh=True)
                listed[folder] = {e["name"].rstrip("/"): e["type"] for e in entries}
            except FileNotFoundError:
                listed[folder] = {}
        out[name] = listed[folder].get(pio.strip_scheme(name).rstrip("/"))
    return out


def tar_manifest(paths: str | list[str], *, passthrough: list[str] | None = None, embed_images: bool = True,
                 embed_texts: bool = True, s3: pio.S3Options | None = None) -> Manifest:
    """The manifest of a WebDataset before its tars are indexed (no counts yet: :func:`index_tars`)."""
    tars = find_tars(paths, s3)
    files = [ManifestFile(path, rel, 0, 0) for path, rel in zip(tars, relative_names(tars))]
    image = "image" if embed_images else None
    text = "text" if embed_texts else None
    keep = passthrough_columns(TAR_SCHEMA.names, "id", "image", passthrough)
    return Manifest(files, TAR_SCHEMA, "id", image, text, image is not None, keep, format="webdataset")


def index_tars(manifest: Manifest, *, max_rows: int | None = None, check_ids: bool = True,
               s3: pio.S3Options | None = None) -> tuple[Manifest, list[Shard]]:
    """Count every tar's samples in Ray tasks (one per tar), then plan one shard per tar and,
    with ``check_ids``, refuse duplicate keys; only each tar's small summary reaches the driver."""
    import ray

    task = ray.remote(num_returns=ID_BUCKETS + 1, max_retries=3, num_cpus=READ_CPUS)(index_tar)
    parts = [task.remote(f.path, f.rel, check_ids, s3) for f in manifest.files]
    summaries = ray_get([p[0] for p in parts])
    files = [replace(f, **summary) for f, summary in zip(manifest.files, summaries)]
    manifest = replace(manifest, files=files)
    shards = plan_shards(files, max([f.num_rows for f in files] + [1]), max_rows)  # a tar is one shard
    if check_ids:
        dupes = duplicate_ids([p[1:] for p in parts])
        if dupes:
            raise ManifestError(f"the tars hold duplicate sample keys, e.g. {dupes}")
    return manifest, shards


# --------------------------------------------------------------------------------------------
# Scanning one tar (the same for planning and reading)
# --------------------------------------------------------------------------------------------
class _HeaderTracker(tarfile.TarInfo):
    """A TarInfo that remembers why the last header could not be read: ``tarfile`` ends the
    archive silently on a zero block (the proper end), on no data at all (cut at a header) and on
    a damaged header alike, and only the first is a complete tar."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.header_error = e
            raise


@dataclass
class _Member:
    name: str
    key: str
    ext: str
    size: int
    data: bytes | None = None  # loaded (read pass) members only
    cut: bool = False  # the tar ends inside its data


@dataclass
class _Sample:
    key: str
    members: dict[str, _Member] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)  # member names seen twice in the sample


_MEMBER_NAME = re.compile(r"((?:.*/)?[^./]+)\.([^/]*)", re.DOTALL)  # webdataset's key/extension split


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name as webdataset splits it: the key is the name up to the
    first dot of its base name, folder kept; None for a base name without a dot or starting with one."""
    m = _MEMBER_NAME.fullmatch(name)
    return (m.group(1), m.group(2).lower()) if m else None


class TarScan:
    """The samples of one tar, read front to back; ``end`` is set once they are exhausted: None
    for a tar that ends properly, else the message of its tail row."""

    def __init__(self, fileobj: IO[bytes], *, load: bool):
        self.fileobj, self.load = fileobj, load
        self.end: str | None = None
        self.keys = hashlib.sha256()

    def samples(self) -> Iterator[_Sample]:
        current: _Sample | None = None
        for member in self._members():
            if current is None or member.key != current.key:
                if current is not None:
                    yield current
                current = _Sample(member.key)
                self.keys.update(member.key.encode("utf-8", "replace") + b"\n")
            if member.ext in current.members:
                current.duplicates.append(member.name)
            else:
                current.members[member.ext] = member
        if current is not None:
            yield current
        self.keys.update(b"#damaged" if self.end else b"#end")

    def fingerprint(self) -> str:
        """Hash of the keys in order and of whether the tar ends properly (after :meth:`samples`)."""
        return self.keys.hexdigest()[:32]

    def _members(self) -> Iterator[_Member]:
        try:
            tar = tarfile.open(fileobj=self.fileobj, mode="r|", tarinfo=_HeaderTracker, encoding="utf-8",
                               errors="replace")
        except tarfile.ReadError as e:
            self.end = f"row.corrupt_tar: not a tar archive ({e})"
            return
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as e:
                self.end = _damage(str(e), tar.offset)
                return
            if info is None:
                if not isinstance(getattr(tar, "header_error", None), tarfile.EOFHeaderError):
                    self.end = _damage(str(getattr(tar, "header_error", "")), tar.offset)
                return
            split = split_name(info.name) if info.isreg() else None
            if split is None:
                continue
            member = _Member(info.name, split[0], split[1], info.size)
            if self.load and member.ext in _LOADED and member.size <= MAX_MEMBER_BYTES:
                try:
                    member.data = tar.extractfile(info).read()
                except tarfile.ReadError:
                    member.cut = True
                    self.end = _damage("unexpected end of data", tar.offset)
                    yield member
                    return
            yield member


def _damage(reason: str, offset: int) -> str:
    """The tail row's error for a tar that stopped being readable at byte ``offset``."""
    if reason in ("unexpected end of data", "empty header") or "truncated" in reason:
        return (f"row.truncated_tar: the tar ends early, without its end-of-archive marker (next header due at "
                f"byte {offset}); samples after the last one read are lost")
    return f"row.corrupt_tar: the tar is damaged at byte {offset} ({reason or 'bad header'}); the rest is unreadable"


def sample_values(sample: _Sample) -> tuple[bytes | None, bytes | None, bytes | None, str | None]:
    """(image bytes, text bytes, json bytes, row error) of one sample."""
    image = next((sample.members[e] for e in IMAGE_EXTS if e in sample.members), None)
    txt, js = sample.members.get(TEXT_EXT), sample.members.get(JSON_EXT)
    errors: list[str] = []
    text: bytes | None = txt.data if txt is not None else None
    if txt is None and js is not None and js.data is not None:
        try:
            meta = json.loads(js.data)
        except ValueError:
            errors.append(f"text.corrupt: json member {js.name} is not valid JSON")
        else:
            found = [meta.get(k) for k in JSON_TEXT_FIELDS if isinstance(meta, dict) and isinstance(meta.get(k), str)]
            text = found[0].encode() if found else None
    text_source = txt if txt is not None else js
    for member in sample.members.values():
        role = "image" if member is image else "text" if member is text_source else "row"
        if member.cut:
            errors.append(f"{role}.truncated_tar: member {member.name} is cut off by the end of the tar")
        elif member.ext in _LOADED and member.data is None:
            errors.append(f"{role}.too_large: member {member.name} is {member.size} bytes, limit {MAX_MEMBER_BYTES}")
    errors += [f"row.duplicate_member: {name} appears twice; the first is used" for name in sample.duplicates]
    return (None if image is None else image.data, text, None if js is None else js.data,
            "; ".join(errors) or None)


def _open(path: str, s3: pio.S3Options | None) -> IO[bytes]:
    fs = pio.fsspec_filesystem(path, s3)
    kwargs = {"block_size": 8 * 1024 * 1024, "cache_type": "readahead"} if pio.is_s3(path) else {}
    try:
        return fs.open(pio.strip_scheme(path), "rb", **kwargs)
    except FileNotFoundError:
        raise ManifestError(f"tar not found: {path}") from None


def index_tar(path: str, rel: str, with_ids: bool, s3: pio.S3Options | None = None):
    """One tar's summary for the plan and its keys in hash buckets (a Ray task; see :func:`index_tars`)."""
    try:
        info = pio.file_info(path, s3)
    except FileNotFoundError:
        raise ManifestError(f"tar not found: {path}") from None
    keys: list[str] = []
    rows = 0
    with _open(path, s3) as f:
        scan = TarScan(f, load=False)
        for sample in scan.samples():
            rows += 1
            if with_ids:
                keys.append(sample.key)
    if scan.end:
        rows += 1
        keys += [rel + TAIL_SUFFIX] if with_ids else []
    summary = {"num_rows": rows, "size": info["size"], "etag": info["etag"], "fingerprint": scan.fingerprint()}
    return (summary, *hash_buckets(pa.array(keys, pa.string()), ID_BUCKETS))


# --------------------------------------------------------------------------------------------
# Worker side: read one tar
# --------------------------------------------------------------------------------------------
def read_tar(shard: Shard, file: ManifestFile, columns: list[str], s3: pio.S3Options | None = None
             ) -> Iterator[pa.Table]:
    """Rows ``[shard.start, shard.stop)`` of one tar in blocks of about :data:`BLOCK_BYTES`:
    ``id``, the requested ``columns``, the read error and the shard/file/row tags."""
    block: list[tuple] = []
    size, row = 0, 0
    with _open(file.path, s3) as f:
        scan = TarScan(f, load=True)
        for sample in scan.samples():
            if row >= shard.stop and shard.stop < file.num_rows:  # input.max_rows: only the first rows
                break
            if shard.start <= row < shard.stop:
                block.append((sample.key, *sample_values(sample), row))
                size += sum(len(m.data or b"") for m in sample.members.values())
                if size >= BLOCK_BYTES:
                    yield _block(block, shard, columns)
                    block, size = [], 0
            row += 1
        else:
            if scan.end:
                if shard.start <= row < shard.stop:
                    block.append((file.rel + TAIL_SUFFIX, None, None, None, scan.end, row))
                row += 1
            if row != file.num_rows or scan.fingerprint() != file.fingerprint:
                raise IOError(f"{file.path}: the plan counted {file.num_rows} rows, this read {row} or other "
                              "keys (tar changed since the plan was made?)")
    if block:
        yield _block(block, shard, columns)


def _block(rows: list[tuple], shard: Shard, columns: list[str]) -> pa.Table:
    keys, images, texts, jsons, errors, numbers = (list(c) for c in zip(*rows))
    values = {
        "id": pa.array(keys, pa.string()),
        "image": pa.array(images, pa.binary()),
        # raw bytes viewed as strings: the decode stage turns bytes that are not UTF-8 into text.not_utf8
        "text": pa.array(texts, pa.binary()).view(pa.string()),
        "json": pa.array(jsons, pa.binary()).view(pa.string()),
    }
    n = len(rows)
    names = ["id", *(c for c in columns if c != "id"), READ_ERROR_COL, SHARD_COL, FILE_COL, ROW_COL]
    arrays = [values["id"], *(values[c] for c in columns if c != "id"), pa.array(errors, pa.string()),
              pa.array([shard.index] * n, pa.int32()), pa.array([shard.file] * n, pa.int32()),
              pa.array(numbers, pa.int64())]
    return pa.Table.from_arrays(arrays, names=names)


class TarShardReader:
    """The picklable body of a read task over one tar: its blocks, each tagged with the read's
    busy time (on the first block) like the Parquet reader's."""

    def __init__(self, shard: Shard, file: ManifestFile, columns: list[str], s3: pio.S3Options | None):
        self.shard, self.file, self.columns, self.s3 = shard, file, columns, s3

    def __call__(self) -> Iterator[pa.Table]:
        t0, requests = time.perf_counter(), pio.s3_request_counts()
        for block in read_tar(self.shard, self.file, self.columns, self.s3):
            seconds = time.perf_counter() - t0
            yield add_stage_time(block, "read", seconds, pio.s3_requests_since(requests))
            t0, requests = time.perf_counter(), pio.s3_request_counts()


__all__ = [
    "IMAGE_EXTS",
    "TAIL_SUFFIX",
    "TAR_SCHEMA",
    "TarScan",
    "TarShardReader",
    "expand_braces",
    "find_tars",
    "index_tar",
    "index_tars",
    "read_tar",
    "sample_values",
    "split_name",
    "tar_manifest",
]

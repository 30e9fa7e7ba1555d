"""Paths that may be local or ``s3://``: one place that turns them into a filesystem.

Every stage reads and writes through :func:`filesystem_for`, so S3 credentials, endpoint and
retries are configured once. Writes are atomic: data goes to a temporary name in the same
directory and is renamed (local) or uploaded in one PUT (S3, where an object appears whole or
not at all), so a reader never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass
class S3Options:
    """S3 connection settings; empty fields fall back to the standard AWS environment/config chain."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:5000 for a local S3 server
    region: str | None = None  # AWS region name
    access_key_id: str | None = None  # explicit key (prefer the environment)
    secret_access_key: str | None = None  # explicit secret (prefer the environment)
    anonymous: bool = False  # unsigned requests for public buckets
    max_attempts: int = 10  # retries on throttling / transient errors

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (fsspec)."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {
            "anon": self.anonymous,
            "config_kwargs": {"retries": {"max_attempts": self.max_attempts, "mode": "adaptive"}},
        }
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        if self.access_key_id:
            opts["key"] = self.access_key_id
        if self.secret_access_key:
            opts["secret"] = self.secret_access_key
        return opts


def is_s3(path: str) -> bool:
    return str(path).startswith(("s3://", "s3a://"))


def strip_scheme(path: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``; local paths are made absolute."""
    path = str(path)
    if is_s3(path):
        return path.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts keeping an ``s3://`` scheme intact."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def fsspec_filesystem(path: str, s3: S3Options | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``path`` (s3fs for ``s3://``, local otherwise)."""
    if is_s3(path):
        import s3fs

        return s3fs.S3FileSystem(**(s3 or S3Options()).storage_options())
    return fsspec.filesystem("file")


def filesystem_for(path: str, s3: S3Options | None = None) -> pa.fs.FileSystem:
    """A pyarrow filesystem for ``path``, wrapping s3fs so retries and endpoints are ours."""
    if is_s3(path):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem(path, s3)))
    return pafs.LocalFileSystem()


def exists(path: str, s3: S3Options | None = None) -> bool:
    return fsspec_filesystem(path, s3).exists(strip_scheme(path))


def read_bytes(path: str, s3: S3Options | None = None) -> bytes:
    fs = fsspec_filesystem(path, s3)
    with fs.open(strip_scheme(path), "rb") as f:
        return f.read()


def write_bytes_atomic(path: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write ``data`` so that ``path`` either does not exist or holds all of it."""
    if is_s3(path):
        fs = fsspec_filesystem(path, s3)
        fs.pipe_file(strip_scheme(path), data)  # one PUT: S3 objects appear atomically
        return
    path = strip_scheme(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any, s3: S3Options | None = None) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), s3)


def read_json(path: str, s3: S3Options | None = None) -> Any:
    return json.loads(read_bytes(path, s3))


def write_parquet_atomic(table: pa.Table, path: str, s3: S3Options | None = None) -> None:
    """Serialize the whole table in memory, then publish it atomically."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(path, sink.getvalue(), s3)


def list_files(path: str, suffix: str = "", s3: S3Options | None = None) -> list[str]:
    """Files under a directory (recursively), or the files a glob matches, sorted; scheme kept.

    Hidden and temporary files (names starting with ``.`` or ``_``) are skipped, as readers of
    Parquet datasets do.
    """
    fs = fsspec_filesystem(path, s3)
    raw = strip_scheme(path)
    if any(ch in raw for ch in "*?["):
        found = fs.glob(raw)
    elif fs.isdir(raw):
        found = fs.find(raw)
    elif fs.exists(raw):
        found = [raw]
    else:
        raise FileNotFoundError(f"no such file or directory: {path}")
    out = []
    for p in sorted(found):
        name = posixpath.basename(p)
        if name.startswith((".", "_")) or not name.endswith(suffix):
            continue
        out.append(f"s3://{p}" if is_s3(path) else p)
    return out


def unique_suffix() -> str:
    return uuid.uuid4().hex[:12]


def iter_parquet_batches(
    paths: Iterable[str], columns: list[str] | None = None, batch_size: int = 65536, s3: S3Options | None = None
) -> Iterable[pa.RecordBatch]:
    """Stream record batches from Parquet files without loading whole files."""
    for path in paths:
        fs = filesystem_for(path, s3)
        with fs.open_input_file(strip_scheme(path)) as f:
            pf = pq.ParquetFile(f)
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)


__all__ = [
    "S3Options",
    "exists",
    "filesystem_for",
    "fsspec_filesystem",
    "is_s3",
    "iter_parquet_batches",
    "join",
    "list_files",
    "read_bytes",
    "read_json",
    "strip_scheme",
    "unique_suffix",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
]

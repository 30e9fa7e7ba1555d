"""Paths that may be local or ``s3://``: one place that turns them into a filesystem.

Every stage reads and writes through :func:`filesystem_for`, so S3 credentials, endpoint and
retries are configured once. Writes are atomic: data goes to a temporary name in the same
directory and is renamed (local) or uploaded in one PUT (S3, where an object appears whole or
not at all), so a reader never sees a half-written file. Local copies of S3 files and folders
(:func:`fetch_to_local`) are published the same way.

Every S3 request attempt of the process is counted (:func:`s3_request_counts`), with the attempts
that failed transiently (5xx, throttling, a reset or a timeout) by cause, so that a run can say
in ``_run.json`` how hard it had to retry instead of hiding it.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass
class S3Options:
    """S3 connection settings; empty fields fall back to the standard AWS environment/config chain."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:5000 for a local S3 server
    region: str | None = None  # AWS region name
    # explicit credentials (prefer the environment); kept out of repr, so out of logs and errors
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)  # of temporary credentials
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
        if self.session_token:
            opts["token"] = self.session_token
        return opts


# This process's S3 request attempts: "attempts", and "failed.<cause>" for each transient failure.
_S3_REQUESTS: Counter = Counter()
_COUNTING_SESSION: Any = None


def count_s3_response(response_dict: dict | None = None, exception: BaseException | None = None, **_) -> None:
    """botocore's ``response-received`` hook: one HTTP attempt and, if it failed, why."""
    _S3_REQUESTS["attempts"] += 1
    status = (response_dict or {}).get("status_code")
    if exception is not None:
        _S3_REQUESTS[f"failed.{type(exception).__name__}"] += 1
    elif status is not None and (status >= 500 or status == 429):
        _S3_REQUESTS[f"failed.http_{status}"] += 1


def s3_request_counts() -> Counter:
    """A snapshot of this process's S3 request counts (see :func:`s3_requests_since`)."""
    return Counter(_S3_REQUESTS)


def s3_requests_since(before: Counter) -> dict[str, int]:
    """The requests this process made since the snapshot ``before`` (empty when none)."""
    return dict(_S3_REQUESTS - before)


def _counting_session():
    """One aiobotocore session per process with the counting hook, shared by every s3fs client."""
    global _COUNTING_SESSION
    if _COUNTING_SESSION is None:
        import aiobotocore.session

        session = aiobotocore.session.AioSession()
        session.register("response-received.s3", count_s3_response)
        _COUNTING_SESSION = session
    return _COUNTING_SESSION


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

        return s3fs.S3FileSystem(session=_counting_session(), **(s3 or S3Options()).storage_options())
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


def write_bytes_atomic(path: str, data: bytes, s3: S3Options | None = None, tmp_prefix: str = ".tmp-") -> None:
    """Write ``data`` so that ``path`` either does not exist or holds all of it.

    ``tmp_prefix`` names the local temp file (runs put their id in it, so the temp files a
    killed run leaves behind can be told from a live run's).
    """
    if is_s3(path):
        fs = fsspec_filesystem(path, s3)
        fs.pipe_file(strip_scheme(path), data)  # one PUT: S3 objects appear atomically
        return
    path = strip_scheme(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, dir=directory)
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


def fetch_to_local(uri: str, dest: str, s3: S3Options | None = None) -> str:
    """Copy the ``s3://`` file or folder ``uri`` to the local path ``dest``; returns ``dest``.

    Local readers need local files (FAISS memory-maps only those, clip_core parses only those),
    and several processes may fetch the same ``dest`` at once (actors on one node, index opens).
    So the copy is downloaded into a temporary folder next to ``dest`` and renamed into place:
    ``dest`` is either absent or complete, a crash leaves no partial copy that looks finished,
    and a concurrent fetch is harmless: a file is replaced by an identical one (readers keep the
    one they opened); a folder that another process published first is kept and this copy dropped.
    """
    fs = fsspec_filesystem(uri, s3)
    raw = strip_scheme(uri)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".fetch-", dir=parent)
    local = os.path.join(work, os.path.basename(dest))
    try:
        if fs.isdir(raw):
            fs.get(raw.rstrip("/") + "/", local, recursive=True)
        else:
            fs.get_file(raw, local)
        try:
            os.replace(local, dest)
        except OSError:
            if not (os.path.isdir(local) and os.path.isdir(dest)):
                raise  # only a folder that another process published first is expected here
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def write_json_atomic(path: str, obj: Any, s3: S3Options | None = None) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), s3)


def read_json(path: str, s3: S3Options | None = None) -> Any:
    return json.loads(read_bytes(path, s3))


def write_parquet_atomic(table: pa.Table, path: str, s3: S3Options | None = None, *,
                         tmp_prefix: str = ".tmp-", compression: str = "zstd",
                         row_group_size: int | None = None) -> None:
    """Serialize the whole table in memory, then publish it atomically."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression, row_group_size=row_group_size)
    write_bytes_atomic(path, sink.getvalue(), s3, tmp_prefix)


def read_parquet(path: str, s3: S3Options | None = None, columns: list[str] | None = None) -> pa.Table:
    """One whole Parquet file (local or S3)."""
    fs = filesystem_for(path, s3)
    with fs.open_input_file(strip_scheme(path)) as f:
        return pq.read_table(f, columns=columns)


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


def dirname(path: str) -> str:
    """The folder of a file path, keeping an ``s3://`` scheme (``s3://b/k/m.parquet`` -> ``s3://b/k``)."""
    if is_s3(path):
        return posixpath.dirname(str(path).rstrip("/"))
    return os.path.dirname(os.path.abspath(os.path.expanduser(str(path))))


def is_absolute_uri(path: str) -> bool:
    """True for ``s3://...``, any other ``scheme://`` and absolute local paths."""
    return is_s3(path) or "://" in str(path) or os.path.isabs(os.path.expanduser(str(path)))


def resolve_relative(path: str, base_dir: str) -> str:
    """``path`` as written in a manifest: absolute or URI as is, otherwise relative to the
    manifest's folder (which may itself be on S3)."""
    path = str(path)
    if "://" in path:
        return path
    local = os.path.expanduser(path)
    if os.path.isabs(local):
        return local
    if is_s3(base_dir):
        scheme, rest = str(base_dir).split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(rest, path))
    return os.path.normpath(os.path.join(base_dir, local))


def remove(path: str, s3: S3Options | None = None) -> None:
    """Delete a file if it exists (local or S3)."""
    fs = fsspec_filesystem(path, s3)
    raw = strip_scheme(path)
    if fs.exists(raw):
        fs.rm(raw)


def remove_tree(path: str, s3: S3Options | None = None) -> None:
    """Delete a folder and everything below it, if it exists (local or S3 prefix)."""
    fs = fsspec_filesystem(path, s3)
    raw = strip_scheme(path)
    try:
        fs.rm(raw, recursive=True)
    except FileNotFoundError:
        pass


def replace_tree(src: str, dst: str, s3: S3Options | None = None) -> None:
    """Make the folder ``dst`` hold what the folder ``src`` holds (and nothing it held before);
    ``src`` is gone afterwards.

    Local: two renames (the old folder aside, the new one in place), so a reader sees the old
    folder or the new one, never a mix. S3 has no rename: the old prefix is deleted, then the new
    objects are copied in; a writer that needs readers to tell "complete" from "being replaced"
    writes a marker file into ``dst`` after this returns.
    """
    if not is_s3(dst):
        src, dst = strip_scheme(src), strip_scheme(dst)
        old = f"{dst}.old-{unique_suffix()}"
        if os.path.exists(dst):
            os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    fs = fsspec_filesystem(dst, s3)
    remove_tree(dst, s3)
    raw_src, raw_dst = strip_scheme(src).rstrip("/"), strip_scheme(dst).rstrip("/")
    for path in sorted(fs.find(raw_src)):
        fs.copy(path, raw_dst + path[len(raw_src):])
    remove_tree(src, s3)


def file_info(path: str, s3: S3Options | None = None) -> dict[str, Any]:
    """``{"size": bytes, "mtime": float | None, "etag": str | None}`` of a file; used to tell
    whether an input changed between a run and its resume."""
    fs = fsspec_filesystem(path, s3)
    info = fs.info(strip_scheme(path))
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    etag = info.get("ETag") or info.get("etag")
    return {"size": int(info.get("size") or 0), "mtime": float(mtime) if mtime is not None else None,
            "etag": str(etag).strip('"') if etag else None}


def parquet_metadata(path: str, s3: S3Options | None = None) -> tuple[int, pa.Schema, list[int]]:
    """(rows, Arrow schema, rows per row group) from a Parquet footer, without reading data."""
    fs = filesystem_for(path, s3)
    with fs.open_input_file(strip_scheme(path)) as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return meta.num_rows, schema, groups


def parquet_footer(path: str, s3: S3Options | None = None) -> tuple[int, dict[bytes, bytes]]:
    """(rows, key-value metadata) from a Parquet footer, without reading data."""
    fs = filesystem_for(path, s3)
    with fs.open_input_file(strip_scheme(path)) as f:
        meta = pq.ParquetFile(f).metadata
        return meta.num_rows, dict(meta.metadata or {})


def read_parquet_rows(
    path: str,
    start: int,
    stop: int,
    columns: list[str] | None = None,
    s3: S3Options | None = None,
    row_groups: list[int] | None = None,
) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that overlap them.

    ``row_groups`` (rows per group, from :func:`parquet_metadata`) saves one footer read.
    """
    fs = filesystem_for(path, s3)
    with fs.open_input_file(strip_scheme(path)) as f:
        pf = pq.ParquetFile(f)
        if row_groups is None:
            row_groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        wanted, first_row, offset = [], None, 0
        for i, n in enumerate(row_groups):
            if offset < stop and offset + n > start:
                wanted.append(i)
                if first_row is None:
                    first_row = offset
            offset += n
        if not wanted:
            return pf.schema_arrow.empty_table() if columns is None else pf.schema_arrow.empty_table().select(columns)
        table = pf.read_row_groups(wanted, columns=columns)
    return table.slice(start - first_row, stop - start)


__all__ = [
    "S3Options",
    "dirname",
    "exists",
    "fetch_to_local",
    "file_info",
    "filesystem_for",
    "fsspec_filesystem",
    "is_s3",
    "join",
    "is_absolute_uri",
    "list_files",
    "parquet_footer",
    "parquet_metadata",
    "read_bytes",
    "read_json",
    "read_parquet",
    "read_parquet_rows",
    "remove",
    "remove_tree",
    "replace_tree",
    "resolve_relative",
    "strip_scheme",
    "unique_suffix",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
]

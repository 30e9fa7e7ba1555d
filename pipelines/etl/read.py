"""Stage 1: the manifest — find the files, validate them, cut them into shards, read shards.

Why a shard plan instead of ``ray.data.read_parquet`` over the whole manifest: resuming a killed
job needs a unit of work that is the same on every run, and stable ids need each row's position
in its file. The driver reads only Parquet footers to cut every manifest file into row ranges
(``output.shard_size`` rows, never spanning two files); the plan is written to
``OUTPUT/_plan.json`` and each shard becomes one ``results/part-XXXXX.parquet``. Ray Data then
reads exactly the shards that are not committed yet, one read task per shard, through a small
:class:`ManifestDatasource` that reads the row groups overlapping a shard with pyarrow (local
files or S3 through the retrying filesystem of :mod:`pipelines.storage`).

Every row leaves this stage tagged with its shard (``__shard``), its manifest file (``__file``)
and its row number in that file (``__row``); those columns travel through the later stages so
the writer can tell when a shard is complete, and are dropped before anything is written.

Id rule when the manifest has no id column: ``"<file>:<row>"`` where ``<file>`` is the manifest
file's path relative to the common folder of all manifest files (its base name when there is
one file) and ``<row>`` its 0-based row number, e.g. ``"manifest.parquet:17"``. It is unique by
construction and the same for a local copy and an S3 copy of the same manifest tree.
"""

from __future__ import annotations

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasource

from pipelines import storage as pio

SHARD_COL = "__shard"
FILE_COL = "__file"
ROW_COL = "__row"
# A row error found while reading ("<input>.<cause>: <detail>", e.g. a tar member cut short);
# the decode stage adds it to the row's image or text error.
READ_ERROR_COL = "__read_error"
INTERNAL_PREFIX = "__"

# Columns the results own; a manifest column with one of these names cannot pass through.
RESULT_COLUMNS = (
    "id",
    "image_embedding",
    "text_embedding",
    "label",
    "label_score",
    "labels_topk",
    "scores_topk",
    "caption",
    "status",
    "error",
)


class ManifestError(ValueError):
    """The manifest cannot be used as configured; the message names the file and column."""


@dataclass
class ManifestFile:
    """One manifest Parquet file as seen when the plan was made."""

    path: str  # full path or s3:// URI
    rel: str  # path relative to the inputs' common folder: the file part of derived ids
    num_rows: int  # rows in the file
    size: int  # bytes, to notice a changed input on resume
    etag: str | None = None  # S3 ETag, when there is one
    row_groups: list[int] = field(default_factory=list)  # rows per row group
    columns: list[str] = field(default_factory=list)  # column names of this file
    fingerprint: str | None = None  # a tar: hash of its sample keys, to notice a changed tar on resume


@dataclass
class Shard:
    """Rows ``[start, stop)`` of manifest file ``file``; becomes ``results/part-{index:05d}.parquet``."""

    index: int
    file: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass
class Manifest:
    """What the driver learned from the footers: files, unified schema, column roles."""

    files: list[ManifestFile]
    schema: pa.Schema  # unified Arrow schema of all files
    id_column: str | None  # the configured id column when present, else None (ids are derived)
    image_column: str | None  # None when the manifest has no image column (or images are off)
    text_column: str | None  # None when the manifest has no text column (or texts are off)
    image_is_bytes: bool  # the image column holds encoded bytes rather than paths
    passthrough: list[str]  # manifest columns copied to the results
    format: str = "parquet"  # "webdataset": the files are tar shards (pipelines.etl.webdataset)

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def read_columns(self) -> list[str]:
        """Columns a shard read needs, in manifest order."""
        wanted = set(self.passthrough)
        for c in (self.id_column, self.image_column, self.text_column):
            if c:
                wanted.add(c)
        return [name for name in self.schema.names if name in wanted]

    def manifest_dirs(self) -> list[str]:
        """The folder of each file, for image paths written relative to their manifest."""
        return [pio.dirname(f.path) for f in self.files]


# --------------------------------------------------------------------------------------------
# Driver side: find, inspect, validate, plan
# --------------------------------------------------------------------------------------------
def expand_inputs(paths: str | list[str], s3: pio.S3Options | None = None) -> list[str]:
    """Manifest files from the configured path(s): a file, a folder (``*.parquet`` below it),
    a glob, local or ``s3://``. Order is stable (sorted within each entry, entries in order)."""
    entries = [paths] if isinstance(paths, str) else list(paths)
    out: list[str] = []
    for entry in entries:
        fs = pio.fsspec_filesystem(entry, s3)
        raw = pio.strip_scheme(entry)
        try:
            if not any(ch in raw for ch in "*?[") and fs.isfile(raw):
                found = [entry if pio.is_s3(entry) else raw]
            else:
                found = pio.list_files(entry, suffix=".parquet", s3=s3)
        except FileNotFoundError as e:
            raise ManifestError(f"manifest not found: {entry}") from e
        except Exception as e:  # permissions, unreachable endpoint, ...
            raise ManifestError(f"cannot list manifest {entry}: {type(e).__name__}: {e}") from e
        if not found:
            raise ManifestError(f"no .parquet files found at {entry}")
        out.extend(found)
    if len(set(out)) != len(out):
        raise ManifestError("the same manifest file is listed twice in input.path")
    return out


def relative_names(paths: list[str]) -> list[str]:
    """Each path relative to the common folder of all (its base name when there is one): the
    part of an id or plan entry that stays the same for a copy of the inputs elsewhere."""
    keys = [pio.strip_scheme(p).replace(os.sep, "/") for p in paths]
    if len(keys) == 1:
        return [posixpath.basename(keys[0])]
    common = posixpath.commonpath([posixpath.dirname(k) for k in keys])
    return [posixpath.relpath(k, common) for k in keys]


def inspect_files(
    paths: list[str], s3: pio.S3Options | None = None, threads: int = 16
) -> list[tuple[ManifestFile, pa.Schema]]:
    """Footers and sizes of all manifest files, read concurrently (S3 latency)."""
    rels = relative_names(paths)

    def one(i: int) -> tuple[ManifestFile, pa.Schema]:
        path = paths[i]
        try:
            num_rows, schema, groups = pio.parquet_metadata(path, s3)
            info = pio.file_info(path, s3)
        except FileNotFoundError as e:
            raise ManifestError(f"manifest not found: {path}") from e
        except Exception as e:
            raise ManifestError(f"cannot read manifest {path}: {type(e).__name__}: {e}") from e
        file = ManifestFile(path, rels[i], num_rows, info["size"], info["etag"], groups, list(schema.names))
        return file, schema

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        return list(pool.map(one, range(len(paths))))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t) and _is_string(t.value_type)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def build_manifest(
    paths: str | list[str],
    *,
    id_column: str,
    image_column: str,
    text_column: str,
    passthrough: list[str] | None = None,
    embed_images: bool = True,
    embed_texts: bool = True,
    s3: pio.S3Options | None = None,
) -> Manifest:
    """Find and inspect the manifest files and validate their columns before any work starts."""
    files_paths = expand_inputs(paths, s3)
    inspected = inspect_files(files_paths, s3)
    files = [f for f, _ in inspected]
    schemas = [sc for _, sc in inspected]
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ManifestError(f"manifest files have incompatible schemas: {e}") from e
    names = set(schema.names)

    def check_everywhere(col: str) -> None:
        missing = [f.path for f, s in zip(files, schemas) if col not in s.names]
        if missing:
            raise ManifestError(f"column {col!r} is missing from manifest {missing[0]} (present in others)")

    image = image_column if image_column in names and embed_images else None
    text = text_column if text_column in names and embed_texts else None
    if image is None and text is None:
        wanted = [c for c, on in ((image_column, embed_images), (text_column, embed_texts)) if on]
        raise ManifestError(
            f"manifest {files[0].path} has no {' or '.join(repr(c) for c in wanted)} column "
            f"(columns: {', '.join(schema.names)}); set input.image_column / input.text_column"
        )
    image_is_bytes = False
    if image is not None:
        check_everywhere(image)
        t = schema.field(image).type
        if _is_binary(t):
            image_is_bytes = True
        elif not _is_string(t):
            raise ManifestError(f"column {image!r} must hold paths (string) or encoded images (binary), not {t}")
    if text is not None:
        check_everywhere(text)
        t = schema.field(text).type
        if not _is_string(t):
            raise ManifestError(f"column {text!r} must hold strings, not {t}")
    id_col = id_column if id_column in names else None
    if id_col is not None:
        check_everywhere(id_col)
        t = schema.field(id_col).type
        if not (_is_string(t) or pa.types.is_integer(t) or _is_binary(t)):
            raise ManifestError(f"id column {id_col!r} must be a string or integer column, not {t}")

    keep = passthrough_columns(schema.names, id_col, image if image_is_bytes else None, passthrough)
    return Manifest(files, schema, id_col, image, text, image_is_bytes, keep)


def passthrough_columns(names: list[str], id_column: str | None, bytes_image: str | None,
                        passthrough: list[str] | None) -> list[str]:
    """The manifest columns copied to the results: ``output.passthrough``, or (None) every column
    but the id and a bytes image column; raises when one is unknown or clashes with a result column."""
    if passthrough is None:
        keep = [n for n in names if n != id_column and n != bytes_image]
    else:
        unknown = [c for c in passthrough if c not in names]
        if unknown:
            raise ManifestError(
                f"output.passthrough names unknown column(s) {unknown}; manifest columns: {', '.join(names)}"
            )
        keep = [n for n in names if n in set(passthrough) and n != id_column]
    clash = [n for n in keep if n in RESULT_COLUMNS or n.startswith(INTERNAL_PREFIX)]
    if clash:
        raise ManifestError(
            f"manifest column(s) {clash} clash with result columns; rename them or leave them out "
            "with output.passthrough"
        )
    return keep


def plan_shards(files: list[ManifestFile], shard_size: int, max_rows: int | None = None) -> list[Shard]:
    """Cut files into row ranges of at most ``shard_size`` rows, in file order; with ``max_rows``
    only the first rows of the manifest are planned."""
    shards: list[Shard] = []
    budget = max_rows if max_rows is not None else float("inf")
    for fi, f in enumerate(files):
        start = 0
        while start < f.num_rows and budget > 0:
            stop = int(min(start + shard_size, f.num_rows, start + budget))
            shards.append(Shard(len(shards), fi, start, stop))
            budget -= stop - start
            start = stop
        if budget <= 0:
            break
    return shards


ID_BUCKETS = 16  # hash partitions of the id check: each holds about 1/16 of the ids, in its own task


def _hash_ids(file: ManifestFile, stop: int, column: str, buckets: int, s3: pio.S3Options | None):
    """Read one manifest file's ids and split them by hash (a Ray task: the ids stay on workers)."""
    ids = pio.read_parquet_rows(file.path, 0, stop, [column], s3, file.row_groups).column(column).combine_chunks()
    nulls = ids.null_count
    ids = ids.drop_null()
    try:
        ids.validate(full=True)  # Parquet does not check that strings are UTF-8; other writers may not either
    except pa.ArrowInvalid as e:
        raise ManifestError(f"id column {column!r} of {file.path} holds an id that is not valid UTF-8 ({e})") from None
    return (nulls, *hash_buckets(ids, buckets))


def hash_buckets(ids: pa.Array, buckets: int = ID_BUCKETS) -> tuple[pa.Array, ...]:
    """``ids`` split into ``buckets`` parts by a hash of each id: equal ids land in the same part."""
    from pandas.util import hash_array  # vectorized and the same in every process (unlike hash())

    part = hash_array(ids.to_numpy(zero_copy_only=False)) % buckets
    return tuple(ids.filter(pa.array(part == b)) for b in range(buckets))


def _duplicates_in_bucket(*arrays: pa.Array) -> tuple[int, list]:
    """(number of repeated ids, a few examples) among one hash bucket of every file (a Ray task)."""
    typ = arrays[0].type
    ids = pa.chunked_array([a.cast(typ) for a in arrays if len(a)], type=typ)
    if len(ids) == 0:
        return 0, []
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    return len(repeated), repeated.field("values").to_pylist()[:5]


def ray_get(refs: list) -> list:
    """``ray.get``, with a task's :class:`ManifestError` raised as itself (its one-line message)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ManifestError):
            raise e.cause from None
        raise


def check_ids(manifest: Manifest, shards: list[Shard], s3: pio.S3Options | None = None) -> None:
    """Refuse null or duplicate ids up front: the results promise every id exactly once.

    Runs on the cluster as a two-step hash partition (one read task per manifest file, one
    check task per bucket), so no id reaches the driver except the few named in the error.
    """
    if manifest.id_column is None or not shards:
        return
    import ray

    stops: dict[int, int] = {}
    for s in shards:
        stops[s.file] = max(stops.get(s.file, 0), s.stop)
    hash_task = ray.remote(num_returns=ID_BUCKETS + 1, max_retries=3)(_hash_ids)
    parts = [hash_task.remote(manifest.files[fi], stop, manifest.id_column, ID_BUCKETS, s3)
             for fi, stop in sorted(stops.items())]
    nulls = sum(ray_get([p[0] for p in parts]))
    col = manifest.id_column
    if nulls:
        raise ManifestError(f"id column {col!r} has {nulls} null value(s); every row needs an id")
    dupes = duplicate_ids([p[1:] for p in parts])
    if dupes:
        raise ManifestError(f"id column {col!r} has duplicate values, e.g. {dupes}")


def duplicate_ids(buckets_per_file: list) -> list:
    """A few ids that occur more than once (none: ``[]``), from each file's :func:`hash_buckets`
    as Ray object refs: one check task per bucket, so the ids stay on the cluster."""
    import ray

    check_task = ray.remote(max_retries=3)(_duplicates_in_bucket)
    found = ray_get([check_task.remote(*(parts[b] for parts in buckets_per_file)) for b in range(ID_BUCKETS)])
    return [v for n, ex in found if n for v in ex][:5]


def plan_to_dict(manifest: Manifest, shards: list[Shard], shard_size: int, max_rows: int | None,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of ``OUTPUT/_plan.json``: identical inputs and settings give identical dicts."""
    return {
        "version": 1,
        "format": manifest.format,
        "inputs": [
            {"path": f.path, "rel": f.rel, "num_rows": f.num_rows, "size": f.size, "etag": f.etag,
             **({"fingerprint": f.fingerprint} if f.fingerprint else {})}
            for f in manifest.files
        ],
        "shard_size": shard_size,
        "max_rows": max_rows,
        "num_rows": sum(s.num_rows for s in shards),
        "shards": [[s.file, s.start, s.stop] for s in shards],
        "settings": settings,
    }


def _comparable(plan: dict) -> dict:
    """A plan without the absolute input paths: the same manifest reached through another path
    (a ``ray job submit`` working dir, a re-mounted volume) is still the same input. A plan
    written before ``input.format`` existed is a Parquet plan."""
    out = {"format": "parquet", **plan}
    out["inputs"] = [{k: v for k, v in i.items() if k != "path"} for i in plan.get("inputs", [])]
    return out


def diff_plans(old: dict, new: dict) -> str | None:
    """None when two plans match, else a short description of the first difference."""
    old, new = _comparable(old), _comparable(new)
    if old == new:
        return None
    if old["format"] != new["format"]:
        return f"input.format changed ({old['format']} -> {new['format']})"
    if old.get("inputs") != new.get("inputs"):
        a = {i["rel"]: i for i in old.get("inputs", [])}
        b = {i["rel"]: i for i in new.get("inputs", [])}
        if set(a) != set(b):
            return "the set of manifest files changed"
        for p in b:
            if a[p] != b[p]:
                return f"manifest {p} changed (rows/size/etag/keys differ)"
        return "the manifest files changed"
    for key, name in (("shard_size", "output.shard_size"), ("max_rows", "input.max_rows")):
        if old.get(key) != new.get(key):
            return f"{name} changed ({old.get(key)} -> {new.get(key)})"
    so, sn = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(so) | set(sn)):
        if so.get(key) != sn.get(key):
            return f"{key} settings changed ({so.get(key)!r} -> {sn.get(key)!r})"
    return "the plan changed"


# --------------------------------------------------------------------------------------------
# Worker side: read one shard
# --------------------------------------------------------------------------------------------
def derive_ids(rel: str, start: int, stop: int) -> pa.Array:
    """The documented id rule: ``"<rel>:<row>"``."""
    return pa.array([f"{rel}:{r}" for r in range(start, stop)], type=pa.string())


def read_shard(
    shard: Shard,
    file: ManifestFile,
    *,
    columns: list[str],
    schema: pa.Schema,
    id_column: str | None,
    s3: pio.S3Options | None = None,
) -> pa.Table:
    """Pure batch function: the rows of one shard with ``id`` and the shard/file/row tags.

    Columns absent from this file but present in others come back as nulls of the unified type.
    """
    present = [c for c in columns if c in file.columns]
    table = pio.read_parquet_rows(file.path, shard.start, shard.stop, present, s3, file.row_groups)
    n = table.num_rows
    if n != shard.num_rows:
        raise IOError(f"{file.path}: expected {shard.num_rows} rows at {shard.start}, read {n} (file changed?)")
    arrays, names = [], []
    if id_column is None:
        arrays.append(derive_ids(file.rel, shard.start, shard.stop))
    else:
        arrays.append(table.column(id_column))
    names.append("id")
    for c in columns:
        if c == id_column:
            continue
        typ = schema.field(c).type
        if c in table.column_names:
            col = table.column(c)
            if col.type != typ:
                col = col.cast(typ)
        else:
            col = pa.nulls(n, typ)
        arrays.append(col)
        names.append(c)
    arrays += [
        pa.array([shard.index] * n, pa.int32()),
        pa.array([shard.file] * n, pa.int32()),
        pa.array(range(shard.start, shard.stop), pa.int64()),
    ]
    names += [SHARD_COL, FILE_COL, ROW_COL]
    return pa.Table.from_arrays(arrays, names=names)


# --------------------------------------------------------------------------------------------
# Ray wrapper
# --------------------------------------------------------------------------------------------
class ManifestDatasource(Datasource):
    """Ray Data read tasks over the pending shards: one per ``block_rows`` rows of a shard (one
    per shard when None), each returning its rows as one block.

    Why blocks smaller than a shard: a block is what one decode task decodes and what reaches the
    model actor whole. One 10,000-row block would be decoded by one task on one core while the
    model waits, and embedded only once all of it is decoded; blocks of a few MiB of pixels let
    several decode tasks run at once and the model start on the first. The split is made here
    because Ray Data merges what one read task returns up to its target block size (128 MiB),
    and its streaming repartition runs as tasks that each reserve a whole CPU.
    """

    def __init__(self, manifest: Manifest, shards: list[Shard], s3: pio.S3Options | None = None,
                 block_rows: int | None = None):
        super().__init__()
        self._manifest = manifest
        self._shards = list(shards)
        self._s3 = s3
        self._columns = manifest.read_columns()
        self._block_rows = block_rows

    def blocks(self) -> list[Shard]:
        """The row ranges read tasks read: each shard cut into ``block_rows`` pieces (same index)."""
        step = self._block_rows
        if not step or self._manifest.format == "webdataset":  # a tar is read from its start: one task
            return self._shards
        return [Shard(s.index, s.file, lo, min(lo + step, s.stop)) for s in self._shards
                for lo in range(s.start, s.stop, step)]

    def get_name(self) -> str:
        return "ReadManifestShards"

    def estimate_inmemory_data_size(self) -> int | None:
        total = sum(f.size for f in self._manifest.files) or None
        rows = self._manifest.total_rows or 1
        if total is None:
            return None
        return int(total * sum(s.num_rows for s in self._shards) / rows)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        tasks = []
        est = self.estimate_inmemory_data_size() or 0
        planned = sum(s.num_rows for s in self._shards) or 1
        for shard in self.blocks():
            file = self._manifest.files[shard.file]
            meta = BlockMetadata(
                num_rows=shard.num_rows,
                size_bytes=int(est * shard.num_rows / planned),
                input_files=[file.path],
                exec_stats=None,
            )
            tasks.append(ReadTask(self._reader(shard, file), meta))
        return tasks

    def _reader(self, shard: Shard, file: ManifestFile):
        if self._manifest.format == "webdataset":
            from pipelines.etl.webdataset import TarShardReader

            return TarShardReader(shard, file, self._columns, self._s3)
        return _ShardReader(shard, file, self._columns, self._manifest.schema, self._manifest.id_column, self._s3)


class _ShardReader:
    """The picklable body of a read task (a class, not a lambda, so it ships cleanly)."""

    def __init__(self, shard, file, columns, schema, id_column, s3):
        self.shard, self.file, self.columns = shard, file, columns
        self.schema, self.id_column, self.s3 = schema, id_column, s3

    def __call__(self) -> Iterable[pa.Table]:
        import time

        t0, requests = time.perf_counter(), pio.s3_request_counts()
        table = read_shard(self.shard, self.file, columns=self.columns, schema=self.schema,
                           id_column=self.id_column, s3=self.s3)
        seconds = time.perf_counter() - t0
        return [add_stage_time(table, "read", seconds, pio.s3_requests_since(requests))]


READ_CPUS = 0.1  # CPUs a manifest read task reserves


def add_stage_time(table: pa.Table, stage: str, seconds: float, s3_requests: dict[str, int] | None = None) -> pa.Table:
    """Tag a batch with the busy seconds one stage spent on it and the S3 requests it made (the
    first row holds the totals), so the driver can report both without a side channel; the
    columns are dropped on write. Every batch of a stage gets both columns: one schema."""
    n = table.num_rows
    values: list[float] = [0.0] * n
    requests: list[str | None] = [None] * n
    if n:
        values[0] = float(seconds)
        requests[0] = json.dumps(s3_requests, sort_keys=True) if s3_requests else None
    for name, column in ((f"__t_{stage}", pa.array(values, pa.float64())),
                         (f"__s3_{stage}", pa.array(requests, pa.string()))):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, column)
    return table


def read_dataset(manifest: Manifest, shards: list[Shard], s3: pio.S3Options | None = None,
                 runtime_env: dict | None = None, block_rows: int | None = None, max_retries: int = 3):
    """A Ray Dataset over the pending shards in blocks of at most ``block_rows`` rows (thin wrapper
    over :class:`ManifestDatasource`).

    ``runtime_env`` should match the decode tasks' so both run in the same pool of workers. A read
    task reserves :data:`READ_CPUS`: it reads manifest rows (paths and texts; encoded images only in
    a bytes manifest), I/O more than CPU, so a whole CPU for it would only keep model actors or
    decode tasks from starting.
    """
    import ray.data

    source = ManifestDatasource(manifest, shards, s3, block_rows)
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(source.blocks())), runtime_env=runtime_env,
                                    num_cpus=READ_CPUS, max_retries=max_retries)


__all__ = [
    "FILE_COL",
    "Manifest",
    "ManifestDatasource",
    "ManifestError",
    "ManifestFile",
    "READ_ERROR_COL",
    "RESULT_COLUMNS",
    "ROW_COL",
    "SHARD_COL",
    "Shard",
    "add_stage_time",
    "build_manifest",
    "check_ids",
    "derive_ids",
    "diff_plans",
    "duplicate_ids",
    "expand_inputs",
    "hash_buckets",
    "inspect_files",
    "passthrough_columns",
    "plan_shards",
    "plan_to_dict",
    "ray_get",
    "read_dataset",
    "read_shard",
    "relative_names",
]

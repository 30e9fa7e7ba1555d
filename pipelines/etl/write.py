"""Stage 4 (on workers): write result rows as pieces, and compact a covered shard into its part.

Why pieces, then parts: result rows leave the model actors in batches of any mix of shards, in
any order. Ray tasks write each batch where it is (no row ever travels to the driver) as one
Parquet *piece* per contiguous run of manifest rows of one shard, named by that run:
``OUTPUT/_pieces/<shard>/<first>-<stop>.parquet``. The name depends only on the rows, so a
retried task rewrites the same file instead of adding a second copy. The task hands the driver
one small metadata row per piece (shard, row range, node, encoder, stage seconds), and once a
shard's ranges cover all its rows the driver starts :func:`compact_shard`, another Ray task,
which reads exactly the pieces the driver saw, sorts them into manifest order, checks that every
row is there exactly once, and publishes ``results/part-XXXXX.parquet`` atomically. A part file
therefore exists only when its shard is complete: it is the commit marker, its footer carries the
shard's counts (so a later run never re-reads the data to count it), and a re-run skips exactly
the shards that have one.

Why not Ray Data's ``write_parquet``/``Datasink``: a datasink reports to the driver only when the
whole dataset is written, so nothing could be committed while the job runs and a driver crash
would lose every shard; and its files are named per write task, not per row range, so they could
not tell a retried task's rows from new ones.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage as pio
from pipelines.etl.embed import ACTOR_INFO_COL, CLIP_SCORE_FIELD
from pipelines.etl.label import CAPTION_FIELDS, LABEL_FIELDS
from pipelines.etl.read import ROW_COL, SHARD_COL, Manifest, Shard
from pipelines.ray_runtime import node_id

PIECES_DIR = "_pieces"
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
CAUSE_RE = re.compile(r"(?:^|; )((?:image|text|row)\.[a-z0-9_]+):")
FOOTER_KEY = b"clip_etl"  # Parquet key-value metadata of a part: its counts and encoder
PART_LABELS = 100  # labels counted by name per part (the rest as OTHER_LABELS): footers stay small
OTHER_LABELS = "(other)"

# One metadata row per written piece: all the driver learns about the rows.
PIECE_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("start", pa.int64()), ("stop", pa.int64()), ("path", pa.string()),
    ("node", pa.string()), ("encoder", pa.string()), ("stage_seconds", pa.string()),
    ("s3_requests", pa.string()),
])


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def piece_path(pieces_dir: str, shard: int, start: int, stop: int) -> str:
    return pio.join(pieces_dir, f"{shard:05d}", f"{start:09d}-{stop:09d}.parquet")


def result_schema(
    manifest: Manifest,
    embed_dim: int,
    *,
    images: bool,
    texts: bool,
    label: bool,
    caption: bool,
    heads: Sequence[pa.Field] = (),
) -> pa.Schema:
    """The results' Arrow schema: id, passthrough columns, then the stage outputs: embeddings,
    labels, caption, ``clip_score`` (when both images and texts are embedded), one column per head."""
    id_type = manifest.schema.field(manifest.id_column).type if manifest.id_column else pa.string()
    if pa.types.is_dictionary(id_type):
        id_type = id_type.value_type
    fields = [pa.field("id", id_type, nullable=False)]
    for name in manifest.passthrough:
        f = manifest.schema.field(name)
        t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        fields.append(pa.field(name, t))
    vec = pa.list_(pa.float32(), embed_dim)
    if images:
        fields.append(pa.field("image_embedding", vec))
    if texts:
        fields.append(pa.field("text_embedding", vec))
    if label:
        fields.extend(LABEL_FIELDS)
    if caption:
        fields.extend(CAPTION_FIELDS)
    if images and texts:
        fields.append(CLIP_SCORE_FIELD)
    fields.extend(heads)
    fields += [pa.field("status", pa.string(), nullable=False), pa.field("error", pa.string())]
    return pa.schema(fields)


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """``[(i, j)]`` index ranges of sorted ``rows`` whose row numbers are consecutive."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:]))


class PieceWriter:
    """Ray Data batch function: write a batch of result rows as pieces, return their metadata."""

    def __init__(self, pieces_dir: str, schema: pa.Schema, tmp_prefix: str, s3: pio.S3Options | None = None):
        self.pieces_dir = pieces_dir
        self.schema = schema.append(pa.field(ROW_COL, pa.int64()))  # kept until compaction
        self.tmp_prefix = tmp_prefix
        self.s3 = s3

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0, own_requests = time.perf_counter(), pio.s3_request_counts()
        seconds = {name[4:]: float(pc.sum(batch.column(name)).as_py() or 0.0)
                   for name in batch.column_names if name.startswith("__t_")}
        requests: Counter = Counter()
        for name in (n for n in batch.column_names if n.startswith("__s3_")):
            for cell in pc.drop_null(batch.column(name)).to_pylist():
                requests.update(json.loads(cell))
        encoders = [v for v in pc.unique(batch.column(ACTOR_INFO_COL)).to_pylist() if v] \
            if ACTOR_INFO_COL in batch.column_names else []
        encoder = encoders[0] if len(encoders) == 1 else json.dumps(encoders)
        node = node_id()
        rows = []
        order = pc.sort_indices(batch, [(SHARD_COL, "ascending"), (ROW_COL, "ascending")])
        batch = batch.take(order)
        shard_ids = batch.column(SHARD_COL).to_numpy()
        row_ids = batch.column(ROW_COL).to_numpy()
        for shard in np.unique(shard_ids):
            lo, hi = np.searchsorted(shard_ids, [shard, shard + 1])
            for i, j in contiguous_runs(row_ids[lo:hi]):
                start, stop = int(row_ids[lo + i]), int(row_ids[lo + j - 1]) + 1
                path = piece_path(self.pieces_dir, int(shard), start, stop)
                pio.write_parquet_atomic(self._conform(batch.slice(lo + i, j - i)), path, self.s3,
                                         tmp_prefix=self.tmp_prefix, compression="lz4")
                rows.append((int(shard), start, stop, path))
        seconds["write"] = time.perf_counter() - t0
        requests.update(pio.s3_requests_since(own_requests))
        stage, s3_json = json.dumps(seconds, sort_keys=True), json.dumps(dict(requests), sort_keys=True)
        cols = list(zip(*rows)) if rows else [[], [], [], []]
        n = len(rows)
        # the batch's seconds and requests go on its first piece only, so the driver's sums count them once
        return pa.Table.from_arrays([*(pa.array(c, t) for c, t in zip(cols, PIECE_SCHEMA.types[:4])),
                                     pa.array([node] * n), pa.array([encoder] * n),
                                     pa.array([stage] + ["{}"] * (n - 1) if n else [], pa.string()),
                                     pa.array([s3_json] + ["{}"] * (n - 1) if n else [], pa.string())],
                                    schema=PIECE_SCHEMA)

    def _conform(self, table: pa.Table) -> pa.Table:
        arrays = []
        for f in self.schema:
            col = table.column(f.name)
            col = col.cast(f.type) if col.type != f.type else col
            arrays.append(valid_utf8(col) if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) else col)
        return pa.Table.from_arrays(arrays, schema=self.schema)


def valid_utf8(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column whose cells are valid UTF-8: bytes that are not (Parquet lets other writers
    store them) become U+FFFD, so the results stay readable by every Arrow/Parquet reader. The
    row that used such a cell as its image path or text already says so (``not_utf8``)."""
    try:
        col.validate(full=True)
        return col
    except pa.ArrowInvalid:
        raw = pc.cast(col, pa.large_binary()).to_pylist()
        return pa.chunked_array([pa.array([None if b is None else b.decode("utf-8", "replace") for b in raw], col.type)])


def write_pieces(ds, writer: PieceWriter, *, num_cpus: float = 0.1, max_retries: int = 3):
    """Thin Ray wrapper: the write stage as stateless tasks after the model actors. Ray Data
    spreads small tasks over the nodes that have room and keeps blocks over 50 MB beside their
    data, so writes go wherever CPU is free (``pieces_per_node`` shows where). A write is brief
    (a few hundred rows of embeddings compressed and stored), so it reserves little CPU: the
    model actors may take the rest of a node without leaving the writes unscheduled."""
    return ds.map_batches(writer, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
                          zero_copy_batch=True, max_retries=max_retries)


# --------------------------------------------------------------------------------------------
# Compaction: one Ray task per covered shard
# --------------------------------------------------------------------------------------------
def count_rows(table: pa.Table) -> dict[str, Any]:
    """rows / ok / error and errors per cause of a result table."""
    status = table.column("status")
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    causes: Counter = Counter()
    errors = table.column("error")
    for msg in errors.filter(pc.is_valid(errors)).to_pylist():
        causes.update(CAUSE_RE.findall(msg))
    counts = {"rows": table.num_rows, "ok": ok, "error": table.num_rows - ok,
              "errors_by_cause": dict(sorted(causes.items()))}
    if "label" in table.column_names:
        counts["labels"] = label_counts(table.column("label"), PART_LABELS)
    return counts


def label_counts(labels: pa.ChunkedArray | pa.Array, top: int) -> dict[str, int]:
    """Rows per predicted label (nulls, the failed rows, not counted), the ``top`` most common
    by name and the rest summed as :data:`OTHER_LABELS`, so a thousand-class run stays small."""
    counts = Counter({d["values"]: d["counts"] for d in pc.value_counts(labels.drop_null()).to_pylist()})
    return top_counts(counts, top)


def top_counts(counts: Counter, top: int) -> dict[str, int]:
    """The ``top`` largest entries of ``counts`` (ties by name) plus :data:`OTHER_LABELS` for the rest."""
    other = counts.get(OTHER_LABELS, 0)
    ranked = sorted(((k, v) for k, v in counts.items() if k != OTHER_LABELS), key=lambda kv: (-kv[1], kv[0]))
    out = dict(ranked[:top])
    other += sum(v for _, v in ranked[top:])
    if other:
        out[OTHER_LABELS] = other
    return out


def assemble_part(tables: list[pa.Table], shard: Shard, schema: pa.Schema) -> pa.Table:
    """Pure function: a shard's pieces -> its part table in manifest order, every row once.

    Pieces may overlap (a retried task split its batch differently); the first copy of a row
    is kept. Raises when a row is missing, so an incomplete part is never committed.
    """
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    table = table.take(pc.sort_indices(table, [(ROW_COL, "ascending")]))
    rows = table.column(ROW_COL).to_numpy()
    keep = np.ones(len(rows), dtype=bool)
    keep[1:] = rows[1:] != rows[:-1]
    if not keep.all():
        table, rows = table.filter(pa.array(keep)), rows[keep]
    if not np.array_equal(rows, np.arange(shard.start, shard.stop)):
        raise RuntimeError(f"shard {shard.index}: pieces hold {len(rows)} distinct rows, expected rows "
                           f"{shard.start}..{shard.stop - 1}")
    return table.select(schema.names).cast(schema)


def compact_shard(shard: Shard, pieces: list[str], part_path: str, schema: pa.Schema, pieces_dir: str,
                  provenance: dict[str, list[str]], tmp_prefix: str, s3: pio.S3Options | None = None) -> dict[str, Any]:
    """Read a covered shard's pieces, publish its part, delete the pieces; returns the part's counts.

    ``provenance`` (the encoders and the nodes that wrote the pieces) goes into the footer with
    the counts, so every part says what made it.
    """
    t0, requests = time.perf_counter(), pio.s3_request_counts()
    with ThreadPoolExecutor(max_workers=min(8, len(pieces))) as pool:
        tables = list(pool.map(lambda p: pio.read_parquet(p, s3), pieces))
    table = assemble_part(tables, shard, schema)
    stats = {**count_rows(table), **{k: sorted(set(v)) for k, v in provenance.items()}, "committed_on": node_id()}
    meta = {**(schema.metadata or {}), FOOTER_KEY: json.dumps(stats, sort_keys=True).encode()}
    pio.write_parquet_atomic(table.replace_schema_metadata(meta), part_path, s3, tmp_prefix=tmp_prefix)
    pio.remove_tree(pio.join(pieces_dir, f"{shard.index:05d}"), s3)
    return {**stats, "shard": shard.index, "seconds": time.perf_counter() - t0,
            "s3_requests": pio.s3_requests_since(requests)}


# --------------------------------------------------------------------------------------------
# What an earlier run committed, from the part footers
# --------------------------------------------------------------------------------------------
def committed_parts(results_dir: str, shards: list[Shard], s3: pio.S3Options | None = None
                    ) -> dict[int, dict[str, Any]]:
    """``{shard index: counts}`` of the shards whose part exists with the right number of rows.

    Counts come from the footer; a part with a wrong row count cannot come from an atomic
    commit of this plan, so it is treated as not committed and will be overwritten.
    """
    try:
        files = pio.list_files(results_dir, suffix=".parquet", s3=s3)
    except FileNotFoundError:
        return {}
    by_index = {s.index: s for s in shards}
    found: dict[int, str] = {}
    for path in files:
        m = PART_RE.match(path.replace("\\", "/").rsplit("/", 1)[-1])
        if m and int(m.group(1)) in by_index:
            found[int(m.group(1))] = path

    def check(item: tuple[int, str]) -> tuple[int, dict[str, Any] | None]:
        idx, path = item
        try:
            rows, meta = pio.parquet_footer(path, s3)
        except Exception:
            return idx, None
        if rows != by_index[idx].num_rows:
            return idx, None
        if meta and FOOTER_KEY in meta:
            return idx, json.loads(meta[FOOTER_KEY])
        return idx, count_rows(pio.read_parquet(path, s3, columns=["status", "error"]))  # an older part

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {i: c for i, c in pool.map(check, found.items()) if c is not None}


def clean_stale_temp_files(results_dir: str, live_run_id: str) -> int:
    """Remove the temp files of runs that are no longer alive (local only; S3 writes are single
    PUTs). The caller holds the output lease, so every other run's files are a dead run's."""
    import glob
    import os

    from pipelines.etl.lease import stale_temp_files

    if pio.is_s3(results_dir):
        return 0
    folder = pio.strip_scheme(results_dir)
    names = [os.path.basename(p) for p in glob.glob(os.path.join(folder, ".tmp-*"))]
    removed = 0
    for name in stale_temp_files(names, live_run_id):
        try:
            os.unlink(os.path.join(folder, name))
            removed += 1
        except OSError:
            pass
    return removed


__all__ = [
    "PIECES_DIR",
    "PIECE_SCHEMA",
    "PieceWriter",
    "assemble_part",
    "clean_stale_temp_files",
    "committed_parts",
    "compact_shard",
    "contiguous_runs",
    "count_rows",
    "part_name",
    "piece_path",
    "result_schema",
    "write_pieces",
]

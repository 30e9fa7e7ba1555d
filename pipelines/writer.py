"""Stage 4: commit complete shards as Parquet parts, and summarize the results.

Why the driver commits whole shards: a shard's rows come back from the actor pool in many
batches, in any order, interleaved with other shards. Writing each batch as it arrives would
leave partial shards on disk after a crash, and a resume could not tell which rows are missing
without reading everything back. Instead :class:`ShardWriter` buffers a shard's rows until all
of them are back, sorts them into manifest order, checks the count, and publishes
``results/part-XXXXX.parquet`` atomically (temp file + rename locally, one PUT on S3). A part
file therefore exists only when its shard is complete: it is the commit marker, and a re-run
skips exactly the shards that have one. Memory held is bounded by the shards in flight.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import io as pio
from .embed import ACTOR_INFO_COL
from .label import CAPTION_FIELDS, LABEL_FIELDS
from .reader import ROW_COL, SHARD_COL, Manifest, Shard

PART_RE = re.compile(r"^part-(\d+)\.parquet$")
CAUSE_RE = re.compile(r"(?:^|; )((?:image|text|row)\.[a-z_]+):")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def result_schema(
    manifest: Manifest,
    embed_dim: int,
    *,
    images: bool,
    texts: bool,
    label: bool,
    caption: bool,
) -> pa.Schema:
    """The results' Arrow schema: id, passthrough columns, then the stage outputs."""
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
    fields += [pa.field("status", pa.string(), nullable=False), pa.field("error", pa.string())]
    return pa.schema(fields)


def finalize_part(tables: list[pa.Table], shard: Shard, schema: pa.Schema) -> pa.Table:
    """Pure function: one shard's result batches -> the part table, in manifest row order.

    Raises if rows are missing or duplicated, so a bad part is never committed.
    """
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    table = table.sort_by(ROW_COL)
    rows = table.column(ROW_COL).to_numpy()
    expected = np.arange(shard.start, shard.stop)
    if len(rows) != len(expected) or not np.array_equal(rows, expected):
        raise RuntimeError(
            f"shard {shard.index}: got {len(rows)} rows ({len(np.unique(rows))} distinct), expected "
            f"rows {shard.start}..{shard.stop - 1}"
        )
    arrays = []
    for f in schema:
        col = table.column(f.name)
        if col.type != f.type:
            col = col.cast(f.type)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema)


class ShardWriter:
    """Collect result batches per shard and commit each shard once all its rows are back."""

    def __init__(
        self,
        results_dir: str,
        shards: list[Shard],
        schema: pa.Schema,
        *,
        s3: pio.S3Options | None = None,
        total_rows: int | None = None,
        done_rows: int = 0,
        log: Callable[[str], None] | None = None,
    ):
        self.results_dir = results_dir
        self.pending = {s.index: s for s in shards}
        self.schema = schema
        self.s3 = s3
        self.buffers: dict[int, list[pa.Table]] = {}
        self.counts: dict[int, int] = {}
        self.stage_seconds: Counter = Counter()
        self.actor_models: set[str] = set()  # JSON descriptions of the encoders the actors ran
        self.committed: list[int] = []
        self.rows_written = 0
        self.errors_written = 0
        self.total_rows = total_rows
        self.done_rows = done_rows  # rows already committed by an earlier run
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.t0 = time.perf_counter()
        self.write_seconds = 0.0

    def start(self) -> None:
        """Start the rows/s clock (call when the dataset starts streaming)."""
        self.t0 = time.perf_counter()

    def add(self, batch: pa.Table) -> None:
        """Take one result batch (any mix of shards)."""
        if batch.num_rows == 0:
            return
        for name in batch.column_names:
            if name.startswith("__t_"):
                self.stage_seconds[name[4:]] += float(pc.sum(batch.column(name)).as_py() or 0.0)
            elif name == ACTOR_INFO_COL:
                self.actor_models.update(v for v in pc.unique(batch.column(name)).to_pylist() if v)
        shard_ids = batch.column(SHARD_COL)
        unique = pc.unique(shard_ids).to_pylist()
        for sid in unique:
            part = batch.filter(pc.equal(shard_ids, sid)) if len(unique) > 1 else batch
            if sid not in self.pending:
                raise RuntimeError(f"received rows of shard {sid}, which is not pending (duplicate delivery?)")
            self.buffers.setdefault(sid, []).append(part)
            self.counts[sid] = self.counts.get(sid, 0) + part.num_rows
            shard = self.pending[sid]
            if self.counts[sid] > shard.num_rows:
                raise RuntimeError(f"shard {sid}: received {self.counts[sid]} rows, expected {shard.num_rows}")
            if self.counts[sid] == shard.num_rows:
                self._commit(shard)

    def _commit(self, shard: Shard) -> None:
        t0 = time.perf_counter()
        table = finalize_part(self.buffers.pop(shard.index), shard, self.schema)
        path = pio.join(self.results_dir, part_name(shard.index))
        pio.write_parquet_atomic(table, path, self.s3)
        del self.pending[shard.index]
        self.counts.pop(shard.index, None)
        self.committed.append(shard.index)
        errors = int(pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0)
        self.rows_written += table.num_rows
        self.errors_written += errors
        self.write_seconds += time.perf_counter() - t0
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        done = self.done_rows + self.rows_written
        total = f"/{self.total_rows}" if self.total_rows else ""
        pct = f" ({100.0 * done / self.total_rows:.0f}%)" if self.total_rows else ""
        self.log(
            f"[clip-etl] committed {part_name(shard.index)}: {table.num_rows} rows, {errors} errors | "
            f"{done}{total} rows{pct} | {self.rows_written / elapsed:.1f} rows/s"
        )

    def finish(self) -> None:
        """Every pending shard must have been committed; anything else is a lost-rows bug."""
        if self.pending:
            missing = sorted(self.pending)
            got = {s: self.counts.get(s, 0) for s in missing[:5]}
            raise RuntimeError(
                f"{len(missing)} shard(s) incomplete after the dataset finished (rows received: {got})"
            )


def committed_parts(results_dir: str, shards: list[Shard], s3: pio.S3Options | None = None) -> set[int]:
    """Shards whose part file exists and has the right number of rows (checked from its footer).

    A part with a wrong row count cannot come from an atomic commit of this plan; it is treated
    as not committed and will be overwritten.
    """
    try:
        files = pio.list_files(results_dir, suffix=".parquet", s3=s3)
    except FileNotFoundError:
        return set()
    by_index = {s.index: s for s in shards}
    found: dict[int, str] = {}
    for path in files:
        m = PART_RE.match(path.replace("\\", "/").rsplit("/", 1)[-1])
        if m and int(m.group(1)) in by_index:
            found[int(m.group(1))] = path

    def check(item: tuple[int, str]) -> int | None:
        idx, path = item
        try:
            rows = pio.parquet_metadata(path, s3)[0]
        except Exception:
            return None
        return idx if rows == by_index[idx].num_rows else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {i for i in pool.map(check, found.items()) if i is not None}


def clean_stale_temp_files(results_dir: str) -> int:
    """Remove temp files a killed run left behind (local only; S3 writes are single PUTs)."""
    import glob
    import os

    if pio.is_s3(results_dir):
        return 0
    removed = 0
    for path in glob.glob(os.path.join(pio.strip_scheme(results_dir), ".tmp-*")):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def summarize_results(results_dir: str, shards: list[Shard], s3: pio.S3Options | None = None) -> dict[str, Any]:
    """Counts over all committed parts: rows, ok, error, and errors per cause."""
    causes: Counter = Counter()
    rows = ok = err = 0
    paths = [pio.join(results_dir, part_name(s.index)) for s in shards]
    for batch in pio.iter_parquet_batches(paths, columns=["status", "error"], s3=s3):
        status = batch.column(0)
        rows += batch.num_rows
        n_ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
        ok += n_ok
        err += batch.num_rows - n_ok
        for msg in batch.column(1).to_pylist():
            if msg:
                for cause in CAUSE_RE.findall(msg):
                    causes[cause] += 1
    return {"rows_out": rows, "ok": ok, "error": err, "errors_by_cause": dict(sorted(causes.items()))}


__all__ = [
    "ShardWriter",
    "clean_stale_temp_files",
    "committed_parts",
    "finalize_part",
    "part_name",
    "result_schema",
    "summarize_results",
]

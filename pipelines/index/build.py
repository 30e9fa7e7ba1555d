"""Build a sharded, tuned FAISS index from embedding Parquet (the pipeline's ``results/``).

The driver plans, coordinates and records; everything that reads result rows, vectors or index
files runs in Ray tasks, which hand the driver back only small metadata (counts, bytes,
seconds, search parameters). The steps, in order (``build_index`` calls them one after another;
each task's output is a file, so a re-run resumes where a killed build stopped):

1. **Plan** (driver: :func:`plan_build`, :func:`start_or_resume`) from Parquet footers only:
   files, row counts, row groups, the dimension, the index (:mod:`pipelines.index.select`) and
   the shard ranges, saved as ``_build/plan.json``. A re-run with the same plan resumes; a
   different one starts over.
2. **Sample** and 3. **train** (:func:`sample_and_train`: one :func:`train_task`, which holds the
   sample, as bounded by the memory budget): a seeded random subset of rows, read from only the
   row groups that hold them, is split into the training vectors and the *held-out rows*, kept
   out of the data shards and never trained on. The *tuning queries* are made from them
   (:mod:`pipelines.index.tuning`): the held-out rows moved off the data by noise scaled to its
   nearest-neighbour spacing, or a sample of the user's own queries (``index.tuning_queries``),
   saved as ``_build/tuning_vectors.npz``. The empty index is trained once, deterministically
   (``_build/trained.faiss``). The held-out rows get a small shard of their own,
   ``shard-queries``, so that they are indexed like every other row without a data shard being
   rewritten, and are saved on their own as ``_build/tuning_queries.parquet``, last: its
   presence means steps 2-3 are done.
4. **Add shards** (:func:`add_shards`: one :func:`shard_task` per shard): stream a contiguous
   range of input rows minus the held-out rows, add them to a copy of the trained index, and
   compute the exact top-100 of the tuning queries over the same rows (ground truth at no extra
   pass over the data). A shard's files are each written once, atomically,
   ``_build/shard-NNNNN.json`` last: its presence means the shard is done. Every valid row is in
   exactly one shard: the shard ranges partition the rows, and the held-out rows are in
   ``shard-queries`` only.
5. **Tune** (:func:`tune_search`: one :func:`tune_task`) ``nprobe``/``efSearch`` on the data
   shards, which do not hold the held-out rows, so that no query finds its own source: the
   smallest value (= the fastest) whose recall@10 against exact search reaches ``target_recall``
   with 95% confidence (the low end of its interval, not its mean), and recall@1/10/100. Saved
   as ``_build/tuning.json``.
6. **Merge and measure** (:func:`merge_and_measure`: one :func:`finish_task`): merge all shards
   into one index when asked and it fits the memory budget; measure queries/s and latency of
   what :func:`pipelines.index.open_index` will serve.
7. **Write** ``index.json`` (driver: :func:`write_index_json`), last: its presence means the
   index is complete.

Memory: a shard task holds one shard's index and one reader batch; the train task holds the
training sample; the driver holds none of them. Vectors never all sit in RAM unless the chosen
index (Flat/HNSW) is itself made of them, which the memory budget allowed. See ``docs/index.md``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from clip_core.zero_shot import l2_normalize

from pipelines import storage as pio
from pipelines.config import RayConfig
from pipelines.index.open import INDEX_JSON, ShardedIndex, load_shards, merge_topk, read_ids
from pipelines.index.select import (
    GIB,
    choose_index,
    index_memory_bytes,
    parse_factory,
    search_parameter_grid,
    train_size_for,
)
from pipelines.index.tuning import (
    NN_PROBES,
    NN_REFERENCE_ROWS,
    QUERY_NOISE,
    RECALL_CONFIDENCE,
    SOURCE_FILE,
    SOURCE_PERTURBED,
    RecallInterval,
    check_query_file,
    nn_distance_estimate,
    perturb,
    query_hits,
    read_query_file,
    recall_interval,
    subsample,
)
from pipelines.storage import S3Options
from pipelines.ray_runtime import ray_session

# Version 3: the tuning queries are the held-out rows moved off the data (or a user's file), not
# the rows themselves, and the shards' ground truth is theirs; version 2 had the held-out rows
# in a shard of their own already (version 1 appended them to the last shard after tuning). An
# older build state is not resumed but started over.
FORMAT = "clip-etl-index/3"
BUILD_DIR = "_build"
PLAN_FILE = "plan.json"
TRAINED_FILE = "trained.faiss"
QUERIES_FILE = "tuning_queries.parquet"  # the held-out rows: what the data shards leave out
QUERY_VECTORS_FILE = "tuning_vectors.npz"  # the vectors tuning searches with, and where they came from
TUNING_FILE = "tuning.json"
QUERY_SHARD = "shard-queries"
SEED = 1234
DEFAULT_VECTORS_PER_SHARD = 1_000_000
READ_BATCH_ROWS = 2048  # small batches: big transient buffers stay resident under glibc malloc
# Stream column chunks through a small buffer instead of loading a whole row group's column:
# results files may have row groups of a million rows.
PARQUET_BUFFER_BYTES = 4 << 20
GROUND_TRUTH_K = 100
# Graph construction effort. FAISS's default (40) leaves poorly connected regions in clustered
# data, which then need a huge efSearch: on 200k clustered vectors and noisy queries, 40 needed
# efSearch ~3000 for recall@10 0.994, 64 needs 96 (30x the queries/s) for 1.1x the insertion
# time; 80 gained almost nothing more (0.995 at 64) for another 1.2x (BENCHMARKS.md).
HNSW_EF_CONSTRUCTION = 64
MAX_TUNING_QUERIES = 1000
# Environment hook for tests of resumability: the driver exits abruptly (like a kill) after N
# shards ("2") or after tuning ("tuned").
CRASH_ENV = "CLIP_ETL_INDEX_CRASH_AFTER_SHARDS"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        print(f"[index] {CRASH_ENV}={name}: exiting abruptly", file=sys.stderr, flush=True)
        os._exit(75)


class IndexBuildError(RuntimeError):
    """A build that cannot proceed (no vectors, bad columns, budget too small...)."""


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t, 3)


class _PhaseClock:
    """Seconds per phase of work whose phases interleave (a shard reads, computes ground truth and
    adds batch after batch), so that ``index.json`` can say where a build's time went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def rounded(self) -> dict[str, float]:
        return {f"{phase}_s": round(sec, 3) for phase, sec in self.seconds.items()}


# -------------------------------------------------------------------------------- input ---

@dataclass
class InputFile:
    """One Parquet file of the input and where its rows sit in the global row numbering."""

    path: str
    start: int  # global row number of its first row
    row_groups: list[int]  # rows per row group

    @property
    def rows(self) -> int:
        return sum(self.row_groups)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "start": self.start, "row_groups": self.row_groups}


def _open_parquet(path: str, s3: S3Options | None):
    fs = pio.filesystem_for(path, s3)
    return fs.open_input_file(pio.strip_scheme(path))


def scan_input(input_path: str, s3: S3Options | None) -> tuple[list[InputFile], pa.Schema]:
    """List the input Parquet files and read their footers (no data pages)."""
    try:
        paths = pio.list_files(input_path, ".parquet", s3)
    except FileNotFoundError:
        raise IndexBuildError(f"no embeddings to index: {input_path} does not exist") from None
    if not paths:
        raise IndexBuildError(f"no Parquet files under {input_path}")
    files: list[InputFile] = []
    schema = None
    start = 0
    for path in paths:
        with _open_parquet(path, s3) as f:
            md = pq.ParquetFile(f).metadata
            if schema is None:
                schema = md.schema.to_arrow_schema()
            groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        files.append(InputFile(path, start, groups))
        start += sum(groups)
    assert schema is not None
    return files, schema


def _dim_from_schema(schema: pa.Schema, column: str) -> int | None:
    t = schema.field(column).type
    if pa.types.is_fixed_size_list(t):
        return int(t.list_size)
    return None


def _check_columns(schema: pa.Schema, id_column: str, embedding_column: str) -> None:
    names = set(schema.names)
    missing = [c for c in (id_column, embedding_column) if c not in names]
    if missing:
        raise IndexBuildError(
            f"input lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names)}); "
            "choose the columns with build_index(id_column=..., embedding_column=...) or index.embedding_column"
        )
    t = schema.field(embedding_column).type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise IndexBuildError(f"column {embedding_column!r} is {t}, not a list of floats")


COUNT_KEYS = ("rows", "kept", "status_not_ok", "null_embedding", "null_id", "bad_vector")


def extract_vectors(
    batch: pa.RecordBatch, id_column: str, embedding_column: str, dim: int
) -> tuple[pa.Array, np.ndarray, dict[str, int]]:
    """Valid rows of a batch as (string ids, normalized float32 vectors [m, dim], skip counts).

    A row is kept when its ``status`` (if the column exists) is ``ok``, its id and embedding are
    not null, and the embedding has ``dim`` finite values. Everything else is counted, by reason.
    """
    ids, vecs, counts, _ = _extract(batch, id_column, embedding_column, dim)
    return ids, vecs, counts


def _extract(
    batch: pa.RecordBatch, id_column: str, embedding_column: str, dim: int
) -> tuple[pa.Array, np.ndarray, dict[str, int], np.ndarray]:
    """:func:`extract_vectors` plus the batch row numbers of the kept rows."""
    n = batch.num_rows
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["rows"] = n
    names = batch.schema.names
    keep = np.ones(n, dtype=bool)
    if "status" in names:
        ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
        counts["status_not_ok"] = int((~ok).sum())
        keep &= ok
    emb = batch.column(embedding_column)
    has_emb = emb.is_valid().to_numpy(zero_copy_only=False)
    counts["null_embedding"] = int((keep & ~has_emb).sum())
    keep &= has_emb
    ids = batch.column(id_column)
    has_id = ids.is_valid().to_numpy(zero_copy_only=False)
    counts["null_id"] = int((keep & ~has_id).sum())
    keep &= has_id
    if not pa.types.is_fixed_size_list(emb.type):
        lengths = pc.fill_null(pc.list_value_length(emb), -1).to_numpy(zero_copy_only=False)
        right = lengths == dim
        counts["bad_vector"] += int((keep & ~right).sum())
        keep &= right
    elif emb.type.list_size != dim:
        counts["bad_vector"] += int(keep.sum())
        keep[:] = False
    mask = pa.array(keep)
    emb = emb.filter(mask)
    ids = pc.cast(ids.filter(mask), pa.string())
    m = len(emb)
    values = emb.flatten() if m else pa.array([], pa.float32())
    if values.type != pa.float32():
        values = pc.cast(values, pa.float32())
    vecs = values.to_numpy(zero_copy_only=values.null_count == 0).reshape(m, dim)
    rows = np.flatnonzero(keep)
    finite = np.isfinite(vecs).all(axis=1)
    if not finite.all():
        counts["bad_vector"] += int((~finite).sum())
        vecs = vecs[finite]
        ids = ids.filter(pa.array(finite))
        rows = rows[finite]
    vecs = l2_normalize(vecs)  # [m, dim] the one copy: Arrow's buffers are read-only
    counts["kept"] = len(vecs)
    return ids, np.ascontiguousarray(vecs, dtype=np.float32), counts, rows


def _columns(schema_names: list[str], id_column: str, embedding_column: str) -> list[str]:
    cols = [id_column, embedding_column]
    if "status" in schema_names and "status" not in cols:
        cols.append("status")
    return cols


def iter_row_range(
    files: list[InputFile], start: int, end: int, columns: list[str], s3: S3Options | None,
    batch_rows: int = READ_BATCH_ROWS,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream ``(first row number, batch)`` over the rows ``[start, end)`` of the concatenated
    input, touching only the row groups that hold them."""
    for f in files:
        if f.start + f.rows <= start or f.start >= end:
            continue
        with _open_parquet(f.path, s3) as handle:
            pf = pq.ParquetFile(handle, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
            g_start = f.start
            for g, g_rows in enumerate(f.row_groups):
                g_end = g_start + g_rows
                if g_end > start and g_start < end:
                    pos = g_start
                    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns):
                        b_end = pos + batch.num_rows
                        lo, hi = max(start, pos), min(end, b_end)
                        if hi > lo:
                            yield lo, batch.slice(lo - pos, hi - lo)
                        pos = b_end
                g_start = g_end


def _peek_dim(files: list[InputFile], embedding_column: str, s3: S3Options | None) -> int:
    """Dimension of the first non-null embedding, for variable-length list columns (run in a task:
    the one read of data pages that planning needs)."""
    for f in files:
        for _, batch in iter_row_range([f], f.start, f.start + f.rows, [embedding_column], s3):
            lengths = pc.drop_null(pc.list_value_length(batch.column(0)))
            if len(lengths):
                return int(lengths[0].as_py())
    raise IndexBuildError(f"column {embedding_column!r} holds no embeddings: nothing to index")


# --------------------------------------------------------------------------------- plan ---

def plan_shards(total_rows: int, shards: int) -> list[tuple[int, int]]:
    """Split ``total_rows`` input rows into ``shards`` contiguous, nearly equal ranges."""
    shards = max(1, min(shards, max(total_rows, 1)))
    bounds = [round(i * total_rows / shards) for i in range(shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(shards)]


def _shard_count(total_rows: int, kind: str, shards: int | None, vectors_per_shard: int | None) -> int:
    if shards is not None:
        if shards < 1:
            raise IndexBuildError(f"index.shards must be >= 1, got {shards}")
        return int(shards)
    if vectors_per_shard is not None:
        if vectors_per_shard < 1:
            raise IndexBuildError(f"index.vectors_per_shard must be >= 1, got {vectors_per_shard}")
        return max(1, math.ceil(total_rows / vectors_per_shard))
    if kind == "hnsw":
        return 1  # one graph: several graphs would each be searched in full
    return max(1, math.ceil(total_rows / DEFAULT_VECTORS_PER_SHARD))


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


@dataclass
class Build:
    """The plan of one build: all that the steps and their tasks need (picklable: shipped to tasks)."""

    input_path: str
    out_dir: str
    files: list[InputFile]
    columns: list[str]
    id_column: str
    embedding_column: str
    dim: int
    factory: str
    selection: dict[str, Any]
    needs_training: bool
    ranges: list[tuple[int, int]]
    train_size: int
    n_queries: int  # held-out rows
    max_file_queries: int  # tuning queries taken from query_file at most
    query_file: str | None  # index.tuning_queries: real queries to tune on (None: perturbed held-out rows)
    query_file_info: dict[str, Any] | None  # its size and change stamp
    target_recall: float
    merge: bool
    memory_budget_gb: float
    s3: S3Options | None
    progress: bool

    @property
    def total_rows(self) -> int:
        return self.files[-1].start + self.files[-1].rows

    def state(self, name: str) -> str:
        """Path of a build-state file under ``_build/``."""
        return pio.join(self.out_dir, BUILD_DIR, name)

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"[index] {msg}", file=sys.stderr, flush=True)

    @property
    def sample_rows(self) -> int:
        """Rows to sample: the held-out rows, the training set and, for perturbed queries, enough
        rows to measure the data's nearest-neighbour spacing on."""
        reference = NN_REFERENCE_ROWS if self.query_file is None else 0
        return self.n_queries + max(self.train_size, reference)

    def query_plan(self) -> dict[str, Any]:
        """Where the tuning queries come from, and how they are judged (part of ``plan.json``)."""
        plan: dict[str, Any] = {"confidence": RECALL_CONFIDENCE}
        if self.query_file is None:
            return {**plan, "source": SOURCE_PERTURBED, "noise": QUERY_NOISE, "reference_rows": NN_REFERENCE_ROWS}
        return {**plan, "source": SOURCE_FILE, "path": self.query_file, "file": self.query_file_info,
                "max_queries": self.max_file_queries}

    def to_plan(self) -> dict[str, Any]:
        """``plan.json``: everything that, when changed, makes a resume build something else."""
        plan = {"format": FORMAT, "input": self.input_path, "files": [f.to_dict() for f in self.files],
                "columns": {"id": self.id_column, "embedding": self.embedding_column}, "dim": self.dim,
                "factory": self.factory, "shards": self.ranges, "train_size": self.train_size,
                "queries": self.n_queries, "tuning": self.query_plan(), "seed": SEED,
                "target_recall": self.target_recall, "merge": self.merge}
        return json.loads(json.dumps(plan))  # the form it has when read back from plan.json


def _selection(factory: str | None, total_rows: int, dim: int, memory_budget_gb: float) -> dict[str, Any]:
    """The index to build (``index.factory`` or the automatic choice), as ``index.json`` records it."""
    budget = memory_budget_gb * GIB
    if not factory:
        try:
            return choose_index(total_rows, dim, memory_budget_gb).to_dict()
        except ValueError as e:
            raise IndexBuildError(str(e)) from None
    p = parse_factory(factory, dim)
    selection = {"factory": factory, "kind": p.kind, "estimated_bytes": index_memory_bytes(factory, total_rows, dim),
                 "train_size": train_size_for(factory, total_rows, dim, budget), "reason": "index.factory"}
    if p.kind == "other" or (p.kind == "flat" and factory.strip() != "Flat"):
        selection["train_size"] = selection["train_size"] or min(total_rows, 65536)
    return selection


def plan_build(
    input_path: str, out_dir: str, files: list[InputFile], schema: pa.Schema, *, id_column: str,
    embedding_column: str, factory: str | None, shards: int | None, vectors_per_shard: int | None,
    memory_budget_gb: float, target_recall: float, merge: bool, train_sample: int | None,
    tuning_queries: int | None, tuning_query_file: str | None, s3: S3Options | None, progress: bool,
    start_ray: Callable[[], None],
) -> Build:
    """Step 1: the plan, from the footers (plus, for variable-length lists, one batch read in a task,
    for which it calls ``start_ray``)."""
    total_rows = files[-1].start + files[-1].rows
    if total_rows == 0:
        raise IndexBuildError(f"{input_path} holds no rows: nothing to index")
    dim = _dim_from_schema(schema, embedding_column)
    if dim is None:
        start_ray()
        dim = _run_task(_peek_dim, files, embedding_column, s3, what="reading the embedding dimension")
    selection = _selection(factory, total_rows, dim, memory_budget_gb)
    n_queries = tuning_queries if tuning_queries is not None else min(MAX_TUNING_QUERIES, max(1, total_rows // 10))
    return Build(
        input_path=input_path, out_dir=out_dir, files=files,
        columns=_columns(schema.names, id_column, embedding_column), id_column=id_column,
        embedding_column=embedding_column, dim=dim, factory=selection["factory"],
        selection=selection, needs_training=not new_index(selection["factory"], dim).is_trained,
        ranges=plan_shards(total_rows, _shard_count(total_rows, selection["kind"], shards, vectors_per_shard)),
        train_size=int(train_sample if train_sample is not None else selection["train_size"]),
        n_queries=int(n_queries), max_file_queries=int(tuning_queries or MAX_TUNING_QUERIES),
        query_file=tuning_query_file or None,
        query_file_info=_query_file_info(tuning_query_file, s3), target_recall=target_recall, merge=bool(merge),
        memory_budget_gb=memory_budget_gb, s3=s3, progress=progress,
    )


def _query_file_info(path: str | None, s3: S3Options | None) -> dict[str, Any] | None:
    """The stamp of ``index.tuning_queries`` (None when not given); a bad one fails the plan."""
    if not path:
        return None
    try:
        return check_query_file(path, s3)
    except ValueError as e:
        raise IndexBuildError(f"index.tuning_queries: {e}") from None


def start_or_resume(build: Build) -> dict | None:
    """Keep an interrupted build of the same plan, clear a different one; the ``index.json`` of
    the same build when it is already complete (None: there is work to do)."""
    s3, plan = build.s3, build.to_plan()
    plan_path, index_json = build.state(PLAN_FILE), pio.join(build.out_dir, INDEX_JSON)
    old_plan = pio.read_json(plan_path, s3) if pio.exists(plan_path, s3) else None
    if old_plan is not None:
        differs = _plan_difference(old_plan, plan)
        if differs:
            build.say(f"{build.out_dir} holds a build with a different {differs}: starting over")
            _remove_tree(build.out_dir, s3)
            old_plan = None
        elif pio.exists(index_json, s3):
            build.say(f"{build.out_dir} is already built and up to date")
            return pio.read_json(index_json, s3)
    elif pio.exists(index_json, s3):
        build.say(f"{build.out_dir} holds an index without build state: rebuilding it")
        _remove_tree(build.out_dir, s3)
    if old_plan is None:
        pio.write_json_atomic(plan_path, plan, s3)
    _clean_temp(build.out_dir)
    sel = build.selection
    build.say(f"{build.total_rows} rows in {len(build.files)} file(s), dim {build.dim}: {build.factory} "
              f"({sel['reason']}), {len(build.ranges)} shard(s), ~{sel['estimated_bytes'] / GIB:.2f} GiB")
    return None


def _plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first plan.json key whose value differs (None: the same build)."""
    for key in ("format", "files", "columns", "dim", "factory", "shards", "train_size", "queries", "tuning",
                "seed", "target_recall", "merge"):
        if old.get(key) != new.get(key):
            return key
    return None


def _remove_tree(out_dir: str, s3: S3Options | None) -> None:
    """Delete a previous (different) build's files: shards, merged index, build state, index.json."""
    fs = pio.fsspec_filesystem(out_dir, s3)
    root = pio.strip_scheme(out_dir)
    if not fs.exists(root):
        return
    for p in fs.find(root):
        name = p.rsplit("/", 1)[-1]
        if name == INDEX_JSON or name.startswith(("shard-", "merged", ".tmp-")) or f"/{BUILD_DIR}/" in p:
            fs.rm(p)


def _clean_temp(out_dir: str) -> None:
    """Remove temporary files a killed build left behind (local outputs; S3 PUTs are atomic)."""
    if pio.is_s3(out_dir):
        return
    for root in (out_dir, os.path.join(out_dir, BUILD_DIR)):
        if os.path.isdir(root):
            for name in os.listdir(root):
                if name.startswith(".tmp-"):
                    try:
                        os.unlink(os.path.join(root, name))
                    except OSError:
                        pass


# ----------------------------------------------------------------------------- sampling ---

@dataclass
class Sample:
    """Valid vectors drawn at random from the input, with their ids and input row numbers."""

    vectors: np.ndarray
    ids: np.ndarray  # str
    rows: np.ndarray  # int64 global row numbers

    def __len__(self) -> int:
        return len(self.vectors)

    def part(self, sl: slice) -> "Sample":
        return Sample(self.vectors[sl], self.ids[sl], self.rows[sl])


def read_sample(
    files: list[InputFile], total_rows: int, want: int, columns: list[str], id_column: str,
    embedding_column: str, dim: int, s3: S3Options | None, seed: int = SEED,
) -> Sample:
    """A seeded uniform sample of valid rows, shuffled; reads only the row groups holding picks.

    ``want`` rows are picked (plus a margin for rows that turn out invalid); the result may be
    shorter when many rows are errors. The same input and seed always give the same sample.
    """
    rng = np.random.default_rng(seed)
    pick_n = min(total_rows, int(want * 1.1) + 64)
    if pick_n >= total_rows:
        picks = np.arange(total_rows, dtype=np.int64)
    else:
        picks = np.sort(rng.choice(total_rows, size=pick_n, replace=False).astype(np.int64))
    vecs: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for f in files:
        g_start = f.start
        for g_rows in f.row_groups:
            g_end = g_start + g_rows
            lo, hi = np.searchsorted(picks, [g_start, g_end])
            if hi > lo:
                local = picks[lo:hi]
                for pos, batch in iter_row_range([f], g_start, g_end, columns, s3):
                    a, b = np.searchsorted(local, [pos, pos + batch.num_rows])
                    if b > a:
                        chosen = local[a:b]
                        sub = batch.take(pa.array(chosen - pos))
                        bid, v, _, kept = _extract(sub, id_column, embedding_column, dim)
                        vecs.append(v)
                        ids.append(np.asarray(bid.to_pylist(), dtype=str))
                        rows.append(chosen[kept])
            g_start = g_end
    if not vecs:
        return Sample(np.zeros((0, dim), np.float32), np.zeros(0, str), np.zeros(0, np.int64))
    sample = Sample(np.concatenate(vecs), np.concatenate(ids), np.concatenate(rows).astype(np.int64))
    perm = np.random.default_rng(seed + 1).permutation(len(sample))[:want]
    return Sample(np.ascontiguousarray(sample.vectors[perm]), sample.ids[perm], sample.rows[perm])


# ----------------------------------------------------------------------------- training ---

class _Threads:
    """Temporarily set FAISS's OpenMP thread count."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n)

    def __exit__(self, *exc):
        faiss.omp_set_num_threads(self.old)


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index; PQ codes skip polysemous training (useless for inner product)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(f"invalid FAISS factory string {factory!r} for dimension {dim}: "
                              f"{str(e).splitlines()[0] if str(e) else e}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        faiss.downcast_index(ivf).do_polysemous_training = False
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    graphs = [inner] + ([faiss.downcast_index(ivf.quantizer)] if ivf is not None else [])
    for g in graphs:
        if isinstance(g, faiss.IndexHNSW):
            g.hnsw.efConstruction = max(g.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    return index


def _release_arrow_memory() -> None:
    """Hand memory Arrow's allocator keeps cached for reuse back to the system, so the reader
    batches of one step do not stay resident through the next."""
    try:
        pa.default_memory_pool().release_unused()
    except AttributeError:  # pragma: no cover - older pyarrow
        pass


def _presize(vec: Any, size: int) -> None:
    """Give a FAISS vector the capacity for ``size`` elements without changing its length."""
    current = vec.size()
    if size > current:
        vec.resize(size)
        vec.resize(current)


def reserve(index: faiss.Index, n: int) -> None:
    """Allocate room for ``n`` more vectors in flat or graph storage before adding them.

    FAISS grows these arrays like ``std::vector``: each reallocation briefly holds the old and the
    new copy, which took a build to ~1.5x the index size. Sizing them once keeps the peak at the
    index size (the budget). Inverted lists grow per list and need nothing. Best effort.
    """
    try:
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        if isinstance(inner, faiss.IndexHNSW):
            storage = faiss.downcast_index(inner.storage)
            if isinstance(storage, faiss.IndexFlatCodes):
                _presize(storage.codes, (storage.ntotal + n) * storage.code_size)
            m = inner.hnsw.nb_neighbors(1)
            _presize(inner.hnsw.neighbors, inner.hnsw.neighbors.size() + n * (2 * m + 2))
        elif isinstance(inner, faiss.IndexFlatCodes):
            _presize(inner.codes, (inner.ntotal + n) * inner.code_size)
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - other FAISS versions
        pass


def train_index(index: faiss.Index, sample: np.ndarray, say: Callable[[str], None]) -> faiss.Index:
    """Train ``index`` on ``sample`` so that the same sample always gives the same index.

    FAISS's own training is deterministic for flat coarse quantizers (seeded k-means). An HNSW
    coarse quantizer, however, is built by parallel insertion, whose graph depends on thread
    timing, and FAISS even runs k-means through it. Here k-means runs against an exact index,
    the graph is built on one thread, and only then are the codes (PQ) trained.
    """
    if index.is_trained:
        return index
    ivf = faiss.try_extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if ivf is None or not isinstance(quantizer, faiss.IndexHNSW):
        index.train(sample)
        return index
    x = sample
    pre = faiss.downcast_index(index) if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform) else None
    if pre is not None:
        for i in range(pre.chain.size()):
            vt = faiss.downcast_VectorTransform(pre.chain.at(i))
            if not vt.is_trained:
                vt.train(x)
            x = vt.apply(x)
    ivf = faiss.downcast_index(ivf)
    clus = faiss.Clustering(ivf.d, ivf.nlist, ivf.cp)
    assign = faiss.IndexFlat(ivf.d, ivf.metric_type)
    clus.train(x, assign)
    centroids = faiss.vector_to_array(clus.centroids).reshape(ivf.nlist, ivf.d)
    say(f"coarse quantizer: {ivf.nlist} centroids, building its graph")
    quantizer.reset()
    with _Threads(1):
        quantizer.add(centroids)
    quantizer.is_trained = True
    ivf.train(x)  # sees a trained quantizer with nlist entries: trains only the codes
    if pre is not None:
        pre.is_trained = True
    return index


def _serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def _deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# -------------------------------------------------------------------------------- files ---

def publish_index(index: faiss.Index, dest: str, s3: S3Options | None) -> int:
    """Write a FAISS index to ``dest`` (local or S3) so that it appears whole or not at all; return
    its size in bytes.

    Streams through a temporary file rather than serializing into memory, so a shard costs its
    own size once, not twice.
    """
    if pio.is_s3(dest):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".faiss")
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            size = os.path.getsize(tmp)
            pio.fsspec_filesystem(dest, s3).put_file(tmp, pio.strip_scheme(dest))
        finally:
            os.unlink(tmp)
        return size
    dest = pio.strip_scheme(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(dest))
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size


def _write_npz(path: str, s3: S3Options | None, **arrays: np.ndarray) -> None:
    import io as _io

    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    pio.write_bytes_atomic(path, buf.getvalue(), s3)


def _read_npz(path: str, s3: S3Options | None) -> dict[str, np.ndarray]:
    import io as _io

    with np.load(_io.BytesIO(pio.read_bytes(path, s3))) as z:
        return {k: z[k] for k in z.files}


def _write_ids(ids: pa.Array, path: str, s3: S3Options | None) -> None:
    pio.write_parquet_atomic(pa.table({"id": ids}), path, s3)


@contextmanager
def _local_view(out_dir: str, names: list[str], s3: S3Options | None) -> Iterator[str]:
    """A local directory holding ``names`` from ``out_dir`` (itself when local; a temp copy for S3),
    because FAISS memory-maps only local files."""
    if not pio.is_s3(out_dir):
        yield pio.strip_scheme(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="clip-etl-index-") as tmp:
        for name in names:
            pio.fetch_to_local(pio.join(out_dir, name), os.path.join(tmp, name), s3)
        yield tmp


def shard_files(out_dir: str, name: str) -> dict[str, str]:
    """A shard's files: the index and ids next to ``index.json``, its build state under ``_build/``."""
    return {
        "faiss": pio.join(out_dir, f"{name}.faiss"),
        "ids": pio.join(out_dir, f"{name}.ids.parquet"),
        "truth": pio.join(out_dir, BUILD_DIR, f"{name}.truth.npz"),
        "meta": pio.join(out_dir, BUILD_DIR, f"{name}.json"),
    }


def _shard_done(build: Build, number: int) -> bool:
    """All of a data shard's files are there (a killed task leaves some, or none)."""
    return all(pio.exists(p, build.s3) for p in shard_files(build.out_dir, shard_name(number)).values())


def _write_shard(build: Build, name: str, index: faiss.Index, ids: pa.Array, counts: dict[str, int],
                 truth: TopK | None = None, seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Write a shard's files, each atomically and once; the metadata last, so that its presence
    means the shard is done. ``seconds``: the shard's time per phase, recorded with the write's."""
    t0 = time.perf_counter()
    files = shard_files(build.out_dir, name)
    _write_ids(ids, files["ids"], build.s3)
    if truth is not None:
        _write_npz(files["truth"], build.s3, scores=truth.scores, positions=truth.positions)
    meta = {"count": int(index.ntotal), "bytes": publish_index(index, files["faiss"], build.s3), "counts": counts}
    if seconds is not None:
        meta["seconds"] = {**seconds, "write_s": round(time.perf_counter() - t0, 3)}
    pio.write_json_atomic(files["meta"], meta, build.s3)
    return meta


ShardSummary = tuple[list[dict[str, Any]], dict[str, int], dict[str, float]]


def _shard_entries(build: Build) -> ShardSummary:
    """``index.json``'s shard list (the data shards, then the queries' shard), the row counts, and
    the seconds the shard tasks spent per phase, summed over shards."""
    names = [shard_name(i) for i in range(len(build.ranges))] + [QUERY_SHARD]
    entries, counts, seconds = [], dict.fromkeys(COUNT_KEYS, 0), {}
    for i, name in enumerate(names):
        meta = pio.read_json(shard_files(build.out_dir, name)["meta"], build.s3)
        for key in COUNT_KEYS:
            counts[key] += meta["counts"][key]
        for key, value in (meta.get("seconds") or {}).items():
            seconds[key] = round(seconds.get(key, 0.0) + value, 3)
        entry = {"file": f"{name}.faiss", "ids": f"{name}.ids.parquet", "count": meta["count"], "bytes": meta["bytes"]}
        if i < len(build.ranges):
            entry["rows"] = list(build.ranges[i])
        else:
            entry["held_out_queries"] = meta["count"]
        entries.append(entry)
    return entries, counts, seconds


def _write_queries(build: Build, held: Sample) -> None:
    """The tuning queries, in a file of their own that every later task reads (the shard tasks to
    leave their rows out, tuning and speed measurement to search with them)."""
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(held.vectors.reshape(-1)), build.dim)
    table = pa.table({"id": pa.array(held.ids.tolist(), pa.string()), "row": pa.array(held.rows, pa.int64()),
                      "embedding": vectors})
    pio.write_parquet_atomic(table, build.state(QUERIES_FILE), build.s3)


def _read_tuning_vectors(build: Build) -> tuple[np.ndarray, dict[str, Any]]:
    """The tuning queries (``[Q, dim]``) and the record of where they came from."""
    z = _read_npz(build.state(QUERY_VECTORS_FILE), build.s3)
    return np.ascontiguousarray(z["vectors"], np.float32), json.loads(str(z["source"]))


def _read_queries(build: Build) -> Sample:
    """The held-out rows (ids, input row numbers, vectors)."""
    with _open_parquet(build.state(QUERIES_FILE), build.s3) as f:
        table = pq.read_table(f)
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, build.dim)
    return Sample(np.ascontiguousarray(vectors, np.float32), np.asarray(table.column("id").to_pylist(), dtype=str),
                  table.column("row").to_numpy())


def _empty_index(build: Build) -> faiss.Index:
    """A fresh copy of the trained empty index (or a new one where there is nothing to train)."""
    if build.needs_training:
        return _deserialize(pio.read_bytes(build.state(TRAINED_FILE), build.s3))
    return new_index(build.factory, build.dim)


# ------------------------------------------------------------------------- ground truth ---

class TopK:
    """Running exact top-k of fixed queries over vectors seen batch by batch."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = queries
        self.k = k
        q = len(queries)
        self.scores = np.full((q, 0), -np.inf, np.float32)
        self.positions = np.full((q, 0), -1, np.int64)

    def add(self, vecs: np.ndarray, first_position: int) -> None:
        if len(self.queries) == 0 or len(vecs) == 0:
            return
        kk = min(self.k, len(vecs))
        s, p = faiss.knn(self.queries, vecs, kk, metric=faiss.METRIC_INNER_PRODUCT)
        p = np.where(p >= 0, p + first_position, -1)
        self.scores, self.positions = merge_topk([self.scores, s], [self.positions, p], self.k)


# -------------------------------------------------------------------------------- tasks ---

def train_task(build: Build, threads: int) -> dict[str, Any]:
    """Steps 2-3 (a Ray task): sample, hold out rows, make the tuning queries, train, index the
    held-out rows.

    The held-out rows get a shard of their own rather than a place in a data shard, so that tuning
    can search the data shards without them and no shard is rewritten after it is built.
    """
    clock = _PhaseClock()
    sample = read_sample(build.files, build.total_rows, build.sample_rows, build.columns,
                         build.id_column, build.embedding_column, build.dim, build.s3)
    if len(sample) == 0:
        raise IndexBuildError(f"{build.input_path} holds no valid embeddings in column {build.embedding_column!r}")
    _release_arrow_memory()
    nq = max(1, min(build.n_queries, len(sample) // 2))
    held = sample.part(slice(0, nq))
    rest = sample.part(slice(nq, None)) if len(sample) > nq else sample
    train = rest.part(slice(0, build.train_size or len(rest)))
    clock.lap("sample")
    with _Threads(threads):
        queries, source = make_tuning_queries(build, held.vectors, rest.vectors)
        clock.lap("queries")
        if build.needs_training and not pio.exists(build.state(TRAINED_FILE), build.s3):
            _train_and_save(build, train.vectors)
        index = _empty_index(build)
        index.add(held.vectors)
    clock.lap("train")
    _write_shard(build, QUERY_SHARD, index, pa.array(held.ids.tolist(), pa.string()),
                 {**dict.fromkeys(COUNT_KEYS, 0), "rows": nq, "kept": nq})
    _write_npz(build.state(QUERY_VECTORS_FILE), build.s3, vectors=queries, source=np.array(json.dumps(source)))
    _write_queries(build, held)  # last: its presence means steps 2-3 are done
    clock.lap("train_write")
    return {"queries": len(queries), "held_out": nq, "train": len(train) if build.needs_training else 0,
            **clock.rounded()}


def make_tuning_queries(build: Build, held: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """The vectors tuning searches with, and a record of where they came from.

    ``index.tuning_queries`` when given (at most ``max_file_queries`` of them, a seeded choice);
    else the held-out rows perturbed off the data by noise scaled to its nearest-neighbour
    spacing, which is measured against the other sampled rows ``rest``.
    """
    if build.query_file is not None:
        try:
            vectors = read_query_file(build.query_file, build.embedding_column, build.dim, build.s3)
        except (ValueError, OSError, pa.ArrowException) as e:
            raise IndexBuildError(f"index.tuning_queries: {e}") from None
        chosen = subsample(vectors, build.max_file_queries, SEED + 2)
        build.say(f"tuning on {len(chosen)} of the {len(vectors)} queries in {build.query_file}")
        return chosen, {"source": SOURCE_FILE, "path": build.query_file, "rows_in_file": len(vectors)}
    reference = rest[:NN_REFERENCE_ROWS]
    population = max(len(reference), build.total_rows - len(held))
    spacing = nn_distance_estimate(held[:NN_PROBES], reference, population)
    noise_norm = QUERY_NOISE * spacing["nn_distance"]
    build.say(f"tuning queries: {len(held)} held-out rows plus noise of norm {noise_norm:.4f} "
              f"({QUERY_NOISE} x the median nearest-neighbour distance {spacing['nn_distance']:.4f})")
    return perturb(held, noise_norm, SEED + 2), {
        "source": SOURCE_PERTURBED, "noise": QUERY_NOISE, "noise_norm": round(noise_norm, 6), **spacing}


def _train_and_save(build: Build, vectors: np.ndarray) -> None:
    build.say(f"training {build.factory} on {len(vectors)} vectors")
    index = new_index(build.factory, build.dim)
    try:
        train_index(index, vectors, build.say)
    except RuntimeError as e:
        raise IndexBuildError(f"training {build.factory} on {len(vectors)} vectors failed: "
                              f"{str(e).splitlines()[0] if str(e) else e}") from None
    pio.write_bytes_atomic(build.state(TRAINED_FILE), _serialize(index), build.s3)


def shard_task(build: Build, number: int, threads: int) -> dict[str, Any]:
    """Step 4 for one shard (a Ray task): its rows, minus the held-out rows, into a copy of the
    trained index, with the exact top-k of the tuning queries over the same rows."""
    t0 = time.perf_counter()
    lo, hi = build.ranges[number]
    rows = _read_queries(build).rows
    held = np.sort(rows[(rows >= lo) & (rows < hi)])
    clock = _PhaseClock()
    with _Threads(threads):
        index = _empty_index(build)
        reserve(index, hi - lo - len(held))
        truth = TopK(_read_tuning_vectors(build)[0], GROUND_TRUTH_K)
        clock.lap("read")
        ids, counts = _add_rows(build, number, held, index, truth, clock)
    _release_arrow_memory()
    meta = _write_shard(build, shard_name(number), index, ids, counts, truth, clock.rounded())
    seconds = time.perf_counter() - t0
    build.say(f"{shard_name(number)}: {meta['count']} vectors in {seconds:.1f}s")
    return {"file": f"{shard_name(number)}.faiss", "count": meta["count"], "bytes": meta["bytes"],
            "seconds": round(seconds, 3)}


def _add_rows(build: Build, number: int, held: np.ndarray, index: faiss.Index, truth: TopK,
              clock: _PhaseClock) -> tuple[pa.Array, dict[str, int]]:
    """Stream the shard's rows into ``index`` and ``truth``, leaving out the ``held`` row numbers;
    ``clock`` gets the seconds spent reading, on ground truth and on adding."""
    lo, hi = build.ranges[number]
    counts = dict.fromkeys(COUNT_KEYS, 0)
    ids: list[pa.Array] = []
    last_report = time.perf_counter()
    for pos, batch in iter_row_range(build.files, lo, hi, build.columns, build.s3):
        a, b = np.searchsorted(held, [pos, pos + batch.num_rows])
        if b > a:  # held-out rows: indexed in the queries' shard
            keep = np.ones(batch.num_rows, bool)
            keep[held[a:b] - pos] = False
            batch = batch.filter(pa.array(keep))
        bid, vecs, c = extract_vectors(batch, build.id_column, build.embedding_column, build.dim)
        for key, value in c.items():
            counts[key] += value
        clock.lap("read")
        if len(vecs):
            truth.add(vecs, int(index.ntotal))
            clock.lap("ground_truth")
            index.add(vecs)
            clock.lap("add")
            ids.append(bid)
        if time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            build.say(f"{shard_name(number)}: {counts['rows']}/{hi - lo} rows read, {index.ntotal} vectors added")
    return (pa.concat_arrays(ids) if ids else pa.array([], pa.string())), counts


def tune_task(build: Build, entries: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Step 5 (a Ray task): tune on the data shards ``entries``, which do not hold the held-out rows.

    recall@1 and @10 are measured as search serves them (k = 10: an HNSW search explores at least
    k candidates, so a k = 100 search would overstate them), recall@100 with k = 100.
    """
    queries, source = _read_tuning_vectors(build)
    truth = _ground_truth(build, entries)
    with _local_view(build.out_dir, [n for e in entries for n in (e["file"], e["ids"])], build.s3) as root, \
            _Threads(threads):
        index = load_shards(root, {"dim": build.dim, "factory": build.factory, "shards": entries}, mmap=True)
        tuned = tune(index, queries, truth, build.target_recall, build.say)
        found = {k: index.search_positions(queries, k)[1] for k in (10, GROUND_TRUTH_K)}
        del index
    tuned["recall"] = {str(k): round(recall_at(found[max(k, 10)], truth, k), 5) for k in (1, 10, 100)}
    tuned["queries"] = len(queries)
    tuned["query_source"] = source
    pio.write_json_atomic(build.state(TUNING_FILE), tuned, build.s3)
    return tuned


def _ground_truth(build: Build, entries: list[dict[str, Any]]) -> np.ndarray:
    """Exact top-k positions of the queries over all data shards, from each shard's own top-k."""
    scores, positions, offset = [], [], 0
    for i, entry in enumerate(entries):
        z = _read_npz(shard_files(build.out_dir, shard_name(i))["truth"], build.s3)
        scores.append(z["scores"])
        positions.append(np.where(z["positions"] >= 0, z["positions"] + offset, -1))
        offset += entry["count"]
    return merge_topk(scores, positions, GROUND_TRUTH_K)[1]


def finish_task(build: Build, entries: list[dict[str, Any]], merge: bool, params: str,
                threads: int) -> dict[str, Any]:
    """Step 6 (a Ray task): merge the shards when ``merge``; measure the speed of what search serves
    with the tuning queries."""
    clock = _PhaseClock()
    with _local_view(build.out_dir, [n for e in entries for n in (e["file"], e["ids"])], build.s3) as root, \
            _Threads(threads):
        merged = _merge(build, root, entries) if merge else None
        clock.lap("merge")
        meta = {"dim": build.dim, "factory": build.factory, "shards": entries, "merged": merged,
                "search_params": params}
        final = load_shards(root, meta, mmap=True, prefer_merged=True)
        speed = measure_speed(final, _read_tuning_vectors(build)[0])
        del final
        clock.lap("measure")
    return {"merged": merged, "speed": speed, "seconds": clock.rounded()}


def _merge(build: Build, root: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``merged.faiss`` and its ids, written next to the local shards (then uploaded when on S3)."""
    build.say("merging the shards into one index")
    merged = merge_shards([os.path.join(root, e["file"]) for e in entries], build.factory, build.dim, build.say)
    publish_index(merged, os.path.join(root, "merged.faiss"), None)
    ids = pa.concat_arrays([read_ids(os.path.join(root, e["ids"])) for e in entries])
    _write_ids(ids, os.path.join(root, "merged.ids.parquet"), None)
    if pio.is_s3(build.out_dir):
        fs = pio.fsspec_filesystem(build.out_dir, build.s3)
        for name in ("merged.ids.parquet", "merged.faiss"):
            fs.put_file(os.path.join(root, name), pio.strip_scheme(pio.join(build.out_dir, name)))
    return {"file": "merged.faiss", "ids": "merged.ids.parquet", "count": int(merged.ntotal)}


# ------------------------------------------------------------------------------ merging ---

def merge_shards(paths: list[str], factory: str, dim: int, say: Callable[[str], None]) -> faiss.Index:
    """One index holding every shard's vectors in shard order (positions line up with the ids).

    Shards are read fully (not memory-mapped): FAISS can only move data out of indexes that own
    it. IVF shards share their quantizer, so their inverted lists are simply concatenated; flat
    storage is appended; graphs cannot be concatenated, so an HNSW index is rebuilt from the
    stored vectors.
    """
    first = faiss.read_index(paths[0])
    ivf = faiss.try_extract_index_ivf(first)
    if ivf is not None:
        for path in paths[1:]:
            other = faiss.read_index(path)
            ivf.merge_from(faiss.extract_index_ivf(other), ivf.ntotal)
            del other
        first.ntotal = ivf.ntotal
        return first
    if parse_factory(factory, dim).kind == "flat":
        for path in paths[1:]:
            other = faiss.read_index(path)
            first.merge_from(other, 0)
            del other
        return first
    say("graph shards cannot be concatenated: rebuilding one graph from the stored vectors")
    merged = new_index(factory, dim)
    for path in paths:
        shard = first if path == paths[0] else faiss.read_index(path)
        for lo in range(0, shard.ntotal, 65536):
            hi = min(shard.ntotal, lo + 65536)
            merged.add(shard.reconstruct_n(lo, hi - lo))
        del shard
    return merged


# ------------------------------------------------------------------------------- tuning ---

def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of the true top-k found in the returned top-k, pooled over queries (positions; -1
    never matches)."""
    if len(truth) == 0:
        return 1.0
    hits, trials = query_hits(found, truth, k)
    return float(hits.sum() / trials.sum()) if trials.sum() else 1.0


def measure_speed(index: ShardedIndex, queries: np.ndarray, k: int = 10, latency_queries: int = 200,
                  min_seconds: float = 0.3) -> dict[str, float]:
    """Batch throughput (queries/s, all threads) and one-at-a-time latency (mean, p99, in ms)."""
    if len(queries) == 0:
        return {"qps": 0.0, "latency_ms_mean": 0.0, "latency_ms_p99": 0.0}
    index.search_positions(queries[:8], k)  # warm caches / page in mmapped data
    runs = 0
    t0 = time.perf_counter()
    while True:
        index.search_positions(queries, k)
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
    qps = runs * len(queries) / elapsed
    lat = []
    for q in queries[:latency_queries]:
        t = time.perf_counter()
        index.search_positions(q[None, :], k)
        lat.append((time.perf_counter() - t) * 1000)
    return {"qps": float(qps), "latency_ms_mean": float(np.mean(lat)), "latency_ms_p99": float(np.percentile(lat, 99))}


def _param_value(params: str) -> int:
    digits = "".join(ch if ch.isdigit() else " " for ch in params).split()
    return int(digits[0]) if digits else 0


def _trial(params: str, interval: RecallInterval, queries: int, seconds: float) -> dict[str, Any]:
    """One tried setting as ``index.json`` lists it under ``tuning.trials``."""
    return {"params": params, "recall@10": round(interval.estimate, 5), "recall@10_low": round(interval.low, 5),
            "recall@10_high": round(interval.high, 5), "qps": round(queries / seconds, 1) if seconds > 0 else None}


def tune(index: ShardedIndex, queries: np.ndarray, truth: np.ndarray, target: float,
         say: Callable[[str], None], confidence: float = RECALL_CONFIDENCE) -> dict[str, Any]:
    """The fastest search parameters whose recall@10 reaches ``target`` with ``confidence`` (or the
    best reachable).

    A setting is accepted when the low end of its recall interval (:func:`recall_interval`)
    reaches the target, not its mean: on a finite query sample a mean at the target is as likely
    to be below it as above. The grid runs from fastest to most accurate, so the first setting
    accepted is the fastest. ``truth`` is the exact top-k of ``queries`` over the searched
    vectors, which do not include the held-out rows. When recall stops improving before the
    target (compressed codes cap it, or ties in the exact ranking) -- no gain over an 8x larger
    setting -- the search stops and the fastest setting within 0.0005 of the best recall is kept.
    """
    grid = search_parameter_grid(index.factory, index.dim)
    trials: list[dict[str, Any]] = []
    intervals: dict[str, RecallInterval] = {}
    chosen = None
    best, best_at = -1.0, 0
    for params in grid:
        index.set_search_params(params)
        t = time.perf_counter()
        _, found = index.search_positions(queries, 10)
        seconds = time.perf_counter() - t
        interval = intervals[params] = recall_interval(*query_hits(found, truth, 10), confidence)
        trials.append(_trial(params, interval, len(queries), seconds))
        if params:
            say(f"tune {params}: recall@10 {interval.estimate:.4f} (low {interval.low:.4f})")
        if interval.reaches(target):
            chosen = params
            break
        value = _param_value(params)
        if interval.estimate > best + 5e-4:
            best, best_at = interval.estimate, value
        elif best_at and value >= 8 * best_at:
            break
    reached = chosen is not None
    if not reached:
        top = max(t["recall@10"] for t in trials)
        chosen = next(t["params"] for t in trials if t["recall@10"] >= top - 5e-4)
        say(f"warning: recall@10 {top:.4f} is the best this index reaches, and its {confidence:.0%} lower bound "
            f"{intervals[chosen].low:.4f} stays under the target {target}; using {chosen or 'defaults'}. A larger "
            "memory budget or index.factory gives more recall; more tuning queries a tighter bound.")
    index.set_search_params(chosen)
    return {"params": chosen, "target_reached": reached, "trials": trials,
            "recall@10": intervals[chosen].to_dict()}


# --------------------------------------------------------------------------- the driver ---

@dataclass
class _Cluster:
    """The CPUs tasks are spread over."""

    cpus: int
    node_cpus: int  # of the largest node: a task asking for more could never be scheduled

    @classmethod
    def current(cls) -> "_Cluster":
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        nodes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        return cls(cpus, max(1, min(cpus, max(nodes, default=cpus))))

    def split(self, tasks: int) -> tuple[int, int]:
        """How many of ``tasks`` tasks run at once, and the CPUs (= FAISS threads) each asks for."""
        parallel = max(1, min(tasks, self.cpus))
        return parallel, max(1, min(self.node_cpus, self.cpus // parallel))


def _start_ray(stack: ExitStack, ray_config: RayConfig | None) -> None:
    """Join or start Ray on first use, until ``stack`` closes: bad inputs and an index that is
    already complete need none."""
    if not ray.is_initialized():
        stack.enter_context(ray_session(ray_config or RayConfig()))


def _result(ref: ray.ObjectRef, what: str) -> Any:
    """A task's result; its failure as an IndexBuildError that says which step failed."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, IndexBuildError):
            raise IndexBuildError(str(cause)) from None
        raise IndexBuildError(f"{what} failed: {type(cause).__name__}: {cause}") from e


def _run_task(fn: Callable[..., Any], *args: Any, what: str, cpus: int = 1) -> Any:
    """``fn(*args)`` in one Ray task; its result is small metadata."""
    return _result(ray.remote(fn).options(num_cpus=cpus).remote(*args), what)


def sample_and_train(build: Build, cluster: _Cluster, timings: dict[str, float]) -> None:
    """Steps 2-3 in one task, unless an earlier run of the same plan did them."""
    trained = not build.needs_training or pio.exists(build.state(TRAINED_FILE), build.s3)
    if trained and pio.exists(build.state(QUERIES_FILE), build.s3):
        build.say("reusing the saved training state")
        return
    threads = cluster.split(1)[1]
    done = _run_task(train_task, build, threads, what="sampling and training", cpus=threads)
    build.say(f"sampled {done['train']} training vectors and {done['held_out']} held-out rows; "
              f"{done['queries']} tuning queries")
    timings.update({key: value for key, value in done.items() if key.endswith("_s")})


def add_shards(build: Build, cluster: _Cluster) -> ShardSummary:
    """Step 4: a task for each shard not built yet; ``index.json``'s shard list, the row counts and
    the shard tasks' seconds per phase."""
    todo = [i for i in range(len(build.ranges)) if not _shard_done(build, i)]
    if len(todo) < len(build.ranges):
        build.say(f"{len(build.ranges) - len(todo)} shard(s) already built; {len(todo)} to do")
    if todo:
        parallel, threads = cluster.split(len(todo))
        build.say(f"adding vectors: {len(todo)} shard(s), {parallel} at a time, {threads} thread(s) each (Ray tasks)")
        task = ray.remote(shard_task).options(num_cpus=threads)
        plan = ray.put(build)
        _wait_for_shards([task.remote(plan, i, threads) for i in todo], build.say)
    return _shard_entries(build)


def _wait_for_shards(refs: list[ray.ObjectRef], say: Callable[[str], None]) -> None:
    """Wait for the shard tasks in the order they finish (in tests: crash after N of them)."""
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            shard = _result(done[0], "building shards")
            say(f"shards: {len(refs) - len(pending)}/{len(refs)} done this run ({shard['file']}: "
                f"{shard['count']} vectors, {shard['bytes'] / 2**20:.1f} MiB, {shard['seconds']:.1f}s)")
            _crash_point(str(len(refs) - len(pending)))
    except IndexBuildError:
        for ref in pending:
            ray.cancel(ref)
        raise


def tune_search(build: Build, entries: list[dict[str, Any]], cluster: _Cluster) -> dict[str, Any]:
    """Step 5 in one task, unless an earlier run of the same plan saved its result."""
    path = build.state(TUNING_FILE)
    if pio.exists(path, build.s3):
        tuned = pio.read_json(path, build.s3)
        build.say(f"reusing the tuned search parameters ({tuned['params'] or 'none'})")
        return tuned
    threads = cluster.split(1)[1]
    data_shards = entries[: len(build.ranges)]  # not the queries' shard
    tuned = _run_task(tune_task, build, data_shards, threads, what="tuning", cpus=threads)
    _crash_point("tuned")
    return tuned


def merge_and_measure(build: Build, entries: list[dict[str, Any]], params: str, cluster: _Cluster) -> dict[str, Any]:
    """Step 6 in one task: merge when asked and the merged index fits the budget."""
    size = index_memory_bytes(build.factory, sum(e["count"] for e in entries), build.dim)
    fits = size <= build.memory_budget_gb * GIB
    skipped = None
    if build.merge and not fits:
        skipped = f"needs {size / GIB:.2f} GiB, budget {build.memory_budget_gb} GiB"
        build.say(f"not merging: one index would take {size / GIB:.2f} GiB > budget {build.memory_budget_gb} GiB")
    threads = cluster.split(1)[1]
    done = _run_task(finish_task, build, entries, build.merge and fits, params, threads,
                     what="merging and measuring", cpus=threads)
    return {**done, "merge_skipped": skipped}


def _model_from_run(input_path: str, s3: S3Options | None) -> dict[str, Any] | None:
    """Model name/fingerprint from ``OUTPUT/_run.json`` when indexing a job's ``results/``."""
    parent = input_path.rstrip("/").rsplit("/", 1)[0] if input_path.rstrip("/").endswith("results") else None
    if not parent:
        return None
    try:
        run = pio.read_json(pio.join(parent, "_run.json"), s3)
    except (OSError, ValueError):
        return None
    model = run.get("model") if isinstance(run, dict) else None
    return model if isinstance(model, dict) else None


def _tuning_record(tuned: dict[str, Any]) -> dict[str, Any]:
    """``index.json``'s ``tuning``: the queries (how many, from where), the chosen setting's recall@10
    with its confidence interval, and every setting tried."""
    return {"queries": tuned["queries"], "query_source": tuned["query_source"], "recall@10": tuned["recall@10"],
            "ground_truth_k": GROUND_TRUTH_K, "queries_held_out_of_tuned_index": True, "trials": tuned["trials"]}


def write_index_json(build: Build, entries: list[dict[str, Any]], counts: dict[str, int], tuned: dict[str, Any],
                     finished: dict[str, Any], model_info: dict | None, timings: dict[str, float],
                     seconds: float) -> dict[str, Any]:
    """Step 7: ``index.json``, written last: its presence means the build is complete."""
    skipped = {k: counts[k] for k in COUNT_KEYS if k not in ("rows", "kept")}
    if any(skipped.values()):
        build.say(f"skipped rows: {', '.join(f'{k}={v}' for k, v in skipped.items() if v)}")
    speed, recall, total = finished["speed"], tuned["recall"], sum(e["count"] for e in entries)
    meta: dict[str, Any] = {
        "format": FORMAT, "factory": build.factory, "metric": "inner_product", "normalized": True,
        "dim": build.dim, "count": total, "shards": entries, "merged": finished["merged"],
        "memory_budget_gb": build.memory_budget_gb, "selection": build.selection,
        "build_params": {"hnsw_ef_construction": HNSW_EF_CONSTRUCTION} if "HNSW" in build.factory else {},
        "embedding_column": build.embedding_column, "id_column": build.id_column,
        "source": {"path": build.input_path, "files": [f.path for f in build.files], "id_column": build.id_column,
                   "embedding_column": build.embedding_column, "rows": counts["rows"], "skipped": skipped},
        "results_path": build.input_path,
        "model": model_info if model_info is not None else (_model_from_run(build.input_path, build.s3) or {}),
        "search_params": tuned["params"], "target_recall": build.target_recall,
        "target_reached": tuned["target_reached"], "recall": recall,
        "latency_ms": {"mean": round(speed["latency_ms_mean"], 4), "p99": round(speed["latency_ms_p99"], 4)},
        "qps": round(speed["qps"], 1),
        "tuning": _tuning_record(tuned),
        "build_seconds": round(seconds, 3), "timings": timings, "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if finished["merge_skipped"]:
        meta["merge_skipped"] = finished["merge_skipped"]
    pio.write_json_atomic(pio.join(build.out_dir, INDEX_JSON), meta, build.s3)
    build.say(f"search params {tuned['params'] or '(none)'}: recall@10 {recall['10']:.4f} "
              f"(low {tuned['recall@10']['low']:.4f}), {speed['qps']:.0f} "
              f"queries/s, latency {speed['latency_ms_mean']:.2f} ms (p99 {speed['latency_ms_p99']:.2f})")
    build.say(f"index complete: {total} vectors, {len(entries)} shard(s) in {seconds:.1f}s -> {build.out_dir}")
    return meta


def build_index(
    input_path: str,
    output_dir: str,
    *,
    id_column: str = "id",
    embedding_column: str = "image_embedding",
    factory: str | None = None,
    shards: int | None = None,
    vectors_per_shard: int | None = None,
    memory_budget_gb: float = 4.0,
    target_recall: float = 0.95,
    merge: bool = False,
    train_sample: int | None = None,
    s3: S3Options | None = None,
    model_info: dict | None = None,
    progress: bool = True,
    tuning_queries: int | None = None,
    tuning_query_file: str | None = None,
    ray_config: RayConfig | None = None,
) -> dict:
    """Build (or resume, or confirm) the index of ``input_path`` in ``output_dir``; return index.json.

    ``input_path`` is a directory of Parquet (the pipeline's ``results/``), a file or a glob,
    local or ``s3://``; ``output_dir`` is the index directory itself (``OUTPUT/index``).
    ``factory`` overrides the automatic choice (any FAISS factory string; inner product).
    ``shards`` / ``vectors_per_shard`` set the number of data shards (default: one per million
    rows, one for HNSW); the held-out rows (``tuning_queries`` of them, default up to 1000) add
    one small shard. The index is tuned on those rows perturbed off the data, or on up to
    ``tuning_queries`` (default 1000) real queries from ``tuning_query_file``
    (``index.tuning_queries``: a ``.npy`` or a Parquet file with an ``embedding_column``, local or
    ``s3://``). The work runs in Ray tasks: on the initialized Ray if there is one, else
    on the one ``ray_config`` describes (default: ``RAY_ADDRESS``, or a local Ray started and
    stopped here), so that a standalone ``clip-etl index`` works too.
    """
    t_start = time.perf_counter()
    if not 0 < target_recall <= 1:
        raise IndexBuildError(f"target_recall must be in (0, 1], got {target_recall}")
    files, schema = scan_input(input_path, s3)
    _check_columns(schema, id_column, embedding_column)
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        start_ray = partial(_start_ray, stack, ray_config)
        with _timed(timings, "plan_s"):
            build = plan_build(
                input_path, str(output_dir).rstrip("/"), files, schema, id_column=id_column,
                embedding_column=embedding_column, factory=factory, shards=shards,
                vectors_per_shard=vectors_per_shard, memory_budget_gb=memory_budget_gb,
                target_recall=target_recall, merge=merge, train_sample=train_sample,
                tuning_queries=tuning_queries, tuning_query_file=tuning_query_file, s3=s3, progress=progress,
                start_ray=start_ray)
            complete = start_or_resume(build)
        if complete is not None:
            return complete
        start_ray()
        cluster = _Cluster.current()
        sample_and_train(build, cluster, timings)
        with _timed(timings, "add_s"):
            entries, counts, shard_seconds = add_shards(build, cluster)
        with _timed(timings, "tune_s"):
            tuned = tune_search(build, entries, cluster)
        with _timed(timings, "finish_s"):
            finished = merge_and_measure(build, entries, tuned["params"], cluster)
        timings.update(finished["seconds"])
        timings["shard_tasks"] = shard_seconds  # summed over tasks, which run side by side
    return write_index_json(build, entries, counts, tuned, finished, model_info, timings,
                            time.perf_counter() - t_start)


__all__ = ["IndexBuildError", "build_index", "extract_vectors", "plan_shards", "read_sample", "train_index", "tune"]

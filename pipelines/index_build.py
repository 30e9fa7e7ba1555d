"""Build a sharded, tuned FAISS index from embedding Parquet (the pipeline's ``results/``).

Steps, each resumable:

1. **Plan** from Parquet footers only: files, row counts, row groups, the dimension, the index
   (:mod:`pipelines.index_select`) and the shard ranges. The plan is saved as
   ``_build/plan.json``; a re-run with the same plan resumes, a different one starts over.
2. **Sample** a seeded random subset of rows, reading only the row groups that hold them: the
   training vectors, plus *tuning queries*: rows held out of the shards (never trained on).
3. **Train** the empty index once, deterministically, and save it as ``_build/trained.faiss``.
4. **Add** each shard (a contiguous range of input rows, minus the tuning queries) in its own Ray
   task: stream its rows, add them to a copy of the trained index, and compute the exact top-100
   of the tuning queries over the same rows (so ground truth costs no extra pass over the
   data). A shard's ``.faiss`` file is written last and atomically: present means done.
5. **Tune** ``nprobe``/``efSearch`` on those shards: the smallest value (= the fastest) whose
   recall@10 against exact search reaches ``target_recall``; the queries are not in the shards,
   so they measure like unseen queries. Measure recall@1/10/100.
6. **Index the held-out queries**, appended to the last shard, so every valid row is searchable.
7. **Merge** the shards into one index when asked and it fits the memory budget.
8. Measure queries/s and latency, write ``index.json`` last: its presence means the index is
   complete.

Memory: a task holds one shard's index and one reader batch; the driver holds the training
sample; vectors never all sit in RAM unless the chosen index (Flat/HNSW) is itself made of them,
which the memory budget allowed. See ``docs/index.md`` for the formula.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import io
from pipelines.index import INDEX_JSON, ShardedIndex, load_shards, merge_topk, read_ids
from pipelines.index_select import (
    GIB,
    choose_index,
    index_memory_bytes,
    parse_factory,
    search_parameter_grid,
    train_size_for,
)
from pipelines.io import S3Options

FORMAT = "clip-etl-index/1"
BUILD_DIR = "_build"
PLAN_FILE = "plan.json"
TRAINED_FILE = "trained.faiss"
QUERIES_FILE = "queries.npz"
TUNING_FILE = "tuning.json"
SEED = 1234
DEFAULT_VECTORS_PER_SHARD = 1_000_000
READ_BATCH_ROWS = 2048  # small batches: big transient buffers stay resident under glibc malloc
# Stream column chunks through a small buffer instead of loading a whole row group's column:
# results files may have row groups of a million rows.
PARQUET_BUFFER_BYTES = 4 << 20
GROUND_TRUTH_K = 100
# Graph construction effort. FAISS's default (40) leaves poorly connected regions in clustered
# data, which then need a huge efSearch; 80 costs ~1.5x the build time and cut the efSearch
# needed for recall@10 0.998 by ~30x in our benchmark.
HNSW_EF_CONSTRUCTION = 80
MAX_TUNING_QUERIES = 1000
# Environment hook for tests of resumability: exit abruptly (like a kill) after N shards
# ("2"), or in the middle of adding the held-out queries to the last shard ("append").
CRASH_ENV = "CLIP_ETL_INDEX_CRASH_AFTER_SHARDS"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        print(f"[index] {CRASH_ENV}={name}: exiting abruptly", file=sys.stderr, flush=True)
        os._exit(75)


class IndexBuildError(RuntimeError):
    """A build that cannot proceed (no vectors, bad columns, budget too small...)."""


# ----------------------------------------------------------------------------- logging ---

def _printer(progress: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if progress:
            print(f"[index] {msg}", file=sys.stderr, flush=True)

    return say


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
    fs = io.filesystem_for(path, s3)
    return fs.open_input_file(io.strip_scheme(path))


def scan_input(input_path: str, s3: S3Options | None) -> tuple[list[InputFile], pa.Schema]:
    """List the input Parquet files and read their footers (no data pages)."""
    try:
        paths = io.list_files(input_path, ".parquet", s3)
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
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = vecs / np.maximum(norms, 1e-12)  # the one copy: Arrow's buffers are read-only
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
    """Dimension of the first non-null embedding (for variable-length list columns)."""
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


# ------------------------------------------------------------------------------ sampling ---

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


# ------------------------------------------------------------------------------ training ---

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


# ------------------------------------------------------------------------- atomic files ---

def publish_index(index: faiss.Index, dest: str, s3: S3Options | None) -> None:
    """Write a FAISS index to ``dest`` (local or S3) so that it appears whole or not at all.

    Streams through a temporary file rather than serializing into memory, so a shard costs its
    own size once, not twice.
    """
    if io.is_s3(dest):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".faiss")
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            io.fsspec_filesystem(dest, s3).put_file(tmp, io.strip_scheme(dest))
        finally:
            os.unlink(tmp)
        return
    dest = io.strip_scheme(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(dest))
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_npz(path: str, s3: S3Options | None, **arrays: np.ndarray) -> None:
    import io as _io

    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    io.write_bytes_atomic(path, buf.getvalue(), s3)


def _read_npz(path: str, s3: S3Options | None) -> dict[str, np.ndarray]:
    import io as _io

    with np.load(_io.BytesIO(io.read_bytes(path, s3))) as z:
        return {k: z[k] for k in z.files}


def _write_ids(ids: pa.Array, path: str, s3: S3Options | None) -> None:
    io.write_parquet_atomic(pa.table({"id": ids}), path, s3)


# ------------------------------------------------------------------------ ground truth ---

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


# -------------------------------------------------------------------------- shard task ---

@dataclass
class ShardJob:
    """Everything a task needs to build one shard (picklable; shipped to Ray workers)."""

    number: int
    start: int
    end: int
    files: list[InputFile]
    columns: list[str]
    id_column: str
    embedding_column: str
    dim: int
    factory: str
    out_dir: str
    trained_path: str | None
    queries_path: str
    threads: int
    s3: S3Options | None
    progress: bool
    held_out_rows: np.ndarray  # sorted row numbers in [start, end): tuning queries, added after tuning


def shard_files(out_dir: str, number: int) -> dict[str, str]:
    name = shard_name(number)
    return {
        "faiss": io.join(out_dir, f"{name}.faiss"),
        "ids": io.join(out_dir, f"{name}.ids.parquet"),
        "truth": io.join(out_dir, BUILD_DIR, f"{name}.truth.npz"),
    }


def build_shard(job: ShardJob) -> dict[str, Any]:
    """Add one range of input rows to a copy of the trained index; write the shard's files.

    Writes the ids and the ground truth first and the ``.faiss`` file last, each atomically, so
    the ``.faiss`` file's presence marks the whole shard done.
    """
    say = _printer(job.progress)
    t0 = time.perf_counter()
    with _Threads(job.threads):
        if job.trained_path:
            index = _deserialize(io.read_bytes(job.trained_path, job.s3))
        else:
            index = new_index(job.factory, job.dim)
        reserve(index, job.end - job.start - len(job.held_out_rows))
        queries = _read_npz(job.queries_path, job.s3)["vectors"]
        truth = TopK(queries, GROUND_TRUTH_K)
        counts = dict.fromkeys(COUNT_KEYS, 0)
        ids: list[pa.Array] = []
        last_report = time.perf_counter()
        for pos, batch in iter_row_range(job.files, job.start, job.end, job.columns, job.s3):
            if len(job.held_out_rows):
                a, b = np.searchsorted(job.held_out_rows, [pos, pos + batch.num_rows])
                if b > a:  # the tuning queries are added to the last shard after tuning
                    keep = np.ones(batch.num_rows, bool)
                    keep[job.held_out_rows[a:b] - pos] = False
                    batch = batch.filter(pa.array(keep))
            bid, vecs, c = extract_vectors(batch, job.id_column, job.embedding_column, job.dim)
            for key, value in c.items():
                counts[key] += value
            if len(vecs):
                truth.add(vecs, int(index.ntotal))
                index.add(vecs)
                ids.append(bid)
            if time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                say(f"{shard_name(job.number)}: {counts['rows']}/{job.end - job.start} rows read, "
                    f"{index.ntotal} vectors added")
    _release_arrow_memory()
    files = shard_files(job.out_dir, job.number)
    all_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    _write_ids(all_ids, files["ids"], job.s3)
    _write_npz(files["truth"], job.s3, scores=truth.scores, positions=truth.positions,
               counts=np.array([counts[k] for k in COUNT_KEYS], np.int64))
    publish_index(index, files["faiss"], job.s3)
    seconds = time.perf_counter() - t0
    say(f"{shard_name(job.number)}: {index.ntotal} vectors in {seconds:.1f}s")
    return {"number": job.number, "count": int(index.ntotal), "seconds": seconds, **counts}


def append_held_out(local_root: str, entry: dict[str, Any], held: dict[str, np.ndarray], out_dir: str,
                    number: int, s3: S3Options | None) -> None:
    """Add the tuning queries, held out of every shard while tuning, to the last shard.

    Idempotent, so an interrupted build can redo it: each of the shard's two files is extended
    only while it still holds exactly the rows the shard was built with (``entry["count"]``).
    """
    base, extra = int(entry["count"]), len(held["vectors"])
    files = shard_files(out_dir, number)
    local_faiss = os.path.join(local_root, entry["file"])
    index = faiss.read_index(local_faiss)
    if index.ntotal == base:
        index.add(np.ascontiguousarray(held["vectors"], dtype=np.float32))
        publish_index(index, files["faiss"], s3)
        if io.is_s3(out_dir):
            publish_index(index, local_faiss, None)
    del index
    _crash_point("append")
    local_ids = os.path.join(local_root, entry["ids"])
    ids = read_ids(local_ids)
    if len(ids) == base:
        ids = pa.concat_arrays([ids, pa.array([str(i) for i in held["ids"]], pa.large_string())])
        _write_ids(ids, files["ids"], s3)
        if io.is_s3(out_dir):
            _write_ids(ids, local_ids, None)
    entry["count"] = base + extra
    entry["held_out_queries"] = extra


def _bytes_io(data: bytes):
    import io as _io

    return _io.BytesIO(data)


def _shard_done(out_dir: str, number: int, s3: S3Options | None) -> bool:
    return all(io.exists(p, s3) for p in shard_files(out_dir, number).values())


def _run_shards(jobs: list[ShardJob], use_ray: bool, say: Callable[[str], None]) -> None:
    """Run shard jobs in parallel Ray tasks (or in this process), stopping early for tests."""
    value = os.environ.get(CRASH_ENV, "")
    crash_after = int(value) if value.isdigit() else 0
    finished = 0

    def tick(result: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        say(f"shards: {finished}/{len(jobs)} done this run")
        if crash_after and finished >= crash_after:
            print(f"[index] {CRASH_ENV}={crash_after}: exiting abruptly", file=sys.stderr, flush=True)
            os._exit(75)

    if not use_ray:
        for job in jobs:
            tick(build_shard(job))
        return
    import ray

    remote = ray.remote(build_shard)
    refs = [remote.options(num_cpus=job.threads).remote(job) for job in jobs]
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        tick(ray.get(done[0]))


def _ray_cpus(use_ray: bool | None, n_jobs: int) -> tuple[bool, int, bool]:
    """Whether to use Ray, how many CPUs it offers, and whether we started it (to stop it after).

    An initialized Ray (a job's session, a test fixture, a notebook) is used as it is. Otherwise
    several shards start a local Ray (or join ``RAY_ADDRESS``); a single shard needs no Ray.
    """
    if use_ray is False or n_jobs == 0:
        return False, os.cpu_count() or 1, False
    try:
        import ray
    except ImportError:
        if use_ray:
            raise IndexBuildError("use_ray=True but Ray is not installed") from None
        return False, os.cpu_count() or 1, False
    started = False
    if not ray.is_initialized():
        if use_ray is None and n_jobs == 1:
            return False, os.cpu_count() or 1, False
        import logging

        ray.init(include_dashboard=False, logging_level=logging.WARNING)
        started = True
    return True, max(1, int(ray.cluster_resources().get("CPU", 1))), started


def _largest_node_cpus(default: int) -> int:
    """CPUs of the biggest Ray node: a task asking for more could never be scheduled."""
    try:
        import ray

        return max(1, int(max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive"))))
    except (ImportError, ValueError, KeyError, RuntimeError):
        return default


# ---------------------------------------------------------------------------- merging ---

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


# ----------------------------------------------------------------------------- tuning ---

def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k found in the returned top-k (positions; -1 never matches)."""
    if len(truth) == 0:
        return 1.0
    k = min(k, truth.shape[1], found.shape[1])
    hits = 0
    total = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=False))
        total += len(t)
    return hits / total if total else 1.0


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


def tune(index: ShardedIndex, queries: np.ndarray, truth: np.ndarray, target: float,
         say: Callable[[str], None]) -> dict[str, Any]:
    """The fastest search parameters whose recall@10 reaches ``target`` (or the best reachable).

    The grid runs from fastest to most accurate, so the first candidate that reaches the target
    is the fastest one that does. ``truth`` is the exact top-k of ``queries`` over the searched
    vectors, which do not include the queries. When recall stops improving before the
    target (compressed codes cap it, or ties in the exact ranking) -- no gain over an 8x larger
    setting -- the search stops and the fastest setting within 0.0005 of the best recall is kept.
    """
    grid = search_parameter_grid(index.factory, index.dim)
    trials: list[dict[str, Any]] = []
    chosen = None
    best, best_at = -1.0, 0
    for params in grid:
        index.set_search_params(params)
        t = time.perf_counter()
        _, found = index.search_positions(queries, 10)
        seconds = time.perf_counter() - t
        r10 = recall_at(found, truth, 10)
        trials.append({"params": params, "recall@10": round(r10, 5),
                       "qps": round(len(queries) / seconds, 1) if seconds > 0 else None})
        if params:
            say(f"tune {params}: recall@10 {r10:.4f}")
        if r10 >= target:
            chosen = params
            break
        value = _param_value(params)
        if r10 > best + 5e-4:
            best, best_at = r10, value
        elif best_at and value >= 8 * best_at:
            break
    reached = chosen is not None
    if not reached:
        top = max(t["recall@10"] for t in trials)
        chosen = next(t["params"] for t in trials if t["recall@10"] >= top - 5e-4)
        say(f"warning: recall@10 {top:.4f} is the best this index reaches (target {target}); "
            f"using {chosen or 'defaults'}. A larger memory budget or index.factory gives more.")
    index.set_search_params(chosen)
    return {"params": chosen, "target_reached": reached, "trials": trials}


# ------------------------------------------------------------------------------ the build ---

def _model_from_run(input_path: str, s3: S3Options | None) -> dict[str, Any] | None:
    """Model name/fingerprint from ``OUTPUT/_run.json`` when indexing a job's ``results/``."""
    parent = input_path.rstrip("/").rsplit("/", 1)[0] if input_path.rstrip("/").endswith("results") else None
    if not parent:
        return None
    try:
        run = io.read_json(io.join(parent, "_run.json"), s3)
    except (OSError, ValueError):
        return None
    model = run.get("model") if isinstance(run, dict) else None
    return model if isinstance(model, dict) else None


def _plan_matches(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in ("format", "files", "columns", "dim", "factory", "shards", "train_size", "queries", "seed",
                "target_recall", "merge"):
        if old.get(key) != new.get(key):
            return key
    return None


def _remove_tree(out_dir: str, s3: S3Options | None) -> None:
    """Delete a previous (different) build's files: shards, merged index, build state, index.json."""
    fs = io.fsspec_filesystem(out_dir, s3)
    root = io.strip_scheme(out_dir)
    if not fs.exists(root):
        return
    for p in fs.find(root):
        name = p.rsplit("/", 1)[-1]
        if name == INDEX_JSON or name.startswith(("shard-", "merged", ".tmp-")) or f"/{BUILD_DIR}/" in p:
            fs.rm(p)


def _clean_temp(out_dir: str) -> None:
    """Remove temporary files a killed build left behind (local outputs; S3 PUTs are atomic)."""
    if io.is_s3(out_dir):
        return
    for root in (out_dir, os.path.join(out_dir, BUILD_DIR)):
        if os.path.isdir(root):
            for name in os.listdir(root):
                if name.startswith(".tmp-"):
                    try:
                        os.unlink(os.path.join(root, name))
                    except OSError:
                        pass


def _local_view(out_dir: str, names: list[str], s3: S3Options | None) -> tuple[str, Any]:
    """A local directory holding ``names`` from ``out_dir`` (itself when local; a temp copy for S3)."""
    if not io.is_s3(out_dir):
        return io.strip_scheme(out_dir), None
    tmp = tempfile.TemporaryDirectory(prefix="clip-etl-index-")
    fs = io.fsspec_filesystem(out_dir, s3)
    for name in names:
        fs.get_file(io.strip_scheme(io.join(out_dir, name)), os.path.join(tmp.name, name))
    return tmp.name, tmp


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
    use_ray: bool | None = None,
    tuning_queries: int | None = None,
) -> dict:
    """Build (or resume, or confirm) the index of ``input_path`` in ``output_dir``; return index.json.

    ``input_path`` is a directory of Parquet (the pipeline's ``results/``), a file or a glob,
    local or ``s3://``; ``output_dir`` is the index directory itself (``OUTPUT/index``).
    ``factory`` overrides the automatic choice (any FAISS factory string; inner product).
    ``shards`` / ``vectors_per_shard`` set the number of shards (default: one per million rows,
    one for HNSW). ``use_ray``: ``None`` uses Ray when it is initialized or there are several
    shards to build (initializing a local Ray then), ``False`` builds in this process.
    ``tuning_queries`` sets how many held-out vectors measure recall (default up to 1000).
    """
    say = _printer(progress)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if not 0 < target_recall <= 1:
        raise IndexBuildError(f"target_recall must be in (0, 1], got {target_recall}")
    output_dir = str(output_dir).rstrip("/")
    build_dir = io.join(output_dir, BUILD_DIR)

    # 1. plan ------------------------------------------------------------------------------
    t = time.perf_counter()
    files, schema = scan_input(input_path, s3)
    _check_columns(schema, id_column, embedding_column)
    total_rows = files[-1].start + files[-1].rows
    if total_rows == 0:
        raise IndexBuildError(f"{input_path} holds no rows: nothing to index")
    dim = _dim_from_schema(schema, embedding_column) or _peek_dim(files, embedding_column, s3)
    budget = memory_budget_gb * GIB
    if factory:
        p = parse_factory(factory, dim)
        selection = {"factory": factory, "kind": p.kind, "estimated_bytes": index_memory_bytes(factory, total_rows, dim),
                     "train_size": train_size_for(factory, total_rows, dim, budget), "reason": "index.factory"}
        if p.kind == "other" or (p.kind == "flat" and factory.strip() != "Flat"):
            selection["train_size"] = selection["train_size"] or min(total_rows, 65536)
    else:
        try:
            selection = choose_index(total_rows, dim, memory_budget_gb).to_dict()
        except ValueError as e:
            raise IndexBuildError(str(e)) from None
    factory = selection["factory"]
    kind = selection["kind"]
    train_size = int(train_sample if train_sample is not None else selection["train_size"])
    n_queries = int(tuning_queries if tuning_queries is not None else min(MAX_TUNING_QUERIES, max(1, total_rows // 10)))
    ranges = plan_shards(total_rows, _shard_count(total_rows, kind, shards, vectors_per_shard))
    columns = _columns(schema.names, id_column, embedding_column)
    plan = {
        "format": FORMAT,
        "input": input_path,
        "files": [f.to_dict() for f in files],
        "columns": {"id": id_column, "embedding": embedding_column},
        "dim": dim,
        "factory": factory,
        "shards": ranges,
        "train_size": train_size,
        "queries": n_queries,
        "seed": SEED,
        "target_recall": target_recall,
        "merge": bool(merge),
    }
    plan = json.loads(json.dumps(plan))  # the form it has when read back from plan.json
    plan_path = io.join(build_dir, PLAN_FILE)
    index_json = io.join(output_dir, INDEX_JSON)
    old_plan = io.read_json(plan_path, s3) if io.exists(plan_path, s3) else None
    if old_plan is not None:
        differs = _plan_matches(old_plan, plan)
        if differs:
            say(f"{output_dir} holds a build with a different {differs}: starting over")
            _remove_tree(output_dir, s3)
            old_plan = None
        elif io.exists(index_json, s3):
            say(f"{output_dir} is already built and up to date")
            return io.read_json(index_json, s3)
    elif io.exists(index_json, s3):
        say(f"{output_dir} holds an index without build state: rebuilding it")
        _remove_tree(output_dir, s3)
    if old_plan is None:
        io.write_json_atomic(plan_path, plan, s3)
    _clean_temp(output_dir)
    say(f"{total_rows} rows in {len(files)} file(s), dim {dim}: {factory} ({selection['reason']}), "
        f"{len(ranges)} shard(s), ~{selection['estimated_bytes'] / GIB:.2f} GiB")
    timings["plan_s"] = time.perf_counter() - t

    # 2-3. sample and train -------------------------------------------------------------------
    t = time.perf_counter()
    trained_path = io.join(build_dir, TRAINED_FILE)
    queries_path = io.join(build_dir, QUERIES_FILE)
    probe = new_index(factory, dim)
    needs_training = not probe.is_trained
    if not io.exists(queries_path, s3) or (needs_training and not io.exists(trained_path, s3)):
        sample = read_sample(files, total_rows, train_size + n_queries, columns, id_column, embedding_column, dim, s3)
        if len(sample) == 0:
            raise IndexBuildError(f"{input_path} holds no valid embeddings in column {embedding_column!r}")
        nq = max(1, min(n_queries, len(sample) // 2))
        held = sample.part(slice(0, nq))
        train = sample.part(slice(nq, None)) if len(sample) > nq else sample
        timings["sample_s"] = time.perf_counter() - t
        if needs_training and not io.exists(trained_path, s3):
            t = time.perf_counter()
            say(f"training {factory} on {len(train)} vectors")
            try:
                train_index(probe, train.vectors, say)
            except RuntimeError as e:
                raise IndexBuildError(f"training {factory} on {len(train)} vectors failed: "
                                      f"{str(e).splitlines()[0] if str(e) else e}") from None
            io.write_bytes_atomic(trained_path, _serialize(probe), s3)
            timings["train_s"] = time.perf_counter() - t
        # written after training: its presence marks steps 2-3 done
        _write_npz(queries_path, s3, vectors=held.vectors, ids=held.ids, rows=held.rows)
        del sample, train, held
        _release_arrow_memory()
    else:
        say("reusing the saved training state")
    del probe
    held = _read_npz(queries_path, s3)
    queries = held["vectors"]
    held_rows = np.sort(held["rows"].astype(np.int64))

    # 4. shards -------------------------------------------------------------------------------
    t = time.perf_counter()
    todo = [i for i in range(len(ranges)) if not _shard_done(output_dir, i, s3)]
    if len(todo) < len(ranges):
        say(f"{len(ranges) - len(todo)} shard(s) already built; {len(todo)} to do")
    ray_on, cpus, ray_started = _ray_cpus(use_ray, len(todo))
    parallel = max(1, min(len(todo), cpus)) if ray_on else 1
    threads = max(1, cpus // parallel)
    if ray_on:
        threads = min(threads, _largest_node_cpus(threads))
    jobs = []
    for i in todo:
        lo, hi = ranges[i]
        mine = held_rows[(held_rows >= lo) & (held_rows < hi)]
        jobs.append(ShardJob(i, lo, hi, files, columns, id_column, embedding_column, dim, factory, output_dir,
                             trained_path if needs_training else None, queries_path, threads, s3, progress, mine))
    if jobs:
        say(f"adding vectors: {len(jobs)} shard(s), {parallel} at a time, {threads} thread(s) each"
            f"{' (Ray tasks)' if ray_on else ''}")
    try:
        _run_shards(jobs, ray_on, say)
    except Exception as e:
        cause = getattr(e, "cause", None) or e
        raise IndexBuildError(f"building shards failed: {type(cause).__name__}: {cause}") from e
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    timings["add_s"] = time.perf_counter() - t

    # gather shard results, global ground truth --------------------------------------------------
    counts = dict.fromkeys(COUNT_KEYS, 0)
    shard_entries = []
    truth_s, truth_p = [], []
    offset = 0
    for i, (lo, hi) in enumerate(ranges):
        f = shard_files(output_dir, i)
        z = _read_npz(f["truth"], s3)
        c = dict(zip(COUNT_KEYS, (int(v) for v in z["counts"])))
        for key in COUNT_KEYS:
            counts[key] += c[key]
        truth_s.append(z["scores"])
        truth_p.append(np.where(z["positions"] >= 0, z["positions"] + offset, -1))
        shard_entries.append({"file": f"{shard_name(i)}.faiss", "ids": f"{shard_name(i)}.ids.parquet",
                              "count": c["kept"], "rows": [lo, hi]})
        offset += c["kept"]
    if counts["kept"] == 0:
        raise IndexBuildError(f"{input_path} holds no valid embeddings in column {embedding_column!r} "
                              f"({counts['rows']} rows: {counts})")
    _, truth = merge_topk(truth_s, truth_p, GROUND_TRUTH_K)
    skipped = {k: counts[k] for k in COUNT_KEYS if k not in ("rows", "kept")}
    if any(skipped.values()):
        say(f"skipped rows: {', '.join(f'{k}={v}' for k, v in skipped.items() if v)}")

    local_root, keep = _local_view(output_dir, [n for e in shard_entries for n in (e["file"], e["ids"])], s3)
    try:
        # 5. tune on the shards, which do not hold the queries yet --------------------------------
        tuning_path = io.join(build_dir, TUNING_FILE)
        if io.exists(tuning_path, s3):  # tuned before an interruption: the queries may be indexed now
            tuned = io.read_json(tuning_path, s3)
            say(f"reusing the tuned search parameters ({tuned['params'] or 'none'})")
        else:
            t = time.perf_counter()
            main = load_shards(local_root, {"dim": dim, "factory": factory, "shards": shard_entries}, mmap=True)
            tuned = tune(main, queries, truth, target_recall, say)
            _, found = main.search_positions(queries, GROUND_TRUTH_K)
            tuned["recall"] = {str(k): round(recall_at(found, truth, k), 5) for k in (1, 10, 100)}
            del main, found
            io.write_json_atomic(tuning_path, tuned, s3)
            timings["tune_s"] = time.perf_counter() - t
        result, recall = tuned, tuned["recall"]

        # 6. index the held-out queries too: appended to the last shard -------------------------
        last = shard_entries[-1]
        append_held_out(local_root, last, held, output_dir, len(ranges) - 1, s3)
        total = offset + len(queries)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "factory": factory,
            "metric": "inner_product",
            "normalized": True,
            "dim": dim,
            "count": total,
            "shards": shard_entries,
            "merged": None,
            "memory_budget_gb": memory_budget_gb,
            "selection": selection,
            "build_params": {"hnsw_ef_construction": HNSW_EF_CONSTRUCTION} if "HNSW" in factory else {},
            "embedding_column": embedding_column,
            "id_column": id_column,
            "source": {"path": input_path, "files": [f.path for f in files], "id_column": id_column,
                       "embedding_column": embedding_column, "rows": counts["rows"] + len(queries),
                       "skipped": skipped},
            "results_path": input_path,
            "model": model_info if model_info is not None else (_model_from_run(input_path, s3) or {}),
        }
        if merge and len(shard_entries) > 1:
            t = time.perf_counter()
            size = index_memory_bytes(factory, total, dim)
            if size > budget:
                say(f"not merging: one index would take {size / GIB:.2f} GiB > budget {memory_budget_gb} GiB")
                meta["merge_skipped"] = f"needs {size / GIB:.2f} GiB, budget {memory_budget_gb} GiB"
            else:
                say("merging the shards into one index")
                merged = merge_shards([os.path.join(local_root, e["file"]) for e in shard_entries], factory, dim, say)
                # Written next to the local shards, then uploaded when the output is on S3.
                publish_index(merged, os.path.join(local_root, "merged.faiss"), None)
                ids = pa.concat_arrays([read_ids(os.path.join(local_root, e["ids"])) for e in shard_entries])
                _write_ids(ids, os.path.join(local_root, "merged.ids.parquet"), None)
                meta["merged"] = {"file": "merged.faiss", "ids": "merged.ids.parquet", "count": int(merged.ntotal)}
                del merged, ids
                if keep is not None:
                    fs = io.fsspec_filesystem(output_dir, s3)
                    for n in ("merged.ids.parquet", "merged.faiss"):
                        fs.put_file(os.path.join(local_root, n), io.strip_scheme(io.join(output_dir, n)))
            timings["merge_s"] = time.perf_counter() - t

        # speed of what open_index will serve ----------------------------------------------------
        final = load_shards(local_root, {**meta, "search_params": result["params"]}, mmap=True, prefer_merged=True)
        speed = measure_speed(final, queries)
        del final
    finally:
        if keep is not None:
            keep.cleanup()

    say(f"search params {result['params'] or '(none)'}: recall@10 {recall['10']:.4f}, "
        f"{speed['qps']:.0f} queries/s, latency {speed['latency_ms_mean']:.2f} ms (p99 {speed['latency_ms_p99']:.2f})")
    timings = {k: round(v, 3) for k, v in timings.items()}
    build_seconds = round(time.perf_counter() - t_start, 3)
    meta.update({
        "search_params": result["params"],
        "target_recall": target_recall,
        "target_reached": result["target_reached"],
        "recall": recall,
        "latency_ms": {"mean": round(speed["latency_ms_mean"], 4), "p99": round(speed["latency_ms_p99"], 4)},
        "qps": round(speed["qps"], 1),
        "tuning": {"queries": int(len(queries)), "ground_truth_k": GROUND_TRUTH_K,
                   "queries_held_out_of_tuned_index": True, "trials": result["trials"]},
        "build_seconds": build_seconds,
        "timings": timings,
        "created_at": datetime.now(timezone.utc).isoformat(),
    })
    # 7. index.json last: its presence means the build is complete ----------------------------
    io.write_json_atomic(index_json, meta, s3)
    say(f"index complete: {total} vectors, {len(shard_entries)} shard(s) in {build_seconds:.1f}s -> {output_dir}")
    return meta


__all__ = ["IndexBuildError", "build_index", "extract_vectors", "plan_shards", "read_sample", "train_index", "tune"]

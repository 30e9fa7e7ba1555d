"""Semantic dedup of a job's results (SemDeDup): k-means, then all pairs inside each cluster.

Near-duplicates (resized, recompressed, cropped or recoloured copies) have embeddings that are
nearly the same, so they fall into the same k-means cluster; comparing all pairs inside each
cluster instead of across the whole collection turns an ``N^2`` search into about
``N^2 / clusters``. The steps (``dedup_results`` calls them one after another):

1. **Plan** (driver, footers only): the results files, their row counts and the dimension.
2. **Train** (one :func:`train_task`): a seeded sample of valid embeddings
   (:func:`pipelines.index.build.read_sample`), spherical FAISS k-means on it. The driver
   receives the centroids (clusters x dim floats) and nothing else.
3. **Assign** (one :func:`assign_task` per results file): each row's nearest centroid and its
   similarity to it; the rows, with their vectors, are written sorted by cluster to
   ``_dedup_work-RUN/assign/part-XXXXX.parquet`` in small row groups, so that a later task reads
   one cluster's rows from each file by the row groups' statistics alone. The driver receives
   the rows per cluster (one integer per cluster and file).
4. **Groups** (one :func:`unit_task` per *unit*): a unit is a run of consecutive small clusters
   of at most ``dedup.block_rows`` rows together, or one larger cluster alone. Inside each
   cluster, all pairs are compared block by block (:mod:`pipelines.curation.dedup_groups`),
   pairs at or above ``dedup.threshold`` are linked, linked rows form a group, and each group
   keeps one row (see :func:`~pipelines.curation.dedup_groups.choose_representatives`). A unit
   writes its decisions as one output part.
5. **Publish** (driver): the parts replace ``OUTPUT/dedup/`` as a whole, then ``dedup.json`` (the
   summary) is written last: its presence means the output is complete.

Why not Ray Data's ``groupby(...).map_groups``: it hands each group to one call as a single
batch, so the largest cluster, which the data decides, would set a task's memory; here a large
cluster is streamed in blocks from a local file instead. The exchange is still Ray's (tasks and
the output's storage); the driver holds the centroids and per-cluster counts only.

Memory per unit task: at most two blocks of vectors (``2 x block_rows x dim x 4`` bytes), one
similarity tile (``block_rows^2 x 4`` bytes) and its links, and ~100 bytes of bookkeeping per row
of the unit (id, numbers, union-find), never a cluster's vectors whole. An assign task holds one
results part, the k-means task its sample.

Rows without a usable embedding (``status`` not ``ok``, a null or malformed vector) get a row
too, with ``keep`` null (no decision: dedup cannot judge them) and ``reason`` saying why.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines import storage as pio
from pipelines.config import DedupConfig, RayConfig
from pipelines.curation.dedup_groups import choose_representatives, link_duplicates
from pipelines.index.build import (
    IndexBuildError,
    InputFile,
    _check_columns,
    _dim_from_schema,
    _extract,
    _peek_dim,
    _result,
    _start_ray,
    _Threads,
    iter_row_range,
    read_sample,
    scan_input,
)
from pipelines.index.select import MIN_POINTS_PER_CENTROID
from pipelines.storage import S3Options

FORMAT = "clip-etl-dedup/1"
DEDUP_DIR = "dedup"
SUMMARY_FILE = "dedup.json"
WORK_PREFIX = "_dedup_work-"
SEED = 1234
KMEANS_ITERATIONS = 20
# Rows per row group of the assign files: small, so that reading one cluster's rows touches
# little more than those rows.
ASSIGN_ROW_GROUP = 1024
UNJUDGED = -1  # the cluster number the assign files give rows without a usable embedding
REASON_UNIQUE, REASON_KEPT, REASON_DUPLICATE = "unique", "representative", "duplicate"
REASON_ERROR, REASON_NO_EMBEDDING = "status_not_ok", "no_embedding"
REASON_NOT_CLUSTERED = "not_clustered"  # the k-means sample held no usable vector at all

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("cluster", pa.int32()),  # k-means cluster; null when the row has no usable embedding
    ("group", pa.int64()),  # results row number (in part order) of the row the group keeps
    ("duplicate_of", pa.string()),  # id of the kept row; null for kept rows
    ("max_similarity", pa.float32()),  # highest cosine to another row of the same cluster
    ("keep", pa.bool_()),  # null: not judged (see reason)
    ("reason", pa.string()),  # unique | representative | duplicate | status_not_ok | no_embedding
])


class DedupError(RuntimeError):
    """A dedup that cannot run (no results, wrong columns...); one line for the user."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def auto_clusters(valid_rows: int) -> int:
    """``sqrt(N)`` clusters (about ``sqrt(N)`` rows each, so the pairwise work is ``N^1.5``), at most
    one per :data:`MIN_POINTS_PER_CENTROID` rows so that k-means has points to place each centroid."""
    return max(1, min(round(math.sqrt(valid_rows)), valid_rows // MIN_POINTS_PER_CENTROID))


@dataclass
class DedupPlan:
    """What every task needs; small (file list and settings), shipped once with ``ray.put``."""

    files: list[InputFile]
    dim: int
    settings: DedupConfig
    work_dir: str
    s3: S3Options | None
    id_column: str = "id"
    columns: list[str] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def assign_path(self, i: int) -> str:
        return pio.join(self.work_dir, "assign", f"part-{i:05d}.parquet")

    def part_path(self, i: int) -> str:
        return pio.join(self.work_dir, "out", f"part-{i:05d}.parquet")


# ------------------------------------------------------------------------ step 2: train ---

def train_task(plan: DedupPlan, threads: int) -> np.ndarray:
    """Spherical k-means on a seeded sample; returns the centroids ``[k, dim]`` (``k`` may be 0)."""
    s = plan.settings
    sample = read_sample(plan.files, plan.total_rows, min(s.sample_rows, plan.total_rows), plan.columns,
                         plan.id_column, s.embedding_column, plan.dim, plan.s3, seed=SEED)
    if len(sample) == 0:
        return np.zeros((0, plan.dim), np.float32)
    k = s.clusters or auto_clusters(plan.total_rows)
    k = max(1, min(k, len(sample)))
    with _Threads(threads):
        kmeans = faiss.Kmeans(plan.dim, k, niter=KMEANS_ITERATIONS, seed=SEED, spherical=True, verbose=False,
                              max_points_per_centroid=max(256, -(-len(sample) // k)))
        kmeans.train(sample.vectors)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


# ----------------------------------------------------------------------- step 3: assign ---

def _unjudged_reasons(batch: pa.RecordBatch, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch rows not among ``kept`` and why: ``status`` not ``ok``, or no usable vector."""
    rest = np.setdiff1d(np.arange(batch.num_rows), kept)
    if "status" in batch.schema.names:
        ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False).to_numpy(zero_copy_only=False)[rest]
    else:
        ok = np.ones(len(rest), dtype=bool)
    return rest, np.where(ok, REASON_NO_EMBEDDING, REASON_ERROR)


def _assigned_batch(plan: DedupPlan, index: faiss.Index, pos: int, batch: pa.RecordBatch) -> pa.Table:
    """One results batch as assign rows: cluster, row, id, centroid similarity, vector, reason."""
    ids, vecs, _, kept = _extract(batch, plan.id_column, plan.settings.embedding_column, plan.dim)
    rest, reasons = _unjudged_reasons(batch, kept)
    if not index.ntotal:  # no centroids (the sample held no usable vector): nothing is judged
        rest, reasons = np.r_[kept, rest], np.r_[np.full(len(kept), REASON_NOT_CLUSTERED), reasons]
        ids, vecs, kept = ids[:0], vecs[:0], kept[:0]
    sim, cluster = np.zeros(len(vecs), np.float32), np.zeros(len(vecs), np.int32)
    if len(vecs):
        found_sim, found = index.search(vecs, 1)
        sim, cluster = found_sim[:, 0], found[:, 0].astype(np.int32)
    all_ids = pc.cast(batch.column(plan.id_column), pa.string())
    n_rest = len(rest)
    vec_type = pa.list_(pa.float32(), plan.dim)
    judged = pa.table({
        "cluster": pa.array(cluster, pa.int32()), "row": pa.array(pos + kept, pa.int64()), "id": ids,
        "centroid_similarity": pa.array(sim, pa.float32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), plan.dim),
        "reason": pa.nulls(len(vecs), pa.string())})
    others = pa.table({
        "cluster": pa.array(np.full(n_rest, UNJUDGED, np.int32)), "row": pa.array(pos + rest, pa.int64()),
        "id": all_ids.take(pa.array(rest, pa.int64())), "centroid_similarity": pa.nulls(n_rest, pa.float32()),
        "embedding": pa.nulls(n_rest, vec_type), "reason": pa.array(reasons, pa.string())})
    return pa.concat_tables([judged, others])


def assign_task(plan: DedupPlan, file_number: int, centroids: np.ndarray) -> np.ndarray:
    """Write one results file's rows sorted by (cluster, row); return rows per cluster
    (``counts[0]`` = rows without a usable embedding, ``counts[c + 1]`` = cluster ``c``)."""
    f = plan.files[file_number]
    index = faiss.IndexFlatIP(plan.dim)
    if len(centroids):
        index.add(centroids)
    with _Threads(1):
        parts = [_assigned_batch(plan, index, pos, batch)
                 for pos, batch in iter_row_range([f], f.start, f.start + f.rows, plan.columns, plan.s3)]
    table = pa.concat_tables(parts).sort_by([("cluster", "ascending"), ("row", "ascending")])
    pio.write_parquet_atomic(table, plan.assign_path(file_number), plan.s3, row_group_size=ASSIGN_ROW_GROUP)
    clusters = table.column("cluster").to_numpy()
    return np.bincount(clusters + 1, minlength=len(centroids) + 1).astype(np.int64)


# ------------------------------------------------------------------------ step 4: units ---

@dataclass(frozen=True)
class Unit:
    """Clusters ``[first, last]`` handled by one task, and how many rows they hold."""

    number: int
    first: int
    last: int
    rows: int


def plan_units(counts: np.ndarray, block_rows: int) -> list[Unit]:
    """Pack consecutive clusters into units of at most ``block_rows`` rows; a larger cluster is a
    unit of its own (streamed in blocks), as are the unjudged rows (``counts[0]``)."""
    units: list[Unit] = []
    if counts[0]:
        units.append(Unit(0, UNJUDGED, UNJUDGED, int(counts[0])))
    first, rows = None, 0
    for c, n in enumerate(counts[1:].tolist()):
        if n == 0:
            continue
        if first is not None and (rows + n > block_rows or n > block_rows):
            units.append(Unit(len(units), first, c - 1, rows))
            first, rows = None, 0
        if first is None:
            first = c
        rows += n
        if n > block_rows:
            units.append(Unit(len(units), c, c, n))
            first, rows = None, 0
    if first is not None:
        units.append(Unit(len(units), first, len(counts) - 2, rows))
    return units


def iter_cluster_rows(path: str, first: int, last: int, s3: S3Options | None,
                      columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of clusters ``[first, last]`` of one assign file, in file order, reading only the
    row groups whose statistics overlap them."""
    fs = pio.filesystem_for(path, s3)
    with fs.open_input_file(pio.strip_scheme(path)) as handle:
        pf = pq.ParquetFile(handle)
        col = pf.schema_arrow.get_field_index("cluster")
        for g in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(g).column(col).statistics
            if stats is not None and stats.has_min_max and (stats.max < first or stats.min > last):
                continue
            t = pf.read_row_group(g, columns=columns)
            c = t.column("cluster")
            mask = pc.and_(pc.greater_equal(c, first), pc.less_equal(c, last))
            t = t.filter(mask)
            if t.num_rows:
                yield t


def _decide(meta: pa.Table, n: int, block: Callable[[int], np.ndarray], block_rows: int,
            threshold: float) -> pa.Table:
    """Output rows of one cluster whose ``n`` rows are ``meta`` (id, row, cluster, similarity)."""
    labels, best = link_duplicates(n, block, block_rows, threshold)
    ids = np.asarray(meta.column("id").to_pylist(), dtype=str) if n else np.zeros(0, str)
    groups = choose_representatives(labels, meta.column("centroid_similarity").to_numpy(), ids)
    rows = meta.column("row").to_numpy()
    keep = groups.keep
    reason = np.where(~keep, REASON_DUPLICATE, np.where(groups.size > 1, REASON_KEPT, REASON_UNIQUE))
    id_array = meta.column("id").combine_chunks() if n else pa.array([], pa.string())
    duplicate_of = id_array.take(pa.array(groups.representative))
    return pa.table({
        "id": id_array, "cluster": meta.column("cluster"), "group": pa.array(rows[groups.representative], pa.int64()),
        "duplicate_of": pc.if_else(pa.array(keep), pa.nulls(n, pa.string()), duplicate_of),
        "max_similarity": pa.array(np.where(np.isfinite(best), best, np.nan), pa.float32(),
                                   mask=~np.isfinite(best)),
        "keep": pa.array(keep), "reason": pa.array(reason, pa.string())}, schema=OUTPUT_SCHEMA)


def _vectors(table: pa.Table, dim: int) -> np.ndarray:
    values = table.column("embedding").combine_chunks().flatten()
    return np.ascontiguousarray(values.to_numpy(zero_copy_only=False).reshape(-1, dim), dtype=np.float32)


def _small_unit(plan: DedupPlan, unit: Unit) -> pa.Table:
    """Clusters that fit one block together: all in memory, decided cluster by cluster."""
    tables = [t for i in range(len(plan.files)) for t in iter_cluster_rows(plan.assign_path(i), unit.first,
                                                                            unit.last, plan.s3)]
    table = pa.concat_tables(tables).sort_by([("cluster", "ascending"), ("row", "ascending")])
    clusters = table.column("cluster").to_numpy()
    starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]])
    out, b = [], plan.settings.block_rows
    for lo, hi in zip(starts, np.r_[starts[1:], len(clusters)]):
        part = table.slice(lo, hi - lo)
        out.append(_decide(part.drop_columns(["embedding"]), len(part), _blocks_of(_vectors(part, plan.dim), b), b,
                           plan.settings.threshold))
    return pa.concat_tables(out)


def _blocks_of(vectors: np.ndarray, block_rows: int) -> Callable[[int], np.ndarray]:
    return lambda j: vectors[j * block_rows:(j + 1) * block_rows]


def _large_cluster(plan: DedupPlan, unit: Unit) -> pa.Table:
    """One cluster larger than a block: its vectors go to a local file, read back block by block."""
    b, d = plan.settings.block_rows, plan.dim
    metas = []
    with tempfile.NamedTemporaryFile(prefix="clip-etl-dedup-", suffix=".f32") as spill:
        for i in range(len(plan.files)):
            for t in iter_cluster_rows(plan.assign_path(i), unit.first, unit.last, plan.s3):
                _vectors(t, d).tofile(spill)
                metas.append(t.drop_columns(["embedding"]))
        spill.flush()
        meta = pa.concat_tables(metas)

        def block(j: int) -> np.ndarray:
            count = min(b, meta.num_rows - j * b)
            return np.fromfile(spill.name, dtype=np.float32, count=count * d, offset=j * b * d * 4).reshape(count, d)

        return _decide(meta, meta.num_rows, block, b, plan.settings.threshold)


def _unjudged_unit(plan: DedupPlan, unit: Unit) -> pa.Table:
    cols = ["id", "reason", "row", "cluster"]
    t = pa.concat_tables([t for i in range(len(plan.files))
                          for t in iter_cluster_rows(plan.assign_path(i), UNJUDGED, UNJUDGED, plan.s3, cols)])
    n = t.num_rows
    return pa.table({"id": t.column("id"), "cluster": pa.nulls(n, pa.int32()), "group": pa.nulls(n, pa.int64()),
                     "duplicate_of": pa.nulls(n, pa.string()), "max_similarity": pa.nulls(n, pa.float32()),
                     "keep": pa.nulls(n, pa.bool_()), "reason": t.column("reason")}, schema=OUTPUT_SCHEMA)


def unit_task(plan: DedupPlan, unit: Unit) -> dict[str, Any]:
    """Decide one unit's rows and write them as output part ``unit.number``; returns its counts."""
    t0 = time.perf_counter()
    if unit.first == UNJUDGED:
        table = _unjudged_unit(plan, unit)
    elif unit.rows > plan.settings.block_rows:
        table = _large_cluster(plan, unit)
    else:
        table = _small_unit(plan, unit)
    pio.write_parquet_atomic(table, plan.part_path(unit.number), plan.s3)
    keep = table.column("keep")
    return {"rows": table.num_rows, "duplicates": int(pc.sum(pc.invert(pc.fill_null(keep, True))).as_py() or 0),
            "groups": int(pc.count(pc.filter(table.column("reason"), pc.equal(table.column("reason"),
                                                                             REASON_KEPT))).as_py()),
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------- the driver ---

def _remote(fn: Callable[..., Any], cpus: int = 1):
    return ray.remote(fn).options(num_cpus=cpus)


def _gather(refs: list[ray.ObjectRef], what: str) -> Iterator[Any]:
    """Results of ``refs`` as they finish; a failure is a :class:`DedupError` naming the step."""
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield _result(done[0], what)
            except IndexBuildError as e:
                raise DedupError(str(e)) from None
    finally:
        for ref in pending:
            ray.cancel(ref)


def plan_dedup(results_dir: str, settings: DedupConfig, work_dir: str, s3: S3Options | None) -> DedupPlan:
    """Step 1 from the footers: a :class:`DedupPlan`, or a :class:`DedupError` for unusable results."""
    try:
        files, schema = scan_input(results_dir, s3)
        _check_columns(schema, "id", settings.embedding_column)
    except IndexBuildError as e:
        raise DedupError(f"nothing to deduplicate: {e}") from None
    if not sum(f.rows for f in files):
        raise DedupError(f"nothing to deduplicate: the results under {results_dir} hold no rows")
    plan = DedupPlan(files, 0, settings, work_dir, s3)
    plan.columns = ["id", settings.embedding_column] + (["status"] if "status" in schema.names else [])
    plan.dim = _dim_from_schema(schema, settings.embedding_column) or 0
    return plan


def _settings_record(settings: DedupConfig) -> dict[str, Any]:
    return asdict(settings) | {"enabled": None}


def is_current(output: str, settings: DedupConfig, s3: S3Options | None) -> bool:
    """Whether ``OUTPUT/dedup/`` is complete and was made with these settings (``clip-etl run``
    then skips the step; results do not change after their run finished)."""
    path = pio.join(output, DEDUP_DIR, SUMMARY_FILE)
    try:
        summary = pio.read_json(path, s3) if pio.exists(path, s3) else None
    except (OSError, ValueError):
        return False
    return bool(summary) and summary.get("format") == FORMAT and summary.get("settings") == _settings_record(settings)


def _run_steps(plan: DedupPlan, say: Callable[[str], None], timings: dict[str, float]) -> dict[str, Any]:
    """Steps 2-4 on Ray; returns the counts of the decisions."""
    threads = max(1, min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1))
    t = time.perf_counter()
    if not plan.dim:
        plan.dim = _result(_remote(_peek_dim).remote(plan.files, plan.settings.embedding_column, plan.s3), "planning")
    centroids = _result(_remote(train_task, threads).remote(plan, threads), "training k-means")
    timings["train_s"] = round(time.perf_counter() - t, 3)
    say(f"k-means: {len(centroids)} clusters from a sample of up to {plan.settings.sample_rows} rows")
    t = time.perf_counter()
    plan_ref, centroids_ref = ray.put(plan), ray.put(centroids)
    counts = np.zeros(len(centroids) + 1, np.int64)
    for c in _gather([_remote(assign_task).remote(plan_ref, i, centroids_ref) for i in range(len(plan.files))],
                     "assigning rows to clusters"):
        counts += c
    timings["assign_s"] = round(time.perf_counter() - t, 3)
    units = plan_units(counts, plan.settings.block_rows)
    sizes = counts[1:]
    say(f"{int(sizes.sum())} rows in {int((sizes > 0).sum())} clusters (largest {int(sizes.max(initial=0))}), "
        f"{int(counts[0])} without a usable embedding; {len(units)} group task(s)")
    t = time.perf_counter()
    done = list(_gather([_remote(unit_task).remote(plan_ref, u) for u in units], "finding duplicate groups"))
    timings["groups_s"] = round(time.perf_counter() - t, 3)
    timings["group_tasks_s"] = round(sum(d["seconds"] for d in done), 3)
    return {"rows": int(sum(d["rows"] for d in done)), "judged": int(sizes.sum()), "unjudged": int(counts[0]),
            "clusters": int(len(centroids)), "nonempty_clusters": int((sizes > 0).sum()),
            "largest_cluster": int(sizes.max(initial=0)), "units": len(units),
            "groups": int(sum(d["groups"] for d in done)), "duplicates": int(sum(d["duplicates"] for d in done)),
            "kept": int(sizes.sum()) - int(sum(d["duplicates"] for d in done))}


def dedup_results(output: str, settings: DedupConfig, *, s3: S3Options | None = None,
                  ray_config: RayConfig | None = None, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Deduplicate ``OUTPUT/results/`` into ``OUTPUT/dedup/``; returns the summary (``dedup.json``).

    Runs on the initialized Ray if there is one, else on the one ``ray_config`` describes. A
    re-run replaces the whole previous ``OUTPUT/dedup/``; the work files of this run live under
    ``OUTPUT/_dedup_work-RUN/`` and are removed at the end.
    """
    from contextlib import ExitStack

    t_start = time.perf_counter()
    output = output if pio.is_s3(output) else pio.strip_scheme(output)
    results_dir = pio.join(output, "results")
    work_dir = pio.join(output, WORK_PREFIX + pio.unique_suffix())
    plan = plan_dedup(results_dir, settings, work_dir, s3)
    say = lambda msg: log(f"[dedup] {msg}")  # noqa: E731
    say(f"{plan.total_rows} rows in {len(plan.files)} results file(s) -> {pio.join(output, DEDUP_DIR)}")
    timings: dict[str, float] = {}
    try:
        with ExitStack() as stack:
            t = time.perf_counter()
            _start_ray(stack, ray_config)
            timings["ray_start_s"] = round(time.perf_counter() - t, 3)
            if not pio.is_s3(work_dir):
                os.makedirs(pio.join(work_dir, "out"), exist_ok=True)
            counts = _run_steps(plan, say, timings)
        if counts["rows"] != plan.total_rows:
            raise DedupError(f"dedup wrote {counts['rows']} rows for {plan.total_rows} results rows")
        pio.replace_tree(pio.join(work_dir, "out"), pio.join(output, DEDUP_DIR), s3)
    finally:
        pio.remove_tree(work_dir, s3)
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    summary = {"format": FORMAT, "settings": _settings_record(settings), "threshold": settings.threshold,
               "results": results_dir, "counts": counts, "timings": timings,
               "created_at": datetime.now(timezone.utc).isoformat()}
    pio.write_json_atomic(pio.join(output, DEDUP_DIR, SUMMARY_FILE), summary, s3)
    say(f"{counts['duplicates']} duplicates in {counts['groups']} groups of {counts['judged']} judged rows "
        f"(threshold {settings.threshold}) in {timings['total_s']:.1f}s")
    return summary


__all__ = ["DEDUP_DIR", "DedupError", "OUTPUT_SCHEMA", "SUMMARY_FILE", "auto_clusters", "dedup_results",
           "is_current", "plan_units"]

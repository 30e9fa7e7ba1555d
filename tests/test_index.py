"""Offline retrieval: index selection, sharded builds on Ray tasks (the driver reads no data),
exact shard merging, resume, S3, search CLI.

The data are synthetic "clustered" embeddings: points on a low-dimensional mixture of Gaussians
mapped into D dimensions and normalized, which, like CLIP embeddings, have far fewer degrees of
freedom than dimensions. Sizes are kept small so the module runs in a few minutes on 2 cores;
the 100k x 512 recall check is marked ``e2e``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.index import build as index_build
from pipelines.index import merge_topk, open_index
from pipelines.index.build import CRASH_ENV, IndexBuildError, build_index, extract_vectors, plan_shards
from pipelines.index.tuning import nn_distance_estimate, query_hits, recall_interval, wilson_interval
from pipelines.index.select import (
    GIB,
    choose_index,
    index_memory_bytes,
    nlist_for,
    parse_factory,
    search_parameter_grid,
    train_size_for,
)
from pipelines.storage import S3Options

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers ---

def clustered(n: int, d: int, *, clusters: int = 100, latent: int = 32, seed: int = 0) -> np.ndarray:
    """Normalized float32 vectors from a Gaussian mixture in ``latent`` dims, mapped to ``d`` dims."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, latent)).astype(np.float32) * 1.5
    proj = rng.standard_normal((latent, d)).astype(np.float32) / np.sqrt(latent)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 20000):
        hi = min(n, lo + 20000)
        z = centers[rng.integers(0, clusters, hi - lo)] + rng.standard_normal((hi - lo, latent)).astype(np.float32)
        x = z @ proj + 0.05 * rng.standard_normal((hi - lo, d)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_results(folder: Path, vectors: np.ndarray, *, files: int = 2, row_group: int = 2000,
                  errors: int = 0, extra: dict | None = None) -> list[str]:
    """Pipeline-shaped results Parquet: id, image_embedding (fixed-size list), status, metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    n, d = vectors.shape
    ids = [f"img-{i:06d}" for i in range(n)]
    status = ["ok"] * n
    emb = list(vectors)
    for i in range(errors):  # every 7th row from the start is a failed row with no embedding
        status[i * 7] = "error"
        emb[i * 7] = None
    columns = {
        "id": pa.array(ids),
        "image_embedding": pa.array(emb, type=pa.list_(pa.float32(), d)),
        "status": pa.array(status),
        "image": pa.array([f"/data/{i}.jpg" for i in ids]),
        "label": pa.array(["dog" if i % 2 else "cat" for i in range(n)]),
        "caption": pa.array([f"a photo number {i}" for i in range(n)]),
    }
    columns.update(extra or {})
    table = pa.table(columns)
    bounds = np.linspace(0, n, files + 1).astype(int)
    paths = []
    for i in range(files):
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), path, row_group_size=row_group)
        paths.append(str(path))
    return paths


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    _, ids = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids


def recall(found_ids: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found_ids, truth)]))


def median_nn_distance(vectors: np.ndarray, probes: int = 1000) -> float:
    """Exact median distance from a stored vector to its nearest other stored vector."""
    scores, _ = faiss.knn(vectors[:probes], vectors, 2, metric=faiss.METRIC_INNER_PRODUCT)
    return float(np.median(np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores[:, 1]))))


def noisy_copies(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """Queries unlike the stored vectors: ``n`` stored rows plus isotropic noise of norm ``noise``
    times the data's median nearest-neighbour distance, re-normalized."""
    rng = np.random.default_rng(seed)
    src = base[rng.choice(len(base), n, replace=False)]
    scale = noise * median_nn_distance(base) / np.sqrt(base.shape[1])
    q = src + scale * rng.standard_normal(src.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_recall(index_dir: Path, base: np.ndarray, queries: np.ndarray) -> float:
    """recall@10 of the built index on ``queries`` against exact search (IndexFlatIP) over ``base``,
    whose row i has id img-i."""
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    _, truth = flat.search(queries, 10)
    _, ids = open_index(str(index_dir)).search(queries, 10)
    return recall(ids, np.array([f"img-{i:06d}" for i in range(len(base))])[truth])


@pytest.fixture(scope="module")
def ray_cluster():
    """A small local Ray for the module (reused when another module left one running)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """6000 x 48 clustered vectors (60 of them failed rows) in 3 results files."""
    folder = tmp_path_factory.mktemp("small")
    vecs = clustered(6000, 48, clusters=40, latent=16, seed=1)
    write_results(folder / "results", vecs, files=3, row_group=700, errors=60)
    return folder, vecs


# ------------------------------------------------------------------------- selection ---

def test_choice_ladder_follows_size_and_budget():
    assert choose_index(500, 512, 0.001).factory == "Flat"  # tiny: always exact
    assert choose_index(15_000, 512, 4).factory == "Flat"
    hnsw = choose_index(100_000, 512, 4)
    assert hnsw.factory == "HNSW32" and hnsw.kind == "hnsw" and hnsw.train_size == 0
    # raw vectors (205 MB) fit, a 32-link graph does not quite: fewer links
    assert choose_index(100_000, 512, 0.215).factory.startswith("HNSW")
    assert choose_index(100_000, 512, 0.215).factory != "HNSW32"
    # raw vectors fit but no graph: IVF over the raw vectors
    ivf = choose_index(100_000, 512, 0.195)
    assert ivf.kind == "ivf_flat" and ivf.factory == f"IVF{nlist_for(100_000)},Flat"
    # too many vectors for one graph: inverted lists with an HNSW coarse quantizer
    big = choose_index(20_000_000, 768, 200)
    assert big.kind == "ivf_flat" and "_HNSW32" in big.factory
    # compressed: the largest code that fits, OPQ for short codes, sub-quantizers divide dims
    pq_ = choose_index(10_000_000, 768, 2)
    parts = parse_factory(pq_.factory, 768)
    assert pq_.kind == "ivf_pq" and pq_.estimated_bytes <= 2 * GIB
    assert parts.dim_out % parts.pq_m == 0
    tighter = choose_index(10_000_000, 768, 0.5)
    assert parse_factory(tighter.factory, 768).pq_m < parts.pq_m
    assert tighter.factory.startswith("OPQ")
    with pytest.raises(ValueError, match="too small"):
        choose_index(100_000_000, 768, 0.1)


def test_nlist_and_train_size():
    for n in (2_000, 50_000, 100_000, 1_000_000, 100_000_000):
        nl = nlist_for(n)
        assert nl & (nl - 1) == 0  # power of two
        assert nl <= max(1, n // 39)
        if n >= 50_000:
            assert 2 * np.sqrt(n) <= nl <= 16 * np.sqrt(n)
    assert train_size_for("HNSW32", 10**6, 512, 4 * GIB) == 0
    ts = train_size_for("IVF1024,PQ64x8", 10**6, 512, 4 * GIB)
    assert 39 * 1024 <= ts <= 10**6
    # a small budget caps the training sample (held as float32 while FAISS trains)
    assert train_size_for("IVF65536_HNSW32,PQ32x8", 10**8, 768, 1 * GIB) < 64 * 65536


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF64,Flat", "IVF64,PQ8x8", "OPQ8_32,IVF64,PQ8x8"])
def test_memory_estimate_matches_faiss(factory):
    n, d = 8000, 64
    x = clustered(n, d, seed=2)
    index = index_build.new_index(factory, d)
    if factory.startswith("OPQ"):  # a few OPQ iterations are enough to measure a size
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 2
    index.train(x[:2000])
    index.add(x)
    actual = faiss.serialize_index(index).nbytes
    estimate = index_memory_bytes(factory, n, d)
    assert 0.75 * actual <= estimate <= 1.35 * actual, (factory, actual, estimate)


def test_search_parameter_grid_is_ordered():
    grid = search_parameter_grid("IVF256,PQ16x8", 64)
    assert grid[0] == "nprobe=1" and grid[-1] == "nprobe=256"
    values = [int(g.split("=")[1]) for g in grid]
    assert values == sorted(values)
    assert search_parameter_grid("IVF8192_HNSW32,Flat", 64)[3] == "nprobe=4,quantizer_efSearch=16"
    assert search_parameter_grid("HNSW32", 64)[0] == "efSearch=16"
    assert search_parameter_grid("Flat", 64) == [""]


# ------------------------------------------------------------------------- extraction ---

def test_extract_vectors_filters_and_counts():
    d = 4
    batch = pa.record_batch({
        "id": pa.array([1, 2, None, 4, 5, 6, 7]),
        "emb": pa.array([[1, 0, 0, 0], None, [0, 1, 0, 0], [0, 0, 3, 0], [1, 2], [np.nan, 0, 0, 1], [0, 0, 0, 2]],
                        type=pa.list_(pa.float64())),
        "status": pa.array(["ok", "ok", "ok", "error", "ok", "ok", None]),
    })
    ids, vecs, counts = extract_vectors(batch, "id", "emb", d)
    assert ids.to_pylist() == ["1"]
    assert vecs.dtype == np.float32 and vecs.shape == (1, 4)
    assert counts == {"rows": 7, "kept": 1, "status_not_ok": 2, "null_embedding": 1, "null_id": 1, "bad_vector": 2}
    # unnormalized input is normalized
    b2 = pa.record_batch({"id": pa.array(["a"]), "emb": pa.array([[0, 0, 3, 4]], type=pa.list_(pa.float32(), 4))})
    _, v2, _ = extract_vectors(b2, "id", "emb", 4)
    np.testing.assert_allclose(v2, [[0, 0, 0.6, 0.8]], rtol=1e-6)


def test_plan_shards_covers_rows():
    ranges = plan_shards(10, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert plan_shards(2, 5) == [(0, 1), (1, 2)]


def test_merge_topk_is_stable_and_pads():
    s1 = np.array([[0.9, 0.5]], np.float32)
    s2 = np.array([[0.9, 0.1]], np.float32)
    p1 = np.array([[3, 4]])
    p2 = np.array([[10, -1]])
    s, p = merge_topk([s1, s2], [p1, p2], 5)
    assert p.tolist() == [[3, 10, 4, -1, -1]]  # tie: first shard first; missing hits last
    assert s[0, 3] == -np.inf


# ---------------------------------------------------------------------------- builds ---

def test_flat_build_ids_round_trip_and_counts(small, tmp_path, ray_cluster):
    folder, vecs = small
    meta = build_index(str(folder / "results"), str(tmp_path / "index"), factory="Flat", shards=2,
                       progress=False, model_info={"name": "demo.pt", "fingerprint": "abc"})
    assert meta["count"] == 6000 - 60
    assert meta["source"]["skipped"]["status_not_ok"] == 60
    assert meta["recall"]["10"] == 1.0 and meta["target_reached"]
    assert meta["model"] == {"name": "demo.pt", "fingerprint": "abc"}
    for key in ("factory", "metric", "dim", "count", "shards", "search_params", "recall", "latency_ms",
                "build_seconds", "embedding_column", "model"):
        assert key in meta
    on_disk = json.loads((tmp_path / "index" / "index.json").read_text())
    assert on_disk["count"] == meta["count"]
    idx = open_index(str(tmp_path / "index"))
    assert idx.ntotal == 5940 and idx.dim == 48 and len(idx.shards) == 2 + 1
    # the tuning queries were held out of the tuned data shards and have a shard of their own
    assert meta["shards"][-1]["file"] == "shard-queries.faiss"
    assert meta["shards"][-1]["held_out_queries"] == meta["shards"][-1]["count"] == meta["tuning"]["queries"] > 0
    assert sum(s["count"] for s in meta["shards"]) == meta["count"]
    # every valid row is in the index exactly once, and found by its own vector
    valid = np.delete(np.arange(6000), np.arange(60) * 7)
    ids = np.concatenate([pq.read_table(tmp_path / "index" / s["ids"]).column("id").to_numpy(zero_copy_only=False)
                          for s in meta["shards"]])
    assert sorted(ids) == [f"img-{i:06d}" for i in valid]
    _, top = idx.search(vecs[valid], 1)
    assert top[:, 0].tolist() == [f"img-{i:06d}" for i in valid]
    rows = np.array([1, 2, 3, 2500, 5999])  # row 0 is a failed row
    scores, ids = idx.search(vecs[rows], 3)
    assert ids[:, 0].tolist() == [f"img-{i:06d}" for i in rows]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    # more hits than vectors: padded with "" / -inf
    tiny_scores, tiny_ids = idx.search(vecs[:1], 6000)
    assert tiny_ids[0, -1] == "" and tiny_scores[0, -1] == -np.inf
    # by id: the item itself first, from the source Parquet
    s, i = idx.search_by_id("img-002500", 2)
    assert i[0] == "img-002500" and abs(s[0] - 1) < 1e-5
    assert "img-000000" not in set(idx.search(vecs[:1], 20)[1][0])
    with pytest.raises(ValueError, match="float32 array"):
        idx.search(np.zeros((2, 5), np.float32), 3)


def test_ivf_recall_reaches_target_and_records_tuning(small, tmp_path, ray_cluster):
    folder, vecs = small
    meta = build_index(str(folder / "results"), str(tmp_path / "index"), factory="IVF64,Flat",
                       target_recall=0.95, progress=False)
    assert meta["target_reached"] and meta["recall"]["10"] >= 0.95
    assert meta["search_params"].startswith("nprobe=")
    trials = meta["tuning"]["trials"]
    assert trials[-1]["params"] == meta["search_params"] and trials[-1]["recall@10_low"] >= 0.95
    # the first (fastest) setting whose lower bound reaches it, not its mean
    assert all(t["recall@10_low"] < 0.95 for t in trials[:-1])
    assert all(t["recall@10_low"] <= t["recall@10"] <= t["recall@10_high"] for t in trials)
    chosen = meta["tuning"]["recall@10"]
    assert chosen["estimate"] == meta["recall"]["10"] == trials[-1]["recall@10"]
    assert chosen["confidence"] == 0.95 and chosen["queries"] == meta["tuning"]["queries"] == 600
    source = meta["tuning"]["query_source"]
    assert source["source"] == "perturbed_held_out" and source["noise"] == 2.0
    assert source["noise_norm"] == pytest.approx(2.0 * source["nn_distance"], rel=1e-4)
    # the spacing estimate is the spacing of the data (here the sample is nearly all of it)
    assert source["nn_distance"] == pytest.approx(median_nn_distance(vecs), rel=0.1)
    timings = meta["timings"]
    assert {"sample_s", "queries_s", "train_s", "add_s", "tune_s", "merge_s", "measure_s"} <= set(timings)
    assert set(timings["shard_tasks"]) == {"read_s", "ground_truth_s", "add_s", "write_s"}
    # independent check on fresh queries (not from the data) against exact search
    queries = clustered(6300, 48, clusters=40, latent=16, seed=1)[6000:]  # same mixture, unseen points
    base = np.delete(vecs, np.arange(60) * 7, axis=0)
    idx = open_index(str(tmp_path / "index"))
    _, ids = idx.search(queries, 10)
    truth = exact_topk(base, queries, 10)
    names = np.delete(np.array([f"img-{i:06d}" for i in range(6000)]), np.arange(60) * 7)
    assert recall(ids, names[truth]) >= 0.93


def test_sharded_search_equals_unsharded_and_merged(small, tmp_path, ray_cluster):
    folder, vecs = small
    common = dict(factory="IVF32,PQ12x8", train_sample=3000, progress=False, tuning_queries=200)
    one = build_index(str(folder / "results"), str(tmp_path / "one"), shards=1, **common)
    many = build_index(str(folder / "results"), str(tmp_path / "many"), shards=4, merge=True, **common)
    assert len(many["shards"]) == 4 + 1 and many["merged"]["count"] == one["count"]  # + the queries' shard
    a = open_index(str(tmp_path / "one"))
    b = open_index(str(tmp_path / "many"), prefer_merged=False)
    m = open_index(str(tmp_path / "many"), prefer_merged=True)
    assert len(b.shards) == 4 + 1 and len(m.shards) == 1
    queries = vecs[::37]
    for params in ("nprobe=1", "nprobe=8", "nprobe=32"):
        for idx in (a, b, m):
            idx.set_search_params(params)
        sa, ia = a.search(queries, 20)
        sb, ib = b.search(queries, 20)
        sm, im = m.search(queries, 20)
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sa, sm, rtol=1e-5, atol=1e-6)
        tie_free = np.all(np.diff(sa, axis=1) < -1e-6, axis=1)
        assert (ia[tie_free] == ib[tie_free]).all() and (ia[tie_free] == im[tie_free]).all()
        assert tie_free.mean() > 0.5
    # the same tuned parameters were found either way
    assert one["search_params"] == many["search_params"]


def test_flat_shards_equal_exact_search(small, tmp_path, ray_cluster):
    folder, vecs = small
    build_index(str(folder / "results"), str(tmp_path / "idx"), factory="Flat", shards=3, progress=False)
    idx = open_index(str(tmp_path / "idx"))
    base = np.delete(vecs, np.arange(60) * 7, axis=0)
    names = np.delete(np.array([f"img-{i:06d}" for i in range(6000)]), np.arange(60) * 7)
    queries = clustered(6100, 48, clusters=40, latent=16, seed=1)[6000:]
    scores, ids = idx.search(queries, 10)
    ts, ti = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(scores, ts, rtol=1e-5, atol=1e-6)
    assert (ids == names[ti]).mean() > 0.99  # equal up to exact ties


def _build_in_subprocess(results, out, crash: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``build_index(results, out, progress=True, **kwargs)`` in a fresh interpreter, a driver of
    the module's Ray (so a crash kills the driver only, as a killed ``clip-etl index`` would), told
    to exit abruptly at ``crash`` (see CRASH_ENV) when given."""
    import ray

    script = ("import json, sys; from pipelines.index.build import build_index; "
              "build_index(sys.argv[1], sys.argv[2], progress=True, **json.loads(sys.argv[3]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop(CRASH_ENV, None)
    if crash is not None:
        env[CRASH_ENV] = crash
    return subprocess.run([sys.executable, "-c", script, str(results), str(out), json.dumps(kwargs)], env=env,
                          capture_output=True, text=True, timeout=300)


def _files(folder: Path, pattern: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


def test_resume_after_crash_gives_same_index(small, tmp_path, ray_cluster):
    folder, vecs = small
    kw = dict(factory="IVF32,PQ12x8", shards=4, train_sample=3000, tuning_queries=200)
    out = tmp_path / "resumed"
    proc = _build_in_subprocess(folder / "results", out, crash="2", **kw)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert not (out / "index.json").exists()
    # two shard tasks reported done; the crash killed the ones in flight (shards run side by side,
    # so which finished first, and whether a third made it, is up to the scheduler)
    kept = _files(out / "_build", "shard-0*.json")
    assert len(kept) >= 2, kept
    first_trained = (out / "_build" / "trained.faiss").read_bytes()
    shards_before = _files(out, "shard-*.faiss")

    proc = _build_in_subprocess(folder / "results", out, **kw)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{len(kept)} shard(s) already built; {4 - len(kept)} to do" in proc.stderr
    assert "reusing the saved training state" in proc.stderr
    after = _files(out, "shard-*.faiss")
    assert all(after[name] == mtime for name, mtime in shards_before.items())  # kept, not rebuilt
    assert (out / "_build" / "trained.faiss").read_bytes() == first_trained

    fresh = build_index(str(folder / "results"), str(tmp_path / "fresh"), progress=False, **kw)
    assert (tmp_path / "fresh" / "_build" / "trained.faiss").read_bytes() == first_trained  # deterministic
    for name in [f"shard-{i:05d}.faiss" for i in range(4)] + ["shard-queries.faiss"]:
        assert (tmp_path / "fresh" / name).read_bytes() == (out / name).read_bytes(), name
    a, b = open_index(str(out)), open_index(str(tmp_path / "fresh"))
    assert a.meta["search_params"] == fresh["search_params"]
    sa, ia = a.search(vecs[::50], 10)
    sb, ib = b.search(vecs[::50], 10)
    assert (ia == ib).all() and np.array_equal(sa, sb)


def test_resume_after_crash_after_tuning_rewrites_no_shard(small, tmp_path, ray_cluster):
    folder, _ = small
    kw = dict(factory="IVF16,Flat", shards=2, tuning_queries=100)
    out = tmp_path / "resumed"
    proc = _build_in_subprocess(folder / "results", out, crash="tuned", **kw)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert (out / "_build" / "tuning.json").exists() and not (out / "index.json").exists()
    queries = pq.read_table(out / "_build" / "tuning_queries.parquet")
    assert queries.num_rows == 100 and queries.column_names == ["id", "row", "embedding"]
    shards_before = _files(out, "shard-*")
    assert len(shards_before) == 2 * (2 + 1)  # .faiss and .ids.parquet of 2 data shards + the queries' shard

    proc = _build_in_subprocess(folder / "results", out, **kw)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reusing the tuned search parameters" in proc.stderr
    assert _files(out, "shard-*") == shards_before  # finishing the build wrote no shard again
    fresh = build_index(str(folder / "results"), str(tmp_path / "fresh"), progress=False, **kw)
    resumed = json.loads((out / "index.json").read_text())
    assert resumed["count"] == fresh["count"] == 5940 and resumed["shards"] == fresh["shards"]
    assert resumed["search_params"] == fresh["search_params"] and resumed["recall"] == fresh["recall"]
    for name in shards_before:
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_driver_reads_no_results_or_index_data(small, tmp_path, ray_cluster, monkeypatch):
    """Every read of result rows, vectors or index files happens in Ray tasks (other processes):
    the build succeeds with the driver's data readers made to fail."""
    folder, vecs = small

    def forbidden(*args, **kwargs):
        raise AssertionError("the driver read data")

    for name in ("iter_row_range", "read_sample", "_extract", "_read_queries", "_read_tuning_vectors", "_read_npz",
                 "load_shards"):
        monkeypatch.setattr(index_build, name, forbidden)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", forbidden)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    monkeypatch.setattr(faiss, "read_index", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    meta = build_index(str(folder / "results"), str(tmp_path / "index"), factory="IVF32,Flat", shards=3,
                       merge=True, progress=False, tuning_queries=200)
    monkeypatch.undo()
    assert meta["count"] == 5940 and meta["source"]["skipped"]["status_not_ok"] == 60
    assert [s["count"] for s in meta["shards"]][-1] == meta["tuning"]["queries"] == 200
    assert meta["merged"]["count"] == 5940 and meta["target_reached"] and meta["recall"]["10"] >= 0.95
    idx = open_index(str(tmp_path / "index"), prefer_merged=False)
    assert idx.ntotal == 5940
    queries = clustered(6300, 48, clusters=40, latent=16, seed=1)[6000:]  # unseen points
    base = np.delete(vecs, np.arange(60) * 7, axis=0)
    names = np.delete(np.array([f"img-{i:06d}" for i in range(6000)]), np.arange(60) * 7)
    assert recall(idx.search(queries, 10)[1], names[exact_topk(base, queries, 10)]) >= 0.93


def test_rerun_is_noop_and_changed_settings_rebuild(small, tmp_path, ray_cluster):
    folder, _ = small
    kw = dict(factory="Flat", progress=False)
    first = build_index(str(folder / "results"), str(tmp_path / "i"), **kw)
    again = build_index(str(folder / "results"), str(tmp_path / "i"), **kw)
    assert again["created_at"] == first["created_at"]  # complete and unchanged: nothing rebuilt
    other = build_index(str(folder / "results"), str(tmp_path / "i"), shards=2, **kw)
    assert len(other["shards"]) == 2 + 1 and not (tmp_path / "i" / "shard-00002.faiss").exists()
    assert open_index(str(tmp_path / "i")).ntotal == first["count"]


def test_hnsw_quantizer_training_is_deterministic():
    x = clustered(4000, 32, seed=3)
    blobs = []
    for _ in range(2):
        index = index_build.new_index("IVF64_HNSW32,Flat", 32)
        index_build.train_index(index, x, lambda m: None)
        blobs.append(faiss.serialize_index(index).tobytes())
    assert blobs[0] == blobs[1]


def test_bad_inputs_fail_clearly(tmp_path, ray_cluster):
    with pytest.raises(IndexBuildError, match="does not exist"):
        build_index(str(tmp_path / "nope"), str(tmp_path / "i"), progress=False)
    write_results(tmp_path / "r", clustered(100, 8), files=1)
    with pytest.raises(IndexBuildError, match="lacks column"):
        build_index(str(tmp_path / "r"), str(tmp_path / "i"), embedding_column="text_embedding", progress=False)
    with pytest.raises(IndexBuildError, match="invalid FAISS factory"):
        build_index(str(tmp_path / "r"), str(tmp_path / "i"), factory="NotAnIndex", progress=False)
    with pytest.raises(IndexBuildError, match="index.tuning_queries: .*q.npy does not exist"):
        build_index(str(tmp_path / "r"), str(tmp_path / "i"), tuning_query_file=str(tmp_path / "q.npy"),
                    progress=False)
    np.save(tmp_path / "q.npy", np.ones((5, 7), np.float32))
    with pytest.raises(IndexBuildError, match=r"index.tuning_queries: .*shape \(5, 7\), not \[Q, 8\]"):
        build_index(str(tmp_path / "r"), str(tmp_path / "i"), tuning_query_file=str(tmp_path / "q.npy"),
                    progress=False)
    with pytest.raises(FileNotFoundError, match="no finished index"):
        open_index(str(tmp_path / "i"))


def test_mmap_and_in_memory_loading_agree(small, tmp_path, ray_cluster):
    folder, vecs = small
    build_index(str(folder / "results"), str(tmp_path / "i"), factory="IVF32,Flat", progress=False)
    a = open_index(str(tmp_path / "i"), mmap=True)
    b = open_index(str(tmp_path / "i"), mmap=False)
    sa, ia = a.search(vecs[:50], 10)
    sb, ib = b.search(vecs[:50], 10)
    assert (ia == ib).all() and np.array_equal(sa, sb)


# ---------------------------------------------------------- tuning queries and the bound ---

def test_recall_interval_covers_the_mean_when_misses_come_together():
    """A query's misses come together (one missed list loses several neighbours): counted as
    independent hits, the interval would cover the true recall far less often than it says."""
    rng = np.random.default_rng(0)
    true_recall = 1 - 0.03 * 0.5  # 3% of queries lose 5 of their 10 neighbours
    covered = naive = 0
    for _ in range(400):
        hits = np.where(rng.random(1000) < 0.03, 5, 10)
        trials = np.full(1000, 10)
        iv = recall_interval(hits, trials, 0.95)
        covered += iv.low <= true_recall <= iv.high
        lo, hi = wilson_interval(hits.sum() / trials.sum(), trials.sum(), 1.96)
        naive += lo <= true_recall <= hi
        assert iv.low <= iv.estimate <= iv.high
    assert covered / 400 >= 0.92
    assert naive / 400 < 0.8  # what the design effect corrects


def test_recall_interval_edges():
    perfect = recall_interval(np.full(1000, 10), np.full(1000, 10), 0.95)
    assert perfect.estimate == perfect.high == 1.0 and 0.999 < perfect.low < 1.0
    assert perfect.reaches(1.0)  # nothing missed: no larger setting can show more
    spread = recall_interval(np.r_[np.full(50, 9), np.full(950, 10)], np.full(1000, 10), 0.95)
    clumped = recall_interval(np.r_[np.full(10, 5), np.full(990, 10)], np.full(1000, 10), 0.95)
    assert spread.estimate == clumped.estimate == 0.995
    assert clumped.low < spread.low and clumped.effective_queries < spread.effective_queries
    assert not clumped.reaches(0.995) and clumped.reaches(clumped.low)
    # fewer neighbours than k (a tiny index): only the true ones count
    hits, trials = query_hits(np.array([[3, 4, -1]]), np.array([[4, -1, -1]]), 3)
    assert hits.tolist() == [1] and trials.tolist() == [1]


def test_nn_distance_estimate_extrapolates_from_a_sample():
    data = clustered(32_000, 32, clusters=60, latent=12, seed=4)
    probes, rows = data[:500], data[500:]
    exact = nn_distance_estimate(probes, rows, len(rows))["nn_distance"]
    est = nn_distance_estimate(probes, rows[:4000], len(rows))
    assert est["sample_rows"] == 4000 and est["log_slope"] < 0
    assert est["nn_distance_in_sample"] > 1.1 * exact  # a sample is sparser ...
    assert est["nn_distance"] == pytest.approx(exact, rel=0.05)  # ... and the extrapolation corrects it


def test_tuning_queries_config_key():
    from pipelines.config import ConfigError, load_config

    assert load_config(None).index.tuning_queries is None
    assert load_config(None, ["index.tuning_queries=s3://b/q.parquet"]).index.tuning_queries == "s3://b/q.parquet"
    with pytest.raises(ConfigError, match="index.tuning_queries"):
        load_config(None, ["index.tuning_queries=queries.csv"])


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """20,000 x 48 clustered vectors in results files."""
    folder = tmp_path_factory.mktemp("spread")
    vecs = clustered(20_000, 48, clusters=100, latent=16, seed=11)
    write_results(folder / "results", vecs, files=2, row_group=5000)
    return folder, vecs


@pytest.mark.parametrize("factory", ["IVF256,Flat", "HNSW16"])
def test_recall_target_holds_for_queries_unlike_the_data(spread, tmp_path, ray_cluster, factory):
    """Queries that are noisy copies of stored rows (noise 2.5 times the rows' spacing) are harder
    than the rows: tuned by the mean recall of unperturbed rows of the data, these indexes take
    nprobe=20 / efSearch=32 and reach 0.989 / 0.986 on them; tuned on perturbed rows by the lower
    bound, they reach 0.995."""
    folder, vecs = spread
    meta = build_index(str(folder / "results"), str(tmp_path / "index"), factory=factory, target_recall=0.995,
                       progress=False)
    assert meta["target_reached"] and meta["tuning"]["query_source"]["source"] == "perturbed_held_out"
    chosen = meta["tuning"]["recall@10"]
    assert chosen["low"] >= 0.995 and chosen["queries"] == 1000
    measured = exact_recall(tmp_path / "index", vecs, noisy_copies(vecs, 2000, 2.5, seed=21))
    assert measured >= 0.995 - 0.002, (measured, meta["search_params"])


def test_tuning_queries_file_is_used(spread, tmp_path, ray_cluster):
    """``index.tuning_queries``: the build tunes on the file's queries and records them; the interval
    it records holds the recall measured on fresh queries of the same kind."""
    folder, vecs = spread
    kind = partial(noisy_copies, vecs, noise=3.0)  # harder than the default perturbation
    queries = kind(1500, seed=31)
    path = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"image_embedding": pa.array(list(queries), type=pa.list_(pa.float32(), 48)),
                             "text": pa.array(["q"] * len(queries))}), path)
    meta = build_index(str(folder / "results"), str(tmp_path / "index"), factory="IVF256,Flat", target_recall=0.99,
                       tuning_query_file=str(path), progress=False)
    source = meta["tuning"]["query_source"]
    assert source == {"source": "file", "path": str(path), "rows_in_file": 1500}
    chosen = meta["tuning"]["recall@10"]
    assert meta["tuning"]["queries"] == chosen["queries"] == 1000  # at most 1000 of the file's queries
    assert chosen["low"] <= chosen["estimate"] <= chosen["high"] and chosen["low"] >= 0.99
    measured = exact_recall(tmp_path / "index", vecs, kind(2000, seed=32))
    assert chosen["low"] <= measured <= chosen["high"], (measured, chosen)
    plan = json.loads((tmp_path / "index" / "_build" / "plan.json").read_text())
    assert plan["tuning"]["source"] == "file" and plan["tuning"]["file"]["size"] == path.stat().st_size
    # the default build tunes on easier queries: a faster setting, which falls short on these
    default = build_index(str(folder / "results"), str(tmp_path / "default"), factory="IVF256,Flat",
                          target_recall=0.99, progress=False)
    nprobe = lambda m: int(m["search_params"].split("=")[1])  # noqa: E731
    assert nprobe(default) < nprobe(meta)
    assert exact_recall(tmp_path / "default", vecs, kind(2000, seed=32)) < 0.99


@pytest.fixture(scope="module")
def demo_embeddings():
    """Image embeddings of 1000 generated shape pictures and text embeddings of 500 captions of
    others, from the bundled demo model: outside queries of another modality."""
    from clip_core.encoders import load_encoder
    from pipelines.demo.sample_data import COLORS, SHAPES, caption, draw, sample_spec

    encoder = load_encoder(str(REPO / "clip_core" / "assets" / "demo-model.safetensors"), backend="torch",
                           precision="fp32", device="cpu", num_threads=1)
    pixels, captions = [], []
    for i in range(1500):
        rng = np.random.default_rng([9, i])
        spec = sample_spec(rng, SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))])
        if i < 1000:
            pixels.append(encoder.preprocess(draw(spec, 64, rng)))
        else:
            captions.append(caption(rng, spec))
    return encoder.encode_images(np.stack(pixels)), encoder.encode_texts(captions)


def test_demo_text_queries_against_image_embeddings(demo_embeddings, tmp_path, ray_cluster):
    """Texts searching images sit much further from them than images from each other (the
    modality gap): noise does not make held-out images into text queries, a sample of texts does."""
    images, texts = demo_embeddings
    write_results(tmp_path / "results", images, files=1, row_group=1000)
    np.save(tmp_path / "texts.npy", texts[:250])
    kw = dict(factory="IVF16,Flat", target_recall=0.95, progress=False)
    tuned = build_index(str(tmp_path / "results"), str(tmp_path / "texts"),
                        tuning_query_file=str(tmp_path / "texts.npy"), **kw)
    assert tuned["tuning"]["query_source"]["source"] == "file" and tuned["tuning"]["queries"] == 250
    assert exact_recall(tmp_path / "texts", images, texts[250:]) >= 0.95 - 0.002
    default = build_index(str(tmp_path / "results"), str(tmp_path / "default"), **kw)
    assert default["target_reached"]  # on perturbed images: reached with fewer lists ...
    assert int(default["search_params"][7:]) < int(tuned["search_params"][7:])
    assert exact_recall(tmp_path / "default", images, texts[250:]) < 0.95  # ... that texts need more of


# ----------------------------------------------------------------------------- recall ---

@pytest.mark.e2e
def test_auto_index_recall_100k_x_512(tmp_path, ray_cluster):
    """The auto-selected index reaches recall@10 >= 0.95 against exact search on unseen queries."""
    data = clustered(101_000, 512, clusters=200, latent=48, seed=7)
    base, queries = data[:100_000], data[100_000:]
    write_results(tmp_path / "results", base, files=4, row_group=10_000)
    meta = build_index(str(tmp_path / "results"), str(tmp_path / "index"), memory_budget_gb=4.0,
                       target_recall=0.95, progress=False)
    assert meta["factory"] == "HNSW32" and meta["target_reached"]
    idx = open_index(str(tmp_path / "index"))
    _, ids = idx.search(queries, 10)
    names = np.array([f"img-{i:06d}" for i in range(100_000)])
    r = recall(ids, names[exact_topk(base, queries, 10)])
    assert r >= 0.95, (r, meta["search_params"])


# --------------------------------------------------------------------------------- S3 ---

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_results_to_s3_index(small, tmp_path, s3_endpoint, ray_cluster, monkeypatch):
    import boto3

    folder, vecs = small
    s3 = S3Options(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing", region="us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="bucket")
    for path in sorted((folder / "results").glob("*.parquet")):
        client.upload_file(str(path), "bucket", f"job/results/{path.name}")
    np.save(tmp_path / "queries.npy", noisy_copies(vecs, 300, 2.0, seed=5))
    client.upload_file(str(tmp_path / "queries.npy"), "bucket", "job/queries.npy")
    monkeypatch.setenv("CLIP_ETL_CACHE_DIR", str(tmp_path / "cache"))
    meta = build_index("s3://bucket/job/results", "s3://bucket/job/index", factory="IVF32,Flat", shards=2,
                       merge=True, s3=s3, progress=False, tuning_queries=200,
                       tuning_query_file="s3://bucket/job/queries.npy")
    assert meta["tuning"]["query_source"] == {"source": "file", "path": "s3://bucket/job/queries.npy",
                                              "rows_in_file": 300}
    assert meta["tuning"]["queries"] == 200  # tuning_queries caps the file's queries too
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="job/index/")["Contents"]}
    assert {"job/index/index.json", "job/index/shard-00000.faiss", "job/index/shard-00001.ids.parquet",
            "job/index/shard-queries.faiss", "job/index/_build/tuning_queries.parquet",
            "job/index/merged.faiss"} <= keys
    assert not any(k.rsplit("/", 1)[-1].startswith(".tmp") for k in keys)
    idx = open_index("s3://bucket/job", s3=s3)  # the job output root works too
    assert idx.ntotal == meta["count"] == 5940
    local = build_index(str(folder / "results"), str(tmp_path / "local"), factory="IVF32,Flat", shards=2,
                        progress=False, tuning_queries=200, tuning_query_file=str(tmp_path / "queries.npy"))
    assert local["search_params"] == meta["search_params"]
    ref = open_index(str(tmp_path / "local"))
    sa, ia = idx.search(vecs[::40], 10)
    sb, ib = ref.search(vecs[::40], 10)
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    assert (ia == ib).mean() > 0.99
    s, i = idx.search_by_id("img-000100", 1)  # vector read back from the S3 results
    assert i[0] == "img-000100"


# -------------------------------------------------------------------------------- CLI ---

@pytest.fixture(scope="module")
def built(small, tmp_path_factory, ray_cluster):
    folder, vecs = small
    out = tmp_path_factory.mktemp("built") / "index"
    build_index(str(folder / "results"), str(out), factory="Flat", progress=False,
                model_info={"name": "fake-model.pt", "fingerprint": "f00"})
    return out, vecs


def _search(argv: list[str], capsys) -> tuple[int, str]:
    from pipelines.index.search_cli import add_search_arguments, run_search

    parser = argparse.ArgumentParser()
    add_search_arguments(parser)
    code = run_search(parser.parse_args(argv))
    return code, capsys.readouterr().out


def test_cli_id_and_vector_json_with_metadata(built, tmp_path, capsys):
    out, vecs = built
    code, text = _search([str(out), "--id", "img-000043", "-k", "3", "--json"], capsys)
    hits = [json.loads(line) for line in text.strip().splitlines()]
    assert code == 0 and len(hits) == 3
    assert hits[0]["id"] == "img-000043" and abs(hits[0]["score"] - 1) < 1e-4
    assert hits[0]["label"] == "dog" and hits[0]["caption"] == "a photo number 43"
    assert hits[0]["image"] == "/data/img-000043.jpg"
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    np.save(tmp_path / "q.npy", vecs[44])
    code, text = _search([str(out), "--vector", str(tmp_path / "q.npy"), "-k", "2"], capsys)
    assert code == 0
    lines = text.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "id", "score"] and "img-000044" in lines[1]


def test_cli_text_and_image_use_recorded_model(built, tmp_path, capsys, monkeypatch):
    """--text/--image encode with the model named in index.json (a fake encoder stands in)."""
    import types

    out, vecs = built
    seen: dict = {}

    class FakeEncoder:
        def encode_texts(self, texts):
            seen["texts"] = list(texts)
            return vecs[[8]]

        def preprocess(self, image):
            seen["image_size"] = image.size
            return np.zeros((3, 4, 4), np.float32)

        def encode_images(self, pixels):
            seen["pixels"] = np.asarray(pixels).shape
            return vecs[[9]]

    def load_encoder(source, backend="torch", **kw):
        seen["source"] = source
        return FakeEncoder()

    fake = types.ModuleType("clip_core.encoders")
    fake.load_encoder = load_encoder
    monkeypatch.setitem(sys.modules, "clip_core.encoders", fake)
    code, text = _search([str(out), "--text", "a photo of a dog", "-k", "1", "--json"], capsys)
    assert code == 0 and json.loads(text)["id"] == "img-000008"
    assert seen["source"] == "fake-model.pt" and seen["texts"] == ["a photo of a dog"]

    from PIL import Image

    Image.new("RGB", (10, 6), "red").save(tmp_path / "q.png")
    code, text = _search([str(out), "--image", str(tmp_path / "q.png"), "-k", "1", "--json", "--model", "other.pt"],
                         capsys)
    assert code == 0 and json.loads(text)["id"] == "img-000009"
    assert seen["source"] == "other.pt" and seen["image_size"] == (10, 6) and seen["pixels"] == (1, 3, 4, 4)


def test_index_json_without_tuning_interval_still_opens(built, tmp_path):
    """An index built before tuning recorded its query source and interval opens and searches alike."""
    import shutil

    out, vecs = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "index.json").read_text())
    meta["format"] = "clip-etl-index/2"
    for key in ("query_source", "recall@10"):
        del meta["tuning"][key]
    for trial in meta["tuning"]["trials"]:
        del trial["recall@10_low"], trial["recall@10_high"]
    (old / "index.json").write_text(json.dumps(meta))
    _, ids = open_index(str(old)).search(vecs[1:6], 3)  # row 0 is a failed row
    assert ids[:, 0].tolist() == [f"img-{i:06d}" for i in range(1, 6)]
    assert open_index(str(old)).meta["recall"] == meta["recall"]


def test_cli_through_entrypoint(built):
    out, _ = built
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "search", str(out), "--id", "img-000005",
                           "-k", "2", "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["id"] == "img-000005"
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "search", str(out), "--id", "nope"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
                         cwd=str(REPO))
    assert bad.returncode == 1 and "not in the index" in bad.stderr

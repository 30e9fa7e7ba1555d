"""Semantic dedup: the grouping and representative logic on small vectors, the Ray job on
synthetic results (blocked = unblocked, unjudged rows, re-runs), and the issue's precision/recall
test on generated near-duplicate images embedded by the real pipeline."""

from __future__ import annotations

import io
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import S3_KEYS, run_cli, s3_client, s3_read_parquet, write_manifest
from pipelines.config import ConfigError, DedupConfig, load_config
from pipelines.curation.dedup import DEDUP_DIR, SUMMARY_FILE, WORK_PREFIX, auto_clusters, dedup_results, plan_units
from pipelines.curation.dedup_groups import choose_representatives, link_duplicates, merge_links
from pipelines.etl.job import run_job
from pipelines.storage import S3Options


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted(n_distinct: int, copies: int, d: int = 32, noise: float = 0.08, seed: int = 0):
    """Distinct unit vectors, the first ``copies`` of them each with a noisy copy; shuffled."""
    rng = np.random.default_rng(seed)
    base = _unit(n_distinct, d, seed)
    dup = base[:copies] + noise * rng.standard_normal((copies, d)).astype(np.float32) / np.sqrt(d)
    x = np.concatenate([base, dup / np.linalg.norm(dup, axis=1, keepdims=True)])
    source = np.concatenate([np.arange(n_distinct), np.arange(copies)])
    perm = rng.permutation(len(x))
    return np.ascontiguousarray(x[perm]), source[perm]


def _components_bfs(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    adj: dict[int, list[int]] = {i: [] for i in range(n)}
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    labels = np.full(n, -1)
    for s in range(n):
        if labels[s] < 0:
            stack, labels[s] = [s], s
            while stack:
                for w in adj[stack.pop()]:
                    if labels[w] < 0:
                        labels[w] = s
                        stack.append(w)
    return labels


# ------------------------------------------------------------------ grouping logic ---

def test_merge_links_matches_a_graph_search():
    rng = np.random.default_rng(3)
    n = 300
    edges = [tuple(e) for e in rng.integers(0, n, (250, 2))]
    labels = merge_links(np.arange(n), np.array([u for u, _ in edges]), np.array([v for _, v in edges]))
    assert np.array_equal(labels, _components_bfs(n, edges))  # root = smallest row of each component
    more = [tuple(e) for e in rng.integers(0, n, (40, 2))]
    labels = merge_links(labels, np.array([u for u, _ in more]), np.array([v for _, v in more]))
    assert np.array_equal(labels, _components_bfs(n, edges + more))  # links may arrive in any batches


def test_blocked_pairs_give_the_unblocked_groups():
    x, _ = _planted(400, 120, d=16, noise=0.3)
    n, threshold = len(x), 0.9
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    ii, jj = np.nonzero(sim >= threshold)
    expected = _components_bfs(n, list(zip(ii.tolist(), jj.tolist())))
    assert len(set(expected.tolist())) < n - 50  # the test has real groups
    for block_rows in (n, 64, 37, 2):
        labels, best = link_duplicates(n, lambda j: x[j * block_rows:(j + 1) * block_rows], block_rows, threshold)
        assert np.array_equal(labels, expected), block_rows
        np.testing.assert_allclose(best, sim.max(axis=1), atol=1e-5)


def test_representative_is_nearest_to_the_centroid_then_smallest_id():
    labels = np.array([0, 0, 0, 3, 3, 5])
    centroid_sim = np.array([0.5, 0.9, 0.7, 0.8, 0.8, 0.1], np.float32)
    ids = np.array(["c", "a", "b", "z", "y", "q"])
    groups = choose_representatives(labels, centroid_sim, ids)
    assert groups.representative.tolist() == [1, 1, 1, 4, 4, 5]  # tie 3/4 -> id "y" < "z"
    assert groups.size.tolist() == [3, 3, 3, 2, 2, 1]
    assert groups.keep.tolist() == [False, True, False, False, True, True]


def test_units_pack_small_clusters_and_isolate_large_ones():
    counts = np.array([4, 3, 0, 5, 20, 2, 2, 9])  # [unjudged, cluster 0..6]
    units = plan_units(counts, block_rows=8)
    assert [(u.first, u.last, u.rows) for u in units] == [(-1, -1, 4), (0, 2, 8), (3, 3, 20), (4, 5, 4), (6, 6, 9)]
    assert [u.number for u in units] == list(range(len(units)))
    assert sum(u.rows for u in units) == counts.sum()


def test_auto_clusters_and_config_checks():
    assert auto_clusters(1_000_000) == 1000 and auto_clusters(100) == 2 and auto_clusters(5) == 1
    assert load_config(overrides=["dedup.enabled=true"]).dedup.enabled
    for bad in ("dedup.threshold=1.5", "dedup.threshold=0", "dedup.block_rows=1", "dedup.clusters=0",
                "dedup.embedding_column=caption", "dedup.sample_rows=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(overrides=[bad])


def test_rows_are_not_clustered_when_there_are_no_centroids():
    import faiss

    from pipelines.curation.dedup import DedupPlan, _assigned_batch

    x = _unit(4, 8)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8, mask=pa.array([False, False, True, False]))
    batch = pa.record_batch({"id": ["a", "b", "c", "d"], "image_embedding": emb,
                             "status": ["ok", "error", "ok", "ok"]})
    plan = DedupPlan([], 8, DedupConfig(), "unused", None, columns=["id", "image_embedding", "status"])
    rows = _assigned_batch(plan, faiss.IndexFlatIP(8), 10, batch).sort_by("row")
    assert rows.column("row").to_pylist() == [10, 11, 12, 13] and set(rows.column("cluster").to_pylist()) == {-1}
    assert rows.column("reason").to_pylist() == ["not_clustered", "status_not_ok", "no_embedding", "not_clustered"]
    index = faiss.IndexFlatIP(8)
    index.add(x[[0, 3]])
    rows = _assigned_batch(plan, index, 0, batch).sort_by("row")
    assert rows.column("cluster").to_pylist() == [0, -1, -1, 1] and rows.column("reason").to_pylist()[0] is None


# ---------------------------------------------------------------- the job on Ray ---

def _write_results(folder: Path, x: np.ndarray, per_file: int = 250) -> list[str]:
    """Pipeline-shaped results parts; row 3 is an error row, row 5 has a null embedding."""
    folder.mkdir(parents=True)
    ids = [f"row-{i:05d}" for i in range(len(x))]
    for f, lo in enumerate(range(0, len(x), per_file)):
        hi = min(len(x), lo + per_file)
        missing = np.array([i in (3, 5) for i in range(lo, hi)])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].reshape(-1)), x.shape[1], mask=pa.array(missing))
        status = ["error" if i == 3 else "ok" for i in range(lo, hi)]
        pq.write_table(pa.table({"id": ids[lo:hi], "image_embedding": emb, "status": status}),
                       folder / f"part-{f:05d}.parquet", row_group_size=100)
    return ids


def read_dedup(output: Path) -> pa.Table:
    parts = sorted((output / DEDUP_DIR).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("id")


def _check_decisions(table: pa.Table) -> None:
    """Every group keeps exactly one row, and each dropped row points at its group's kept row."""
    rows = table.to_pylist()
    by_id = {r["id"]: r for r in rows}
    groups: dict[int, list[dict]] = {}
    for r in rows:
        if r["keep"] is not None:
            groups.setdefault(r["group"], []).append(r)
    for members in groups.values():
        kept = [m for m in members if m["keep"]]
        assert len(kept) == 1
        for m in members:
            assert m["duplicate_of"] == (None if m["keep"] else kept[0]["id"])
            assert by_id[kept[0]["id"]]["cluster"] == m["cluster"]


@pytest.mark.e2e
def test_dedup_job_blocked_unjudged_and_rerun(ray_local, tmp_path):
    x, source = _planted(900, 200, d=32)
    ids = _write_results(tmp_path / "results", x)
    settings = DedupConfig(threshold=0.9, clusters=4)
    summary = dedup_results(str(tmp_path), settings, log=lambda m: None)
    table = read_dedup(tmp_path)
    assert table.column("id").to_pylist() == sorted(ids)  # one row per results row, nothing else
    unjudged = {r["id"]: r for r in table.to_pylist() if r["keep"] is None}
    assert {k: v["reason"] for k, v in unjudged.items()} == {"row-00003": "status_not_ok", "row-00005": "no_embedding"}
    assert all(v["cluster"] is None and v["group"] is None for v in unjudged.values())
    _check_decisions(table)
    assert summary["counts"]["rows"] == len(ids) and summary["counts"]["unjudged"] == 2
    assert summary["counts"]["duplicates"] == int((~pc_fill(table.column("keep"))).sum())
    assert json.loads((tmp_path / DEDUP_DIR / SUMMARY_FILE).read_text())["counts"] == summary["counts"]

    # a cluster far larger than a block: same decisions, streamed in blocks of 16 rows
    small_blocks = DedupConfig(threshold=0.9, clusters=4, block_rows=16)
    assert dedup_results(str(tmp_path), small_blocks, log=lambda m: None)["counts"]["largest_cluster"] > 16
    blocked = read_dedup(tmp_path)
    for column in ("id", "cluster", "group", "duplicate_of", "keep", "reason"):
        assert blocked.column(column).equals(table.column(column)), column
    np.testing.assert_allclose(np.array(blocked.column("max_similarity").to_pylist(), dtype=float),
                               np.array(table.column("max_similarity").to_pylist(), dtype=float), atol=1e-5)

    # a re-run replaced the whole output (no stale parts, no work files) and is deterministic
    assert sorted(p.name for p in (tmp_path / DEDUP_DIR).iterdir()) == sorted(
        [SUMMARY_FILE] + [f"part-{i:05d}.parquet" for i in range(len(list((tmp_path / DEDUP_DIR).glob("part-*"))))])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(WORK_PREFIX) or ".old-" in p.name]
    # the same decisions; similarities to float32 rounding, as OpenBLAS's sums depend on its thread count
    dedup_results(str(tmp_path), settings, log=lambda m: None)
    again = read_dedup(tmp_path)
    assert again.drop_columns(["max_similarity"]).equals(table.drop_columns(["max_similarity"]))
    np.testing.assert_allclose(np.array(again.column("max_similarity").to_pylist(), dtype=float),
                               np.array(table.column("max_similarity").to_pylist(), dtype=float), atol=1e-6)


@pytest.mark.e2e
def test_dedup_on_s3_replaces_the_whole_output(ray_local, s3_server, tmp_path):
    client = s3_client(s3_server)
    client.create_bucket(Bucket="dedup")
    x, _ = _planted(300, 60, d=16)
    _write_results(tmp_path / "results", x, per_file=120)
    for part in sorted((tmp_path / "results").iterdir()):
        client.put_object(Bucket="dedup", Key=f"out/results/{part.name}", Body=part.read_bytes())
    s3 = S3Options(endpoint_url=s3_server, **S3_KEYS)
    settings = DedupConfig(threshold=0.9, clusters=3)
    dedup_results(str(tmp_path), settings, log=lambda m: None)
    client.put_object(Bucket="dedup", Key="out/dedup/part-99999.parquet", Body=b"stale")  # an earlier output's
    summary = dedup_results("s3://dedup/out", settings, s3=s3, log=lambda m: None)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="dedup", Prefix="out/")["Contents"]]
    parts = sorted(k for k in keys if k.startswith("out/dedup/part-"))
    assert sorted(k for k in keys if not k.startswith("out/results/")) == sorted(parts + ["out/dedup/dedup.json"])
    assert "out/dedup/part-99999.parquet" not in parts and summary["counts"]["rows"] == len(x)
    table = pa.concat_tables([s3_read_parquet(client, "dedup", k) for k in parts]).sort_by("id")
    assert table.equals(read_dedup(tmp_path))  # the same decisions as from a local output


def pc_fill(column: pa.ChunkedArray) -> np.ndarray:
    """``keep`` with unjudged rows counted as kept, as a bool array."""
    return np.array([True if v is None else v for v in column.to_pylist()])


# ------------------------------------------------- near-duplicate images, end to end ---

DISTINCT, WITH_COPIES = 40, 20


def near_duplicates(img):
    """Resized, JPEG-recompressed, cropped and slightly recoloured copies of ``img``."""
    from PIL import Image

    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=40)
    dx, dy = int(w * 0.06), int(h * 0.06)
    shifted = np.clip(np.asarray(img, np.int16) + np.array([12, -6, 8]), 0, 255).astype(np.uint8)
    return [img.resize((w // 2, h // 2), Image.BICUBIC), Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            img.crop((dx, dy, w - dx, h - dy)), Image.fromarray(shifted)]


def distinct_image(i: int):
    """One of the demo model's shape images, a different shape x colour class for each ``i``."""
    from pipelines.demo.sample_data import COLORS, SHAPES, draw, sample_spec

    rng = np.random.default_rng(2000 + i)
    return draw(sample_spec(rng, SHAPES[i % len(SHAPES)], COLORS[(i // len(SHAPES)) % len(COLORS)]), 128, rng)


@pytest.fixture(scope="module")
def embedded_near_duplicates(tmp_path_factory, ray_local):
    """One `clip-etl run` (demo model, dedup on) over distinct images and their near-duplicates."""
    root = tmp_path_factory.mktemp("near-dups")
    paths, source = [], []
    for i in range(DISTINCT):
        img = distinct_image(i)
        copies = near_duplicates(img) if i < WITH_COPIES else []
        for k, im in enumerate([img, *copies]):
            p = root / "images" / f"img{i:03d}-{k}.png"
            p.parent.mkdir(exist_ok=True)
            im.save(p)
            paths.append(str(p))
            source.append(i)
    manifest = write_manifest(root / "manifest.parquet", {"id": [Path(p).stem for p in paths], "image": paths})
    out = root / "out"
    cfg = load_config(overrides=[f"input.path={manifest}", f"output.path={out}", "model.checkpoint=demo",
                                 "model.backend=torch", "model.precision=fp32", "label.enabled=false",
                                 "caption.enabled=false", "index.enabled=false", "dedup.enabled=true",
                                 "output.shard_size=50"])
    record = run_job(cfg, "run", log=lambda m: None)
    assert record["counts"]["ok"] == len(paths)
    return out, dict(zip([Path(p).stem for p in paths], source))


def _pairs(groups: dict[str, object]) -> set[tuple[str, str]]:
    members: dict[object, list[str]] = {}
    for key, g in groups.items():
        members.setdefault(g, []).append(key)
    return {tuple(sorted(p)) for m in members.values() for p in combinations(m, 2)}


@pytest.mark.e2e
def test_near_duplicate_pairs_found_at_the_default_threshold(embedded_near_duplicates, ray_local):
    out, source = embedded_near_duplicates
    run_table = read_dedup(out)
    record = json.loads((out / "_run.json").read_text())
    assert record["dedup"]["counts"]["rows"] == len(source) and record["dedup"]["threshold"] == DedupConfig().threshold
    done = run_job(load_config(overrides=[f"output.path={out}"]), "dedup", log=lambda m: None)  # `clip-etl dedup`
    assert done["dedup"]["counts"] == record["dedup"]["counts"]
    table = read_dedup(out)
    assert table.equals(run_table)  # same input, same output, in another process
    assert sorted(table.column("id").to_pylist()) == sorted(source)
    assert all(k is not None for k in table.column("keep").to_pylist())
    _check_decisions(table)
    found = _pairs({r["id"]: r["group"] for r in table.to_pylist()})
    truth = _pairs(source)
    assert len(truth) == WITH_COPIES * 10
    true_found = len(found & truth)
    precision, recall = true_found / max(1, len(found)), true_found / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, len(found), len(truth))


def test_dedup_command_line(tmp_path):
    out = tmp_path / "nothing"
    proc = run_cli(["dedup", str(out), "dedup.threshold=0.8", "--print-config"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["output"]["path"] == str(out) and printed["dedup"]["threshold"] == 0.8  # OUTPUT sets output.path
    proc = run_cli(["dedup", str(out)], timeout=60)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no results to deduplicate" in lines[0], proc.stderr

"""Semantic dedup (``pipelines.curation.dedup``) against exact all-pairs search, same vectors, same run.

The baseline is what dedup means without k-means: every pair of rows at or above the threshold,
found by a FAISS flat inner-product range search over all rows (the queries in blocks, so only
the index of all vectors and one block's hits are resident), grouped into connected components
by the same union-find. Both run in a fresh interpreter with the same CPUs, so their wall time
and peak memory are measured alike (peak: the process's ``VmHWM`` minus its size after imports,
plus the peak of its children, i.e. Ray's workers, sampled every 50 ms; see benchmarks/index.py).

Data: clustered unit vectors (``benchmarks/index.py``'s generator, like CLIP embeddings many
modes in a low-dimensional subspace; ``--mixture`` of them, default 1000), and planted
near-duplicate groups: a share of the rows gets 1-4 copies moved off by noise to a cosine of
about 0.94-0.99 to their source. With few, dense modes (``--mixture 200`` at 100k rows) distinct
rows come within the threshold of each other and chain planted groups into large components.

Agreement of the duplicate groups: every pair of rows that share a group (a group of ``g`` rows
gives ``g (g - 1) / 2`` pairs) is a *duplicate pair*; precision, recall and F1 of our duplicate
pairs against the exact ones, and the share of the exact groups we reproduce member for member.
The exact pairs whose two rows k-means put into different clusters are what SemDeDup misses by
design; they are counted (``straddling``).

    python benchmarks/dedup.py                 # ~105k x 512
    python benchmarks/dedup.py --n 20000       # a smaller size
    python benchmarks/dedup.py --quick         # a smoke test in well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import textwrap
from itertools import combinations
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.parquet as pq  # noqa: E402

from index import clustered, run_measured, write_inputs  # noqa: E402  (benchmarks/index.py)
from pipelines.config import DedupConfig  # noqa: E402


def planted(n: int, d: int, *, mixture: int = 1000, share: float = 0.06, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` rows: distinct clustered vectors plus 1-4 near copies of ``share`` of them,
    shuffled; returns the vectors and each row's source (the planted truth)."""
    rng = np.random.default_rng(seed)
    sources_n = int(n * share / (1 + 2.5 * share))
    base = clustered(n - int(sources_n * 2.5), d, clusters=mixture, seed=seed)
    picked = rng.choice(len(base), sources_n, replace=False)
    copies = np.repeat(picked, rng.integers(1, 5, sources_n))
    sigma = rng.uniform(0.15, 0.35, len(copies)).astype(np.float32)[:, None]  # cosine ~ 1 / sqrt(1 + sigma^2)
    noisy = base[copies] + sigma * rng.standard_normal((len(copies), d)).astype(np.float32) / np.sqrt(d)
    x = np.concatenate([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    source = np.concatenate([np.arange(len(base)), copies])
    perm = rng.permutation(len(x))
    return np.ascontiguousarray(x[perm]), source[perm]


MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
    def report(seconds, base, **extra):
        peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
        print(json.dumps({"seconds": seconds, "rss_after_imports": base, "vm_hwm": peak, **extra}))
""")

OURS_SCRIPT = MEASURE + textwrap.dedent("""
    from pipelines.config import DedupConfig, RayConfig
    from pipelines.curation.dedup import dedup_results
    out, threshold, cpus = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    base = rss()
    t = time.perf_counter()
    summary = dedup_results(out, DedupConfig(threshold=threshold), ray_config=RayConfig(num_cpus=cpus))
    report(time.perf_counter() - t, base, summary=summary)
""")

EXACT_SCRIPT = MEASURE + textwrap.dedent("""
    import faiss, numpy as np
    from pipelines.curation.dedup_groups import merge_links
    npy, threshold, block, labels_out, cpus = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    faiss.omp_set_num_threads(cpus)
    base = rss()
    t = time.perf_counter()
    x = np.load(npy)  # all vectors resident: the flat index is made of them
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    labels = np.arange(len(x), dtype=np.int64)
    for lo in range(0, len(x), block):
        lims, _, hits = index.range_search(x[lo:lo + block], threshold)
        query = np.repeat(np.arange(lo, min(len(x), lo + block)), np.diff(lims.astype(np.int64)))
        other = hits != query
        labels = merge_links(labels, query[other], hits[other])
    np.save(labels_out, labels)
    report(time.perf_counter() - t, base)
""")


def duplicate_pairs(groups: np.ndarray) -> set[tuple[int, int]]:
    """Every pair of row numbers that share a group."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    return {pair for lo, hi in zip(starts, ends) if hi - lo > 1
            for pair in combinations(sorted(order[lo:hi].tolist()), 2)}


def agreement(ours: set, exact: set) -> dict[str, float]:
    both = len(ours & exact)
    p, r = both / max(1, len(ours)), both / max(1, len(exact))
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(1e-12, p + r)}


def same_groups_share(ours: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact groups (2+ rows) whose members are exactly one of our groups."""
    def sets(labels: np.ndarray) -> set[frozenset]:
        out: dict[int, list[int]] = {}
        for row, g in enumerate(labels.tolist()):
            out.setdefault(g, []).append(row)
        return {frozenset(m) for m in out.values() if len(m) > 1}
    exact_sets = sets(exact)
    return len(exact_sets & sets(ours)) / max(1, len(exact_sets))


def read_ours(output: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Our groups and clusters by row number (ids are row numbers in write_inputs' layout)."""
    groups, clusters = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    for part in sorted((output / "dedup").glob("part-*.parquet")):
        t = pq.read_table(part, columns=["id", "group", "cluster"])
        rows = np.array(t.column("id").to_pylist(), dtype=np.int64)
        groups[rows] = np.array(t.column("group").to_pylist(), dtype=np.int64)
        clusters[rows] = np.array(t.column("cluster").to_pylist(), dtype=np.int64)
    return groups, clusters


def compare(x_rows: int, ours: np.ndarray, clusters: np.ndarray, exact: np.ndarray, source: np.ndarray) -> dict:
    exact_pairs, our_pairs = duplicate_pairs(exact), duplicate_pairs(ours)
    straddling = sum(clusters[u] != clusters[v] for u, v in exact_pairs)
    truth = duplicate_pairs(source)
    return {"rows": x_rows, "exact_pairs": len(exact_pairs), "our_pairs": len(our_pairs),
            "agreement": agreement(our_pairs, exact_pairs), "groups_identical": same_groups_share(ours, exact),
            "straddling_pairs": int(straddling), "straddling_share": straddling / max(1, len(exact_pairs)),
            "planted_truth": {"ours": agreement(our_pairs, truth), "exact": agreement(exact_pairs, truth)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=105_000, help="rows (distinct + planted copies)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="5000 rows: a smoke test")
    ap.add_argument("--threshold", type=float, default=DedupConfig().threshold)
    ap.add_argument("--mixture", type=int, default=1000,
                    help="components of the data's Gaussian mixture; fewer = denser modes, where distinct rows "
                         "come within the threshold of each other and chain groups together")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for both sides")
    ap.add_argument("--block", type=int, default=4096, help="query block of the exact search")
    ap.add_argument("--data-dir", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    n = 5000 if args.quick else args.n
    work = args.data_dir or Path(tempfile.mkdtemp(prefix="clip-etl-dedup-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    x, source = planted(n, args.dim, mixture=args.mixture)
    out = work / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    npy_dir, _ = write_inputs(x, out)  # results/ for ours, npy/emb.npy for the baseline
    print(f"{len(x)} x {args.dim} vectors, threshold {args.threshold}, {args.cpus} CPUs, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    ours = run_measured(OURS_SCRIPT, str(out), repr(args.threshold), str(args.cpus), what="our dedup")
    labels = work / "exact_labels.npy"
    exact = run_measured(EXACT_SCRIPT, str(npy_dir / "emb.npy"), repr(args.threshold), str(args.block), str(labels),
                         str(args.cpus), what="exact search")
    groups, clusters = read_ours(out, len(x))
    figures = compare(len(x), groups, clusters, np.load(labels), source)
    counts = ours["summary"]["counts"]
    ray_s = ours["summary"]["timings"].get("ray_start_s", 0.0)
    doc = {"rows": len(x), "dim": args.dim, "mixture": args.mixture, "threshold": args.threshold, "cpus": args.cpus,
           "load_1min": os.getloadavg()[0], "machine": platform.processor() or platform.machine(),
           "ours": {"seconds": ours["seconds"], "peak_bytes": ours["peak_bytes"], "clusters": counts["clusters"],
                    "largest_cluster": counts["largest_cluster"], "timings": ours["summary"]["timings"]},
           "exact": {"seconds": exact["seconds"], "peak_bytes": exact["peak_bytes"]},
           "speedup_exact/ours": exact["seconds"] / ours["seconds"],
           "speedup_exact/ours_after_ray_start": exact["seconds"] / max(1e-9, ours["seconds"] - ray_s), **figures}
    a = figures["agreement"]
    print(f"ours : {ours['seconds']:8.1f}s  peak {ours['peak_bytes'] / 2**20:7.0f} MiB  ({counts['clusters']} clusters, "
          f"largest {counts['largest_cluster']}; {ray_s:.1f}s of it starting Ray)")
    print(f"exact: {exact['seconds']:8.1f}s  peak {exact['peak_bytes'] / 2**20:7.0f} MiB")
    print(f"ratio exact/ours time {doc['speedup_exact/ours']:.2f}x ({doc['speedup_exact/ours_after_ray_start']:.2f}x "
          f"after Ray's start); duplicate pairs: ours {figures['our_pairs']}, "
          f"exact {figures['exact_pairs']}; agreement precision {a['precision']:.4f} recall {a['recall']:.4f} "
          f"F1 {a['f1']:.4f}; exact groups reproduced {figures['groups_identical']:.4f}; straddling pairs "
          f"{figures['straddling_pairs']} ({figures['straddling_share']:.4%})")
    print(f"planted truth: ours F1 {figures['planted_truth']['ours']['f1']:.4f}, "
          f"exact F1 {figures['planted_truth']['exact']['f1']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Index build and search: ``pipelines.index.build`` against ``autofaiss.build_index``, same vectors.

Why this baseline: autofaiss is what people use to "just build a good FAISS index" from CLIP
embeddings, and its index choice is the one ours imitates. The comparison is at equal recall:
autofaiss runs first with the memory budget, and we take the recall@10 its tuned index reaches on
the test queries; ours then runs with ``target_recall`` set to that value and the same budget.
Both builds run in a fresh interpreter (autofaiss in its own environment, ours in this one) so
their wall time and peak memory are measured alike; both indexes are then searched by the same
code in this process: recall@10 against exact search on the test queries, queries/s of batched
search, and one-query latency. The test queries are noisy copies of stored rows (``--query-noise``),
the way a caption or another photo differs from the image it retrieves; neither build sees them.

autofaiss pins old numpy/pyarrow, so it lives in its own virtual environment and runs in a
subprocess on the same ``.npy`` file::

    python -m venv /tmp/autofaiss-venv
    /tmp/autofaiss-venv/bin/pip install autofaiss "pyarrow<18"   # pyarrow>=18 needs numpy 2

    python benchmarks/index.py                                   # 100k x 512, 4 GiB budget
    python benchmarks/index.py --budgets 4,0.01                  # also a compressed (PQ) index
    python benchmarks/index.py --n 20000 --d 128 --quick         # a smoke test in a minute

Peak memory is the build process's peak resident set size (``VmHWM``) minus its size after
imports, plus the peak of its children (Ray workers, if any; sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.index import open_index  # noqa: E402

DEFAULT_AUTOFAISS_PYTHON = "/tmp/autofaiss-venv/bin/python"


# ------------------------------------------------------------------------------- data ---

def clustered(n: int, d: int, *, clusters: int = 200, latent: int = 48, seed: int = 7) -> np.ndarray:
    """Normalized vectors from a Gaussian mixture in a low-dimensional space mapped to ``d`` dims.

    Real CLIP embeddings have far fewer degrees of freedom than dimensions and form clusters
    (subjects, styles); this keeps both properties, unlike uniform random vectors.
    """
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


def noisy_copies(base: np.ndarray, n: int, noise: float, seed: int = 3) -> np.ndarray:
    """Queries unlike the stored vectors, the way a caption or another photo of a subject differs
    from the image it should retrieve: ``n`` stored rows plus isotropic noise of norm ``noise``
    times the data's median nearest-neighbour distance, re-normalized (as in tests/test_index.py)."""
    rng = np.random.default_rng(seed)
    probes = base[rng.choice(len(base), min(1000, len(base)), replace=False)]
    scores, _ = faiss.knn(probes, base, 2, metric=faiss.METRIC_INNER_PRODUCT)
    spacing = float(np.median(np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores[:, 1]))))
    src = base[rng.choice(len(base), n, replace=False)]
    q = src + noise * spacing / np.sqrt(base.shape[1]) * rng.standard_normal(src.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def write_inputs(base: np.ndarray, folder: Path) -> tuple[Path, Path]:
    """The same vectors as ``.npy`` (for autofaiss) and as pipeline-shaped results Parquet (ours)."""
    npy_dir = folder / "npy"
    npy_dir.mkdir(parents=True)
    np.save(npy_dir / "emb.npy", base)
    results = folder / "results"
    results.mkdir()
    n, d = base.shape
    per_file = 25_000
    for i, lo in enumerate(range(0, n, per_file)):
        hi = min(n, lo + per_file)
        table = pa.table({
            "id": pa.array([str(j) for j in range(lo, hi)]),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(base[lo:hi].reshape(-1)), d),
            "status": pa.array(["ok"] * (hi - lo)),
        })
        pq.write_table(table, results / f"part-{i:05d}.parquet", row_group_size=8192)
    return npy_dir, results


# ---------------------------------------------------------------------------- memory ---

def _tree_rss(root: int, include_root: bool = True) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            pid, ppid = int(entry), int(fields[1])
            rss[pid] = int(fields[21]) * page
            children.setdefault(ppid, []).append(pid)
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        if pid != root or include_root:
            total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the resident size of a process's children (Ray workers...) in a thread.

    The process itself reports its own peak (``VmHWM``): sampling it from outside would catch the
    moment after ``fork`` when it still maps all of the parent's memory.
    """

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(self.pid, include_root=False))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -------------------------------------------------------------------------- measuring ---

def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10].tolist()) & set(t[:10].tolist())) / 10 for f, t in zip(found, truth)]))


def measure(searchers: dict, queries: np.ndarray, truth: np.ndarray, rounds: int = 5,
            latency_queries: int = 300) -> dict[str, dict[str, float]]:
    """recall@10, batched queries/s (all threads) and one-query latency of each ``search(q, k) -> ids``.

    Candidates are timed interleaved -- one batch of each per round, median over rounds; each
    latency query on every candidate in turn -- so load from other processes on the machine
    hits all of them alike.
    """
    out = {name: {"recall@10": recall_at_10(fn(queries, 10), truth)} for name, fn in searchers.items()}
    qps: dict[str, list[float]] = {name: [] for name in searchers}
    for _ in range(rounds):
        for name, fn in searchers.items():
            t = time.perf_counter()
            fn(queries, 10)
            qps[name].append(len(queries) / (time.perf_counter() - t))
    lat: dict[str, list[float]] = {name: [] for name in searchers}
    for q in queries[:latency_queries]:
        for name, fn in searchers.items():
            t = time.perf_counter()
            fn(q[None, :], 10)
            lat[name].append((time.perf_counter() - t) * 1000)
    for name in searchers:
        out[name].update(qps=float(np.median(qps[name])), latency_ms_mean=float(np.mean(lat[name])),
                         latency_ms_p99=float(np.percentile(lat[name], 99)))
    return out


# -------------------------------------------------------------------------- autofaiss ---

AUTOFAISS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import autofaiss, faiss
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
    npy_dir, out_dir, budget, cores = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    base = rss()
    t = time.perf_counter()
    autofaiss.build_index(embeddings=npy_dir, index_path=out_dir + "/knn.index",
                          index_infos_path=out_dir + "/infos.json", file_format="npy",
                          max_index_memory_usage=budget, current_memory_available="16G",
                          metric_type="ip", nb_cores=cores, verbose=40)
    seconds = time.perf_counter() - t
    # VmHWM: the peak of this process image (ru_maxrss would carry the forking parent's size over exec)
    peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
    print(json.dumps({"build_s": seconds, "rss_after_imports": base, "vm_hwm": peak,
                      "autofaiss": getattr(autofaiss, "__version__", "?"), "faiss": faiss.__version__}))
""")


OURS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    from pipelines.index.build import build_index
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
    results, out_dir, budget, target = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    base = rss()
    t = time.perf_counter()
    meta = build_index(results, out_dir, memory_budget_gb=budget, target_recall=target, progress=True)
    seconds = time.perf_counter() - t
    # VmHWM: the peak of this process image (ru_maxrss would carry the forking parent's size over exec)
    peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
    print(json.dumps({"build_s": seconds, "rss_after_imports": base, "vm_hwm": peak, "meta": meta}))
""")


def run_measured(script: str, *args: str, what: str) -> dict:
    """``script`` in a fresh interpreter of this environment; the JSON report it prints last (with
    ``vm_hwm`` and ``rss_after_imports``) plus ``peak_bytes``: its own peak above its size after
    imports, plus its children's peak."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=None, text=True,
                            env=env)
    with PeakMemory(proc.pid) as mem:
        stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode})")
    report = json.loads(stdout.strip().splitlines()[-1])
    report["peak_bytes"] = report["vm_hwm"] - report["rss_after_imports"] + mem.peak
    return report


def run_ours(results: Path, out_dir: Path, budget_gb: float, target: float) -> dict:
    """Our build in a fresh interpreter of this environment, measured like autofaiss's."""
    shutil.rmtree(out_dir, ignore_errors=True)
    return run_measured(OURS_SCRIPT, str(results), str(out_dir), str(budget_gb), repr(min(1.0, target)),
                        what="our build")


def run_autofaiss(python: str, npy_dir: Path, out_dir: Path, budget_gb: float, cores: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = f"{int(budget_gb * 1024)}M"
    proc = subprocess.Popen([python, "-c", AUTOFAISS_SCRIPT, str(npy_dir), str(out_dir), budget, str(cores)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as mem:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"autofaiss failed ({proc.returncode}):\n{stderr[-3000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    infos = json.loads((out_dir / "infos.json").read_text())
    report["peak_bytes"] = report["vm_hwm"] - report["rss_after_imports"] + mem.peak
    report["index_key"] = infos.get("index_key")
    report["index_param"] = infos.get("index_param")
    report["infos"] = infos
    return report


def retune(index, index_key: str, queries: np.ndarray, truth: np.ndarray, target: float) -> str | None:
    """The fastest nprobe/efSearch with which autofaiss's own index reaches ``target`` on *these* queries.

    An oracle for the baseline (tuned on the evaluation queries themselves, which no real build
    can do): it separates what our index build gains from what recall-targeted tuning gains.
    """
    from pipelines.index.select import search_parameter_grid

    for params in (g for g in search_parameter_grid(index_key, index.d) if g):
        faiss.ParameterSpace().set_index_parameters(index, params)
        if recall_at_10(index.search(queries, 10)[1], truth) >= target:
            return params
    return None


def as_positions(ids: np.ndarray) -> np.ndarray:
    """Our id strings (the row numbers written to Parquet) back to ints; "" (no hit) -> -1."""
    flat = [int(x) if x else -1 for x in ids.reshape(-1)]
    return np.asarray(flat, dtype=np.int64).reshape(ids.shape)


# ------------------------------------------------------------------------------- main ---

def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['recall@10']:.4f} | {r['qps']:.0f} | {r['latency_ms_mean']:.2f} / {r['latency_ms_p99']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    ap.add_argument("--d", type=int, default=512, help="dimension")
    ap.add_argument("--queries", type=int, default=1000, help="test queries for recall and speed")
    ap.add_argument("--query-noise", type=float, default=2.5,
                    help="queries are noisy copies of stored rows, noise this many times the rows' spacing "
                         "(0: fresh draws from the same mixture, which are as easy as the rows themselves)")
    ap.add_argument("--budgets", default="4", help="comma-separated memory budgets in GiB (one comparison each)")
    ap.add_argument("--autofaiss-python", default=DEFAULT_AUTOFAISS_PYTHON)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="short timing loops (smoke test)")
    ap.add_argument("--json-out", help="also write the results as JSON here")
    ap.add_argument("--workdir", help="keep inputs and indexes here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="index-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    data = clustered(args.n + args.queries, args.d)
    base, queries = data[: args.n], data[args.n:]
    if args.query_noise > 0:
        queries = noisy_copies(base, args.queries, args.query_noise)
    _, truth = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    npy_dir, results = write_inputs(base, work / "data")
    have_autofaiss = os.path.exists(args.autofaiss_python)
    if not have_autofaiss:
        print(f"autofaiss python {args.autofaiss_python} not found: measuring ours only", file=sys.stderr)

    report = {"n": args.n, "d": args.d, "queries": args.queries, "query_noise": args.query_noise, "threads": args.threads,
              "cpus": os.cpu_count(), "faiss": faiss.__version__, "runs": []}
    table = ["| build | index | search params | build s | peak MiB | recall@10 | queries/s | latency ms mean / p99 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    rounds = 2 if args.quick else 5
    for budget in [float(b) for b in args.budgets.split(",")]:
        load_before = os.getloadavg()[0]
        run: dict = {"budget_gb": budget}
        searchers: dict = {}
        rows: dict = {}
        target = 0.95
        if have_autofaiss:
            print(f"[bench] autofaiss, budget {budget} GiB ...", file=sys.stderr)
            af = run_autofaiss(args.autofaiss_python, npy_dir, work / f"autofaiss-{budget}", budget, args.threads)
            af_index = faiss.read_index(str(work / f"autofaiss-{budget}" / "knn.index"))
            if af["index_param"]:
                faiss.ParameterSpace().set_index_parameters(af_index, af["index_param"])
            run["autofaiss_infos"] = af.pop("infos")
            af.update(index=af["index_key"], params=af["index_param"] or "-")
            target = recall_at_10(af_index.search(queries, 10)[1], truth)  # what ours is asked to reach
            searchers["autofaiss"] = lambda q, k, i=af_index: i.search(q, k)[1]
            rows["autofaiss"] = af
        print(f"[bench] ours, budget {budget} GiB, target_recall {target:.4f} ...", file=sys.stderr)
        built = run_ours(results, work / f"ours-{budget}", budget, target)
        meta = built["meta"]
        rows["ours"] = {"build_s": built["build_s"], "peak_bytes": built["peak_bytes"], "index": meta["factory"],
                        "params": meta["search_params"] or "-", "tuned_recall@10": meta["recall"]["10"],
                        "target_reached": meta["target_reached"], "timings": meta.get("timings"),
                        "tuned_interval": meta.get("tuning", {}).get("recall@10")}
        idx = open_index(str(work / f"ours-{budget}"))
        searchers["ours"] = lambda q, k, i=idx: as_positions(i.search(q, k)[1])
        if have_autofaiss:
            oracle_index = faiss.read_index(str(work / f"autofaiss-{budget}" / "knn.index"))
            params = retune(oracle_index, af["index_key"], queries, truth, target)
            if params:
                searchers["retuned"] = lambda q, k, i=oracle_index: i.search(q, k)[1]
                rows["retuned"] = {**{k: af[k] for k in ("build_s", "peak_bytes", "index")}, "params": params}
        print(f"[bench] measuring {', '.join(searchers)} interleaved ...", file=sys.stderr)
        for name, result in measure(searchers, queries, truth, rounds).items():
            rows[name].update(result)
        labels = {"autofaiss": f"autofaiss {budget:g} GiB", "ours": f"ours {budget:g} GiB",
                  "retuned": f"autofaiss {budget:g} GiB, nprobe/efSearch re-tuned on the test queries (oracle)"}
        for name in ("autofaiss", "ours", "retuned"):
            if name in rows:
                run[name] = rows[name]
                table.append(row(labels[name], rows[name]))
        if have_autofaiss:
            a, o = rows["autofaiss"], rows["ours"]
            run["ratios"] = {"qps": o["qps"] / a["qps"], "build_s": o["build_s"] / a["build_s"],
                             "peak_bytes": o["peak_bytes"] / max(a["peak_bytes"], 1),
                             "recall@10": o["recall@10"] - a["recall@10"]}
            if "retuned" in rows:
                run["ratios"]["qps_vs_retuned"] = o["qps"] / rows["retuned"]["qps"]
        run["load_average"] = [load_before, os.getloadavg()[0]]
        report["runs"].append(run)

    print("\n" + "\n".join(table))
    for run in report["runs"]:
        if "ratios" in run:
            r = run["ratios"]
            oracle = (f"x{r['qps_vs_retuned']:.2f}" if "qps_vs_retuned" in r
                      else "n/a (no setting of its search grid reaches the target on these queries)")
            print(f"budget {run['budget_gb']:g} GiB: ours/autofaiss queries/s x{r['qps']:.2f}, build time "
                  f"x{r['build_s']:.2f}, peak memory x{r['peak_bytes']:.2f}, recall@10 {r['recall@10']:+.4f}, "
                  f"queries/s vs re-tuned autofaiss {oracle} "
                  f"(load average {run['load_average'][0]:.1f} -> {run['load_average'][1]:.1f})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

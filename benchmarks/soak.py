"""Memory of the whole job over a long run: does anything grow with the rows processed?

Runs the real job, ``clip-etl run``, in its own process with its own embedded Ray on the workload
of ``benchmarks/scale.py`` (the 32-px ``tiny-test`` CLIP, a few hundred 32x32 PNGs referenced
cyclically, a text per row, labels and captions on, index off), and samples, every
``--interval`` seconds, every process of the job: the driver and all its descendants (Ray's
GCS, raylet, dashboard and every worker). Two modes:

    python benchmarks/soak.py                        # one 100k-row run: a timeline
    python benchmarks/soak.py --sizes 2000,20000     # peak memory of two sizes, and their ratio

Memory is the sum over those processes of PSS (``/proc/<pid>/smaps_rollup``, proportional set
size: a page shared by k processes counts 1/k in each, so shared libraries and Ray's
shared-memory object store are counted once, not once per process that maps them). The sum of
RSS, which counts shared pages again in every process, is printed beside it for reference. The
OS's figures, not Ray's own accounting. Rows over time are the committed part files
(``OUTPUT/results/part-*.parquet``) times the shard size.

The baseline of each run is itself: while rows flow (from the first committed shard to the last
sample before every row is committed), the timeline prints memory at the first commit against the last sample
and the peak, and rows/s of the first and last quarters, as ratios; ``--sizes``
prints the peak of the largest size over the smallest's (the product's target: < 1.30).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (the same workload builders as the driver-scaling benchmark)

REPO = scale.REPO
TARGET_RATIO = 1.30


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
            ppid = int(raw[raw.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant alive now."""
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _memory_kb(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) of one process in kB, from smaps_rollup; None when it is gone."""
    pss = rss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        return None
    return (pss, rss) if pss is not None and rss is not None else None


class TreeSampler(threading.Thread):
    """Samples the job's process tree: a timeline of (elapsed s, PSS MB, RSS MB, processes, rows)."""

    def __init__(self, root: int, results_dir: Path, shard_size: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.results_dir, self.shard_size, self.interval = root, results_dir, shard_size, interval
        self.timeline: list[dict] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def _rows_committed(self) -> int:
        try:
            return sum(n.startswith("part-") and n.endswith(".parquet") for n in os.listdir(self.results_dir)) \
                * self.shard_size
        except OSError:
            return 0

    def sample(self) -> dict:
        pss = rss = procs = 0
        for pid in process_tree(self.root):
            mem = _memory_kb(pid)
            if mem is not None:
                pss, rss, procs = pss + mem[0], rss + mem[1], procs + 1
        return {"t": time.perf_counter() - self._t0, "pss_mb": pss / 1024, "rss_mb": rss / 1024,
                "processes": procs, "rows": self._rows_committed()}

    def run(self) -> None:
        while not self._halt.is_set():
            s = self.sample()
            if s["processes"]:
                self.timeline.append(s)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()

    @property
    def peak_pss_mb(self) -> float:
        return max((s["pss_mb"] for s in self.timeline), default=0.0)


def run_job(n: int, work: Path, checkpoint: str, images: list[str], args) -> dict:
    """One ``clip-etl run`` of ``n`` rows, its process tree sampled until it exits."""
    run_dir = work / f"n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    manifest, out = run_dir / "manifest.parquet", run_dir / "out"
    scale.build_manifest(manifest, n, images, with_text=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths
    overrides = [f"input.path={manifest}", f"output.path={out}", f"output.shard_size={args.shard_size}",
                 "index.enabled=false", f"model.checkpoint={checkpoint}", "model.backend=torch",
                 "model.precision=fp32", *args.override]
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--quiet", *overrides]
    print(f"[soak] N={n:,}: clip-etl run {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    rc, sampler = scale.run_sampled(cmd, run_dir / "job.log", ray_tmp,
                                    lambda pid: TreeSampler(pid, out / "results", args.shard_size, args.interval),
                                    lambda proc: proc.wait(timeout=args.timeout))
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (run_dir / "job.log").read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"[soak] N={n}: job failed (rc={rc}):\n" + "\n".join(tail))
    record = json.loads((out / "_run.json").read_text())
    if record["counts"]["rows_out"] != n:
        raise SystemExit(f"[soak] N={n}: the job wrote {record['counts']['rows_out']} rows, expected {n}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": n, "wall_s": wall, "rows_per_s": n / wall, "peak_pss_mb": sampler.peak_pss_mb,
            "peak_rss_sum_mb": max((s["rss_mb"] for s in sampler.timeline), default=0.0),
            "max_processes": max((s["processes"] for s in sampler.timeline), default=0),
            "timeline": sampler.timeline, "timings": record["timings"]}


def print_timeline(r: dict, every: int) -> dict:
    """The timeline (one line every ``every`` samples) and the run's drift ratios.

    Drift is measured while rows flow, from the first committed shard to the last sample before
    every row is committed: start-up (Ray, the model load) and shutdown are neither growth nor
    shrinkage."""
    tl = r["timeline"]
    print(f"\n{'elapsed s':>9} | {'rows committed':>14} | {'job PSS MB':>10} | {'sum of RSS MB':>13} | processes")
    for s in tl[::every] + ([tl[-1]] if (len(tl) - 1) % every else []):
        print(f"{s['t']:>9.0f} | {s['rows']:>14,} | {s['pss_mb']:>10.0f} | {s['rss_mb']:>13.0f} | {s['processes']:>9}")
    flowing = [s for s in tl if 0 < s["rows"] < r["rows"]] or tl
    first, last = flowing[0], flowing[-1]
    peak = max(s["pss_mb"] for s in flowing)
    drift = {"pss_first_commit_mb": first["pss_mb"], "pss_last_mb": last["pss_mb"], "pss_peak_flowing_mb": peak,
             "pss_peak_mb": r["peak_pss_mb"], "last_over_first": last["pss_mb"] / first["pss_mb"],
             "peak_over_first": peak / first["pss_mb"]}
    q1 = next((s for s in flowing if s["rows"] - first["rows"] >= (last["rows"] - first["rows"]) / 4), None)
    q3 = next((s for s in flowing if s["rows"] - first["rows"] >= 3 * (last["rows"] - first["rows"]) / 4), None)
    if q1 and q3 and q1["t"] > first["t"] and last["t"] > q3["t"]:
        first_q = (q1["rows"] - first["rows"]) / (q1["t"] - first["t"])
        last_q = (last["rows"] - q3["rows"]) / (last["t"] - q3["t"])
        drift.update(rows_per_s_first_quarter=first_q, rows_per_s_last_quarter=last_q,
                     last_over_first_quarter=last_q / first_q)
    print(f"\njob PSS while rows flow: {first['pss_mb']:.0f} MB at the first commit ({first['t']:.0f} s), "
          f"{last['pss_mb']:.0f} MB at the last sample before the end ({drift['last_over_first']:.2f}x), "
          f"peak {peak:.0f} MB ({drift['peak_over_first']:.2f}x); peak of the whole run {r['peak_pss_mb']:.0f} MB")
    if "last_over_first_quarter" in drift:
        print(f"rows/s while rows flow: first quarter {drift['rows_per_s_first_quarter']:,.0f}, last quarter "
              f"{drift['rows_per_s_last_quarter']:,.0f} ({drift['last_over_first_quarter']:.2f}x)")
    print(f"{r['rows']:,} rows in {r['wall_s']:.0f} s: {r['rows_per_s']:,.0f} rows/s start to exit, "
          f"{r['timings'].get('rows_per_s', 0):,.0f} in the processing loop")
    return drift


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows of the timeline run (default 100000)")
    p.add_argument("--sizes", type=scale.parse_sizes, help="instead: peak memory of these sizes (e.g. 2000,20000)")
    p.add_argument("--shard-size", type=int, default=2_000, help="output.shard_size (default 2000)")
    p.add_argument("--images", type=int, default=256, help="distinct generated 32x32 PNGs (default 256)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--override", action="append", default=[], metavar="section.key=value")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per job before it is killed")
    p.add_argument("--keep", action="store_true", help="keep each run's OUTPUT folder")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)

    from clip_core.encoders import cpu_info, describe_flags

    cpu = cpu_info()
    print(f"[soak] cpu: {cpu['model']}, {cpu['cpus']} CPUs; {describe_flags(cpu)}; "
          f"load {os.getloadavg()[0]:.2f}; git {scale.git_rev()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="clip-etl-soak-"))
    try:
        checkpoint, _ = scale.build_checkpoint(work)
        images = scale.build_images(work / "images", args.images)
        doc: dict = {"cpu": cpu, "args": vars(args), "load_before": os.getloadavg()}
        if args.sizes:
            doc["runs"] = [run_job(n, work, checkpoint, images, args) for n in args.sizes]
            lo, hi = doc["runs"][0], doc["runs"][-1]
            doc["ratio"] = hi["peak_pss_mb"] / lo["peak_pss_mb"]
            for r in doc["runs"]:
                print(f"N={r['rows']:>9,}: peak job PSS {r['peak_pss_mb']:7.0f} MB (sum of RSS {r['peak_rss_sum_mb']:.0f} "
                      f"MB, {r['max_processes']} processes), {r['rows_per_s']:,.0f} rows/s, {r['wall_s']:.0f} s")
            print(f"ratio of peak job PSS {hi['rows']:,}/{lo['rows']:,} rows: {doc['ratio']:.2f}x "
                  f"(target < {TARGET_RATIO:.2f}: {'met' if doc['ratio'] < TARGET_RATIO else 'NOT met'})")
        else:
            r = run_job(args.rows, work, checkpoint, images, args)
            doc["runs"] = [r]
            doc["drift"] = print_timeline(r, every=max(1, len(r["timeline"]) // 30))
        doc["load_after"] = os.getloadavg()
        print(f"[soak] load average before {doc['load_before'][0]:.2f}, after {doc['load_after'][0]:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Driver scaling of ``clip-etl run``: does the driver's memory and CPU grow with the row count?

Each size runs the real job, ``clip-etl run`` (``pipelines.cli.main``), in its own fresh process
with its own embedded local Ray, on a generated workload: a tiny CLIP checkpoint (the 32-px
``tiny-test`` config, seeded random weights), a few hundred distinct 32x32 PNGs referenced
cyclically by a manifest of N rows with distinct ids and a short text per row. Labels and
captions run with their defaults, the index is off. For every size the script prints one row:

    size | wall s | rows/s | driver peak RSS MB | driver CPU s | object-store B/row

and the 200k/20k (largest/smallest) ratios of driver peak RSS and driver CPU seconds. The target
for a driver that no longer handles result rows is both ratios flat within 20% (<= 1.20).

How each figure is measured (nothing is hard-coded; everything printed comes from this run):

* wall s: wall clock of the job process, start to exit (imports, manifest checks, model load on
  the driver, Ray start and stop included). rows/s = N / wall s; the job's own rows/s over its
  processing loop (``_run.json`` timings) is printed in the details.
* driver peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` of the job process itself, read inside
  that process (a thin shim around ``pipelines.cli.main``, see ``--_driver``) when ``cli.main``
  has returned (the interpreter teardown after it frees memory, it does not add). RUSAGE_SELF counts only the driver: Ray's raylet, GCS and worker processes are other
  processes and are never included. This peak counts every resident page, including pages of
  Ray's shared-memory object store that the driver mapped and touched (zero-copy reads of result
  blocks); a sampler in this script polls ``/proc/<driver pid>/status`` every 0.2 s for the
  split (peak RssAnon = the driver's own heap, peak RssShmem = object-store pages), printed in
  the details.
* driver CPU s: utime + stime of the driver process from ``/proc/<pid>/stat``, read after it
  exited and before it is reaped (``waitid(WNOWAIT)``): every thread of the driver, interpreter
  teardown included, no child process (Ray's processes are children of the driver, but their
  times are in the separate cutime/cstime fields, not read). The shim's RUSAGE_SELF figure at
  the moment ``cli.main`` returned is printed in the details as a cross-check, and a sampled
  split by thread (``/proc/<pid>/task/*``; the main thread is ``<main>``).
* object-store B/row: Ray Data's own per-operator statistics, the object behind ``ds.stats()``:
  the shim wraps Ray Data's ``StreamingExecutor.shutdown`` in the driver so that, when any
  dataset execution finishes, its frozen stats summary is kept; the script sums "output size
  bytes" (the size of the blocks each operator produced) over every operator of every dataset
  the job executed, and divides by N. Fused operators do not store intermediate blocks, so this
  is what went through the object store (blocks under Ray's inline limit live in the owner's
  memory store instead; here they are all larger). The per-operator split is printed in the
  details, next to the expected decode payload per row (float32 pixels 3xRxR + int64 tokens).
  If a future Ray lacks that method the shim falls back to ``DataContext.enable_auto_log_stats``
  and the logged summary, which holds the last operator of each dataset only (and says so).

Nothing in ``pipelines/`` is patched or needs a hook: the shim only wraps that Ray Data method in
its own process before calling ``pipelines.cli.main``, so the script works on any version of the
job that runs its Ray Data executions from the driver process (iter_batches, write_*, materialize
alike).

    python benchmarks/scale.py                   # 20,000 and 200,000 rows
    python benchmarks/scale.py --quick           # 2,000 and 8,000 rows: a smoke run
    python benchmarks/scale.py --sizes 20000,50000 --shard-size 4000

The job imports ``pipelines``/``clip_core`` from the checkout this file lives in (its parent
folder is put first on the job's ``PYTHONPATH``, which Ray's workers inherit); the imported path
is printed, so a baseline checkout (``git worktree add /tmp/scale-baseline HEAD``) measures
exactly its own code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (20_000, 200_000)
QUICK_SIZES = (2_000, 8_000)
TARGET_RATIO = 1.20
STATS_LOGGER = "ray.data._internal.execution.streaming_executor"

WORDS = ("red green blue yellow purple orange small large round square striped dotted bright dark "
         "cat dog car tree house boat bird flower cup chair lamp shoe").split()


# --------------------------------------------------------------------------------------------
# The driver shim: runs inside the job process
# --------------------------------------------------------------------------------------------
def _summary_operators(summary, dataset: int) -> list[dict]:
    """Every operator of a Ray Data ``DatasetStatsSummary``, parents first."""
    ops: list[dict] = []
    for parent in getattr(summary, "parents", None) or []:
        ops.extend(_summary_operators(parent, dataset))
    for op in getattr(summary, "operators_stats", None) or []:
        rows, size = getattr(op, "output_num_rows", None), getattr(op, "output_size_bytes", None)
        ops.append({"dataset": dataset, "operator": str(op.operator_name),
                    "rows": int(rows.sum) if rows is not None else None,
                    "bytes": int(size.sum) if size is not None else None})
    return ops


def install_stats_capture(texts: list[str], operators: list[dict]) -> str:
    """Collect Ray Data's final per-operator stats of every dataset this process executes.

    Preferred: wrap ``StreamingExecutor.shutdown`` (where Ray Data freezes a finished execution's
    stats, the object behind ``ds.stats()``) and walk the summary's operators. Fallback: turn on
    ``DataContext.enable_auto_log_stats`` and keep the logged summaries (that text shows only
    the last operator of each dataset). Returns which one is active.
    """
    import logging

    try:
        from ray.data._internal.execution import streaming_executor as se

        cls = se.StreamingExecutor
        original = cls.shutdown

        def shutdown(self, *a, **k):
            try:
                return original(self, *a, **k)
            finally:
                stats = getattr(self, "_final_stats", None)
                if stats is not None and not getattr(self, "_scale_bench_seen", False):
                    try:
                        self._scale_bench_seen = True
                        summary = stats.to_summary()
                        k_ = len(texts)
                        texts.append(summary.to_string(include_parent=True))
                        operators.extend(_summary_operators(summary, k_))
                    except Exception as e:  # never fail the job for a benchmark
                        texts.append(f"stats capture failed: {type(e).__name__}: {e}")

        cls.shutdown = shutdown
        return "StreamingExecutor.shutdown"
    except Exception as e:
        print(f"[scale] cannot wrap StreamingExecutor.shutdown ({type(e).__name__}: {e}); "
              "falling back to the auto-logged stats", file=sys.stderr)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_auto_log_stats = True

        class _Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    msg = record.getMessage()
                except Exception:
                    return
                if "Output size bytes per block" in msg or "Output num rows per block" in msg:
                    texts.append(msg)

        lg = logging.getLogger(STATS_LOGGER)
        lg.addHandler(_Grab(level=logging.INFO))
        if not lg.isEnabledFor(logging.INFO):
            lg.setLevel(logging.INFO)
        return "enable_auto_log_stats (last operator only)"
    except Exception as e:
        print(f"[scale] Ray Data stats capture unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return "none"


def run_driver(record_path: str, argv: list[str]) -> int:
    """``clip-etl <argv>`` in this process; write this process's own usage and the Ray Data
    stats it logged to ``record_path``."""
    import resource

    t0 = time.time()
    stats_texts: list[str] = []
    operators: list[dict] = []
    how = install_stats_capture(stats_texts, operators)

    from pipelines import cli

    import pipelines

    rc = 1
    try:
        rc = int(cli.main(argv) or 0)
    finally:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        record = {
            "rc": rc,
            "pid": os.getpid(),
            "pipelines_file": pipelines.__file__,
            "maxrss_kb": ru.ru_maxrss,  # Linux: KiB
            "utime_s": ru.ru_utime,
            "stime_s": ru.ru_stime,
            "wall_in_process_s": time.time() - t0,
            "stats_capture": how,
            "stats_texts": stats_texts,
            "operators": operators,
        }
        with open(record_path, "w") as f:
            json.dump(record, f)
    return rc


# --------------------------------------------------------------------------------------------
# Parsing Ray Data's stats text (the ds.stats() format)
# --------------------------------------------------------------------------------------------
_OP_RE = re.compile(r"^\s*Operator\s+(\d+)\s+(.+?):\s", re.M)
_ROWS_RE = re.compile(r"Output num rows per block:.*?(\d+)\s+total")
_BYTES_RE = re.compile(r"Output size bytes per block:.*?(\d+)\s+total")


def parse_stats(texts: list[str]) -> list[dict]:
    """[{dataset, operator, rows, bytes}] for every operator section of every summary."""
    ops = []
    for k, text in enumerate(texts):
        heads = list(_OP_RE.finditer(text))
        for i, m in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            section = text[m.end():end]
            rows = _ROWS_RE.search(section)
            size = _BYTES_RE.search(section)
            if rows or size:
                ops.append({"dataset": k, "operator": m.group(2).strip(),
                            "rows": int(rows.group(1)) if rows else None,
                            "bytes": int(size.group(1)) if size else None})
    return ops


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, resolution: int = 32) -> tuple[str, dict]:
    """The ``tiny-test`` CLIP, at another input resolution when asked (patches of R/4 pixels, so
    the model stays as cheap while the pixels crossing the object store grow as at real sizes)."""
    import torch

    from clip_core import CLIPConfig, create_model
    from clip_core.checkpoints import save_model

    torch.manual_seed(0)
    path = folder / "tiny.safetensors"
    cfg = json.loads((REPO / "clip_core" / "model_configs" / "tiny-test.json").read_text())
    cfg["vision"].update(image_size=resolution, patch_size=resolution // 4)
    save_model(create_model(CLIPConfig.from_dict(cfg)), path)
    return str(path), cfg


def build_images(folder: Path, n: int, size: int = 32) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        y0, x0 = rng.integers(0, size // 2, 2)
        arr[y0:y0 + size // 2, x0:x0 + size // 2] = rng.integers(0, 256, 3)
        p = folder / f"img_{i:04d}.png"
        Image.fromarray(arr, "RGB").save(p, format="PNG")
        paths.append(str(p))
    return paths


def build_manifest(path: Path, n: int, images: list[str], with_text: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"a {WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} {WORDS[(i * 13 + 5) % len(WORDS)]} "
             f"number {i}" for i in range(997)]
    cols = {
        "id": pa.array([f"row-{i:08d}" for i in range(n)]),
        "image": pa.array([images[i % len(images)] for i in range(n)]),
    }
    if with_text:
        cols["text"] = pa.array([texts[i % len(texts)] for i in range(n)])
    pq.write_table(pa.table(cols), path)


# --------------------------------------------------------------------------------------------
# One measured run
# --------------------------------------------------------------------------------------------
class ProcSampler(threading.Thread):
    """Polls one process: peaks of its /proc/<pid>/status memory fields (kB), and the CPU ticks
    of each of its threads (/proc/<pid>/task/*/stat; the last value seen per thread)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {k: 0 for k in self.FIELDS}
        self.samples = 0
        self.threads: dict[int, tuple[str, int]] = {}  # tid -> (name, utime+stime ticks)
        self._halt = threading.Event()

    def _sample_threads(self) -> None:
        base = f"/proc/{self.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/stat") as f:
                    raw = f.read()
                name = raw[raw.index("(") + 1:raw.rindex(")")]
                fields = raw[raw.rindex(")") + 2:].split()
                self.threads[int(tid)] = (name, int(fields[11]) + int(fields[12]))
            except (OSError, ValueError, IndexError):
                pass

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self._halt.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        key, _, rest = line.partition(":")
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(rest.split()[0]))
                self._sample_threads()
                self.samples += 1
            except (OSError, ValueError, IndexError):
                pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds per thread name (the main thread as "<main>"), largest first. Threads are
        sampled, so a thread's last interval before it ended is missing."""
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for tid, (name, ticks) in self.threads.items():
            key = "<main>" if tid == self.pid else name
            out[key] = out.get(key, 0.0) + ticks / tick
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _stat_cpu(pid: int) -> tuple[float, float] | None:
    """(utime, stime) seconds of process ``pid`` itself, all its threads, no children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
        fields = raw[raw.rindex(")") + 2:].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, ValueError, IndexError):
        return None


def wait_exited(proc: subprocess.Popen, timeout: float) -> tuple[float, float] | None:
    """Wait until ``proc`` has exited but leave it unreaped (a zombie still has its own CPU
    times in /proc, children excluded), read them, and return them; None on timeout (killed).
    The caller reaps it with ``proc.wait()``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            info = True
        if info is not None:
            return _stat_cpu(proc.pid) or (float("nan"), float("nan"))
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return None
        time.sleep(0.05)


class JobFailed(RuntimeError):
    pass


def run_size_retrying(n: int, work: Path, checkpoint: str, images: list[str], args) -> dict:
    """:func:`run_size`, again after a failed attempt (``--retries``): on a shared machine another
    user's ``ray stop --force`` kills every local Ray, this job's embedded one included."""
    failures = []
    for attempt in range(args.retries + 1):
        try:
            r = run_size(n, work, checkpoint, images, args)
            r["failed_attempts"] = failures
            return r
        except JobFailed as e:
            failures.append(str(e))
            log = work / f"n{n}" / "job.log"
            if log.exists():
                shutil.copy(log, work / f"n{n}.attempt{attempt + 1}.log")
            print(f"[scale] {e}", flush=True)
            if attempt < args.retries:
                print(f"[scale] N={n:,}: retrying ({attempt + 1}/{args.retries}); the failed log is kept as "
                      f"{work / f'n{n}.attempt{attempt + 1}.log'}", flush=True)
    raise SystemExit(f"[scale] N={n}: failed {len(failures)} time(s); giving up")


def job_env(ray_tmp: Path) -> dict[str, str]:
    """The environment of a benchmarked job: its own embedded Ray, never another local cluster's
    (``RAY_ADDRESS``, ``ray_current_cluster``), and this checkout's code first on the path."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = str(ray_tmp)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_sampled(cmd: list[str], log_path: Path, ray_tmp: Path, make_sampler, wait):
    """Run the job ``cmd`` (output to ``log_path``, its own Ray under ``ray_tmp``) with the sampler
    thread ``make_sampler(pid)`` on it; returns ``(wait(proc), sampler)``. A job still running
    when waiting ends (timeout, Ctrl-C) is killed, and its Ray folder is removed either way."""
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=str(REPO), env=job_env(ray_tmp), stdout=log, stderr=subprocess.STDOUT)
            sampler = make_sampler(proc.pid)
            sampler.start()
            try:
                return wait(proc), sampler
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                sampler.stop()
                sampler.join()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_size(n: int, work: Path, checkpoint: str, images: list[str], args) -> dict:
    run_dir = work / f"n{n}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    manifest = run_dir / "manifest.parquet"
    t0 = time.perf_counter()
    build_manifest(manifest, n, images, with_text=not args.no_text)
    manifest_s = time.perf_counter() - t0
    out = run_dir / "out"
    record_path = run_dir / "driver.json"
    log_path = run_dir / "job.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    overrides = [
        f"input.path={manifest}", f"output.path={out}", f"output.shard_size={args.shard_size}",
        "index.enabled=false", f"model.checkpoint={checkpoint}",
        f"model.backend={args.backend}", f"model.precision={args.precision}",
        *args.override,
    ]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_driver", str(record_path), "--", "run", *overrides]
    print(f"[scale] N={n:,}: {' '.join(cmd[:2])} --_driver ... -- run {' '.join(overrides)}", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    def wait(proc: subprocess.Popen):
        exit_cpu = wait_exited(proc, args.timeout)  # own CPU of the exited driver, not yet reaped
        return exit_cpu, time.perf_counter() - t0, (proc.wait() if exit_cpu is not None else "timeout")

    (exit_cpu, wall, rc), sampler = run_sampled(cmd, log_path, ray_tmp, ProcSampler, wait)
    load_after = os.getloadavg()
    if rc != 0 or not record_path.exists():
        lines = log_path.read_text(errors="replace").splitlines()
        errs = [ln for ln in lines if "clip-etl: error" in ln or "Raylet is terminated" in ln][-3:]
        raise JobFailed(f"N={n}: job failed (rc={rc}); log {log_path}:\n" + "\n".join(errs or lines[-15:]))
    rec = json.loads(record_path.read_text())
    run_json = {}
    if (out / "_run.json").exists():
        run_json = json.loads((out / "_run.json").read_text())
    rows_out = (run_json.get("counts") or {}).get("rows_out")
    if rows_out is not None and rows_out != n:
        raise SystemExit(f"[scale] N={n}: the job wrote {rows_out} rows, expected {n}")
    ops = rec.get("operators") or parse_stats(rec.get("stats_texts") or [])
    op_bytes = [o["bytes"] for o in ops if o["bytes"] is not None]
    result = {
        "rows": n,
        "wall_s": wall,
        "rows_per_s": n / wall,
        "driver_peak_rss_mb": rec["maxrss_kb"] / 1024.0,
        "driver_cpu_s": exit_cpu[0] + exit_cpu[1],
        "driver_user_s": exit_cpu[0],
        "driver_sys_s": exit_cpu[1],
        "driver_cpu_s_at_main_return": rec["utime_s"] + rec["stime_s"],
        "object_store_bytes_per_row": (sum(op_bytes) / n) if op_bytes else None,
        "operators": ops,
        "datasets_executed": len(rec.get("stats_texts") or []),
        "stats_capture": rec.get("stats_capture"),
        "proc_peak_kb": sampler.peak,
        "proc_samples": sampler.samples,
        "driver_thread_cpu_s": sampler.thread_cpu(),
        "pipelines_file": rec.get("pipelines_file"),
        "job_timings": run_json.get("timings"),
        "counts": run_json.get("counts"),
        "ray": run_json.get("ray"),
        "manifest_build_s": manifest_s,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "log": str(log_path),
        "command": cmd,
    }
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("ray", "torch", "pyarrow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def report(results: list[dict], model_cfg: dict, args) -> dict:
    print()
    head = (f"{'size':>9} | {'wall s':>8} | {'rows/s':>8} | {'driver peak RSS MB':>18} | "
            f"{'driver CPU s':>12} | {'object-store B/row':>18}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['rows']:>9,} | {r['wall_s']:>8.1f} | {r['rows_per_s']:>8.1f} | {r['driver_peak_rss_mb']:>18.1f} | "
              f"{r['driver_cpu_s']:>12.2f} | {fmt(r['object_store_bytes_per_row'], '>18,.0f')}")
    ratios = {}
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        ratios = {
            "sizes": [lo["rows"], hi["rows"]],
            "rss": hi["driver_peak_rss_mb"] / lo["driver_peak_rss_mb"],
            "cpu": hi["driver_cpu_s"] / lo["driver_cpu_s"],
        }
        label = f"{hi['rows'] // 1000 if hi['rows'] % 1000 == 0 else hi['rows']}" \
                f"{'k' if hi['rows'] % 1000 == 0 else ''}/" \
                f"{lo['rows'] // 1000 if lo['rows'] % 1000 == 0 else lo['rows']}{'k' if lo['rows'] % 1000 == 0 else ''}"
        print()
        for key, name in (("rss", "driver peak RSS"), ("cpu", "driver CPU s")):
            ok = ratios[key] <= TARGET_RATIO
            print(f"ratio {label} {name:<16}: {ratios[key]:6.2f}x  (target <= {TARGET_RATIO:.2f}: "
                  f"{'met' if ok else 'NOT met'})")
        print(f"({hi['rows'] / lo['rows']:.0f}x more rows)")

    print("\nDetails")
    res = (model_cfg.get("vision") or {}).get("image_size")
    ctx = (model_cfg.get("text") or {}).get("context_length")
    if res:
        exp = 3 * res * res * 4 + (0 if args.no_text or not ctx else ctx * 8)
        print(f"  reference decode payload per row, float32 pixels (before the uint8 change): 3x{res}x{res} "
              f"= {3 * res * res * 4:,} B (uint8 would be {3 * res * res:,} B)"
              + ("" if args.no_text or not ctx else f" + int64 tokens {ctx} = {ctx * 8:,} B") + f" -> {exp:,} B")
    for r in results:
        pk = r["proc_peak_kb"]
        t = r.get("job_timings") or {}
        print(f"  N={r['rows']:,}: driver CPU at exit {r['driver_cpu_s']:.2f}s = user {r['driver_user_s']:.2f}s + sys "
              f"{r['driver_sys_s']:.2f}s; {r['driver_cpu_s_at_main_return']:.2f}s of it by the time cli.main returned "
              "(the rest: interpreter teardown)")
        print(f"    "
              f"/proc peaks ({r['proc_samples']} samples): VmHWM {pk['VmHWM'] / 1024:.0f} MB, "
              f"RssAnon {pk['RssAnon'] / 1024:.0f} MB, RssShmem {pk['RssShmem'] / 1024:.0f} MB, "
              f"RssFile {pk['RssFile'] / 1024:.0f} MB")
        tc = r.get("driver_thread_cpu_s") or {}
        if tc:
            top = list(tc.items())[:6]
            print("    driver CPU by thread name (sampled; 'python' = unnamed threads: Python's, Arrow's, torch's): " + ", ".join(f"{k} {v:.1f}s" for k, v in top)
                  + (f", {len(tc) - len(top)} other names {sum(list(tc.values())[6:]):.1f}s" if len(tc) > 6 else ""))
        print(f"    job timings: process {fmt(t.get('process_s'), '.1f')}s "
              f"({fmt(t.get('rows_per_s'), ',.0f')} rows/s in the loop), model check {fmt(t.get('model_check_s'), '.1f')}s, "
              f"ray start {fmt(t.get('ray_start_s'), '.1f')}s, total {fmt(t.get('total_s'), '.1f')}s; "
              f"load avg 1-min {r['load_avg_before'][0]:.2f} before, {r['load_avg_after'][0]:.2f} after")
        if r.get("failed_attempts"):
            print(f"    NOTE: {len(r['failed_attempts'])} failed attempt(s) before this one: "
                  + " | ".join(f.splitlines()[0] for f in r["failed_attempts"]))
        print(f"    Ray Data: {r['datasets_executed']} dataset execution(s), stats via {r['stats_capture']}")
        for o in r["operators"]:
            per_row = (o["bytes"] / r["rows"]) if o["bytes"] is not None else None
            print(f"      [{o['dataset']}] {o['operator'][:70]:<70} rows {fmt(o['rows'], ',')}, "
                  f"bytes {fmt(o['bytes'], ',')} = {fmt(per_row, ',.0f')} B/row")
    return ratios


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        mult = 1_000 if part.endswith("k") else 1_000_000 if part.endswith("m") else 1
        out.append(int(float(part.rstrip("km")) * mult))
    if not out or any(n <= 0 for n in out):
        raise argparse.ArgumentTypeError(f"bad --sizes {text!r}")
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_driver"]:  # internal: the job process
        record, rest = argv[1], argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return run_driver(record, rest)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated row counts (20000,200000 or 20k,200k); default 20k,200k")
    p.add_argument("--quick", action="store_true", help=f"smoke run: sizes {','.join(map(str, QUICK_SIZES))}")
    p.add_argument("--shard-size", type=int, default=10_000, help="output.shard_size (default 10000)")
    p.add_argument("--images", type=int, default=256, help="distinct generated 32x32 PNGs (default 256)")
    p.add_argument("--resolution", type=int, default=32,
                   help="the tiny model's input resolution, a multiple of 4 (default 32; 224 as ViT-B/32)")
    p.add_argument("--no-text", action="store_true", help="manifest without a text column")
    p.add_argument("--backend", default="torch", help="model.backend (default torch: no ONNX export)")
    p.add_argument("--precision", default="fp32", help="model.precision (default fp32)")
    p.add_argument("--override", action="append", default=[], metavar="section.key=value",
                   help="extra clip-etl override (repeatable)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per job before it is killed")
    p.add_argument("--retries", type=int, default=1, help="re-runs of a size whose job failed (default 1)")
    p.add_argument("--workdir", help="keep the workload here (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep each run's OUTPUT folder")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    sizes = args.sizes or (list(QUICK_SIZES) if args.quick else list(DEFAULT_SIZES))

    sys.path.insert(0, str(REPO))
    import pipelines
    from clip_core.encoders import cpu_info, describe_flags

    cpu = cpu_info()
    flags = describe_flags(cpu)
    print(f"[scale] code: {Path(pipelines.__file__).parent.parent} (git {git_rev()})")
    print(f"[scale] cpu: {cpu['model']}, {cpu['cpus']} CPUs; {flags}")
    print(f"[scale] versions: {json.dumps(versions())}")
    print(f"[scale] sizes {sizes}, shard_size {args.shard_size}, {args.images} distinct images, "
          f"text {'off' if args.no_text else 'on'}, backend {args.backend}/{args.precision}")

    tmp = None
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="clip-etl-scale-")
        work = Path(tmp)
    try:
        t0 = time.perf_counter()
        checkpoint, model_cfg = build_checkpoint(work, args.resolution)
        images = build_images(work / "images", args.images)
        print(f"[scale] workload built in {time.perf_counter() - t0:.1f}s under {work}", flush=True)
        results = []
        for n in sizes:
            r = run_size_retrying(n, work, checkpoint, images, args)
            if not str(r["pipelines_file"]).startswith(str(REPO)):
                print(f"[scale] WARNING: the job imported {r['pipelines_file']}, not from {REPO}")
            print(f"[scale] N={n:,}: {r['wall_s']:.1f}s wall, driver {r['driver_cpu_s']:.1f} CPU s, "
                  f"peak RSS {r['driver_peak_rss_mb']:.0f} MB (job imported {r['pipelines_file']})", flush=True)
            results.append(r)
        ratios = report(results, model_cfg, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu, "versions": versions(), "code": str(REPO),
                                                   "git": git_rev(), "args": vars(args), "results": results,
                                                   "ratios": ratios}, indent=2, default=str))
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "?") + ("+dirty" if dirty else "")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())

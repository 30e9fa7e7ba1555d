"""End-to-end throughput: ``clip-etl run`` on photo-sized JPEGs and on captions, against the
encoder alone and against the loop users write with transformers, all in one run on the same files.

What is measured (every figure printed comes from this run; nothing is hard-coded):

* Images: a few hundred generated photo-like JPEGs of 1-12 MP in mixed aspect ratios (4:3, 3:2,
  16:9, 5:4, 1:1; landscape and portrait), JPEG quality 85-92, so 0.2-3 MB each like camera photos
  (``benchmarks/photos.py``), listed in a Parquet manifest (``id``, ``image``), optionally K times.

  (a) the ceiling: ``load_encoder(model, backend, precision)`` with the pipeline's
      ``model.backend``/``model.precision`` (``auto``/``auto`` unless overridden, resolved as the
      job resolves them), ``encode_images`` on already-preprocessed pixels, batch 32, median
      of timed batches after a warm-up batch, with all CPUs.
  (b) ``clip-etl run`` as a subprocess (embedded Ray; labels, captions and index off): wall time
      from process start to exit, and the job's own record ``OUTPUT/_run.json`` (time per step,
      busy seconds per stage, rows/s over the processing loop). The results are checked: one row
      per manifest row, every id once, every row ``ok`` with an embedding.
  (c) the user's loop: ``PIL.Image.open(path).convert("RGB")`` + ``transformers.CLIPImageProcessor``
      (from the model folder) + ``CLIPModel.get_image_features`` in fp32 under ``torch.no_grad``,
      batch 32, ``torch.set_num_threads(os.cpu_count())``, timed over every manifest row after a
      warm-up batch.

  (d) a bound no implementation with the same backend and libjpeg (PIL's decoder) can pass on
      this CPU: every row costs at least the decode floor (libjpeg at its smallest DCT scale,
      1/8, no resize: the entropy decoding that remains at any scale) plus one model forward,
      both in core-seconds measured on one thread, so ``cores / (floor + forward)`` images/s,
      start-up left out. Where d/a < 0.8 or d/c < 5, the targets "0.8x the ceiling" and "5x the
      user's loop" are out of reach of such code here.

  (a) and (c) run in this process with ``retain_freed_memory()``, the heap setting of the job's
  model actors. Printed: images/s of each and the ratios b/a, b/c, d/a and d/c.

* Texts: captions of 3 to 30 words drawn from a fixed word list (seeded), manifest ``id``, ``text``.
  (a) ``encode_texts`` on our token ids in batches of 256; (b) ``clip-etl run`` with texts only;
  (c) ``CLIPTokenizer(padding="max_length", max_length=77, truncation=True)`` +
  ``CLIPModel.get_text_features`` in fp32, batch 256. Printed: texts/s and b/a, b/c. The loops (a)
  and (c) run at a steady rate that does not depend on how many texts there are, so on large
  ``--texts`` they are timed on the first ``--loop-texts`` of them (the pipeline gets them all).

The model is ViT-B/32-shaped with random weights (no downloads): ``transformers.CLIPModel`` from a
``CLIPConfig`` of OpenAI's ViT-B/32 sizes, seeded, saved with ``save_pretrained`` together with a
``CLIPImageProcessor`` (224, OpenAI mean/std) and a ``CLIPTokenizer`` written from the BPE
vocabulary that ships in ``clip_core`` (the test suite's approach). The same folder is
``model.checkpoint`` for the job, the source of ``load_encoder`` and what transformers loads.
Generated photos and the model folder are cached under the system temp directory, keyed by their
parameters, so reruns skip them; the job's ONNX export is cached by the product itself.

    .venv/bin/python benchmarks/pipeline.py --quick          # 24 images of 1-3 MP, 2000 texts: minutes
    .venv/bin/python benchmarks/pipeline.py                  # 256 images of 1-12 MP, 100,000 texts
    .venv/bin/python benchmarks/pipeline.py --skip-texts --override model.precision=fp32 --json out.json

The header names the CPU (model, the flags that pick kernels: avx2, avx512f, avx512_bf16,
avx512_vnni, amx_bf16, amx_int8), the CPU count and the versions: quote figures with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clip_core.encoders import cpu_info, describe_flags, retain_freed_memory  # noqa: E402
from photos import cache_key, make_photos  # noqa: E402

IMAGE_BATCH = 32
TEXT_BATCH = 256
# Warm-up calls (kernels picked, memory allocated) before the timed loops; small, since a warm-up
# only has to touch every code path, and a full batch of the transformers loop costs half a minute.
WARMUP_IMAGES = 4
WARMUP_TEXTS = 32
MODEL_SEED = 0
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# OpenAI's ViT-B/32 (transformers' names).
VIT_B32 = {
    "vision_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 32,
                      "image_size": 224, "intermediate_size": 3072, "hidden_act": "quick_gelu"},
    "text_config": {"hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 12,
                    "intermediate_size": 2048, "vocab_size": 49408, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu"},
    "projection_dim": 512,
}
WORDS = (
    "a the photo picture of on in with near under above small large red blue green yellow old new "
    "dog cat bird horse car bus bike tree house street field river beach mountain city sky water "
    "man woman child people group sitting running standing playing walking eating wooden metal "
    "bright dark sunny snowy night morning close view top side front table chair window door "
    "two three several little big white black brown orange pink purple gray golden silver glass "
    "boat train plane road bridge park garden forest lake snow sand grass flowers kitchen room"
).split()


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------
def versions() -> dict:
    """Versions of what does the arithmetic and the plumbing."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnxruntime", "ray", "pillow", "pyarrow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load: other work on the machine skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def print_header(cpu: dict, ver: dict, args) -> None:
    flags = describe_flags(cpu)
    print(f"cpu: {cpu['model']}; {cpu['cpus']} CPUs; {flags}")
    print(f"torch {ver.get('torch')}, transformers {ver.get('transformers')}, onnxruntime {ver.get('onnxruntime')}, "
          f"ray {ver.get('ray')}, python {ver['python']}; load average {loadavg()}")
    print(f"code: {REPO} (git {git_rev()}); mode {'quick' if args.quick else 'full'}", flush=True)
    load = loadavg()
    if load and load[0] > 0.5 * (cpu["cpus"] or 1):
        print(f"WARNING: 1-minute load {load[0]} on {cpu['cpus']} CPUs before starting: other work shares the "
              "CPUs, and multi-threaded figures suffer most; rerun on a quiet machine before quoting them", flush=True)


def git_rev() -> str:
    """The commit measured (+dirty when the tree has changes)."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        return (run("rev-parse", "--short", "HEAD") or "?") + ("+dirty" if run("status", "--porcelain") else "")
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------
# Workload: model folder, photos, captions, manifests
# --------------------------------------------------------------------------------------------
def write_hf_tokenizer(folder: Path) -> None:
    """A transformers ``CLIPTokenizer`` from the BPE vocabulary clip_core ships (the real one cannot
    be downloaded here): vocab.json + merges.txt in the Hugging Face layout, as tests/test_tokenizer.py
    builds it, then ``save_pretrained`` so ``CLIPTokenizer.from_pretrained(folder)`` works."""
    from transformers import CLIPTokenizer

    from clip_core.tokenizer import get_default_tokenizer

    tok = get_default_tokenizer()
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    hf = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ours = tok(["a photo of a cat."], context_length=77)[0]
    theirs = hf("a photo of a cat.")["input_ids"]
    if list(ours[: len(theirs)].tolist()) != theirs:
        raise SystemExit(f"the transformers tokenizer built from our vocabulary disagrees: {theirs} vs {ours[:12]}")
    hf.save_pretrained(folder)


def build_model_folder(folder: Path) -> Path:
    """A ViT-B/32-shaped random ``CLIPModel`` saved as a Hugging Face folder, with its image
    processor and tokenizer; reused when a complete one is there (the seed fixes the weights, so
    the product's ONNX export cache, keyed by the weights, is reused too)."""
    done = folder / "_complete"
    if done.exists():
        return folder
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(MODEL_SEED)
    CLIPModel(CLIPConfig(**VIT_B32)).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                       image_mean=OPENAI_MEAN, image_std=OPENAI_STD).save_pretrained(folder)
    write_hf_tokenizer(folder)
    done.write_text("ok\n")
    return folder


def captions(n: int, seed: int = 0) -> list[str]:
    """Captions of 3 to 30 words, reproducible: about the lengths of alt texts and dataset captions."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 31, n)
    picks = rng.integers(0, len(WORDS), int(lengths.sum()))
    out, at = [], 0
    for k in lengths:
        out.append(" ".join(WORDS[i] for i in picks[at:at + k]))
        at += k
    return out


def write_image_manifest(path: Path, files: list[dict], repeat: int) -> list[str]:
    """Manifest ``id``, ``image`` (absolute paths), the files listed ``repeat`` times under
    distinct ids; returns the image column in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"img-{k}-{i:05d}" for k in range(repeat) for i in range(len(files))]
    paths = [f["path"] for _ in range(repeat) for f in files]
    pq.write_table(pa.table({"id": pa.array(ids), "image": pa.array(paths)}), path)
    return paths


def write_text_manifest(path: Path, texts: list[str]) -> None:
    """Manifest ``id``, ``text``: no image column, so the job embeds texts only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"txt-{i:07d}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": pa.array(ids), "text": pa.array(texts)}), path)


def describe_photos(files: list[dict]) -> str:
    mp = np.array([f["width"] * f["height"] / 1e6 for f in files])
    mb = np.array([f["bytes"] / 1e6 for f in files])
    portrait = sum(f["height"] > f["width"] for f in files)
    return (f"{len(files)} JPEGs, {mp.min():.1f}-{mp.max():.1f} MP (mean {mp.mean():.1f}), "
            f"{mb.min():.2f}-{mb.max():.2f} MB (mean {mb.mean():.2f}, total {mb.sum():.0f} MB), "
            f"{portrait} portrait / {len(files) - portrait} landscape or square")


# --------------------------------------------------------------------------------------------
# (a) the encoder alone
# --------------------------------------------------------------------------------------------
def pipeline_settings(overrides: list[str]) -> dict:
    """What the job will use: model.backend/precision and the model batch (the actors' threads
    and CPUs are decided by the job on its cluster, and read back from ``_run.json``)."""
    from pipelines.config import load_config

    cfg = load_config(None, [o for o in overrides if not o.startswith(("input.", "output."))])
    return {"backend": cfg.model.backend, "precision": cfg.model.precision, "embed_batch": cfg.embed.batch_size}


def load_ours(model_dir: Path, settings: dict, threads: int | None):
    """Our encoder as the job builds it (ONNX export from the product's cache, made if missing)."""
    from clip_core.encoders import load_encoder

    t0 = time.perf_counter()
    enc = load_encoder(str(model_dir), backend=settings["backend"], precision=settings["precision"],
                       num_threads=threads)
    return enc, time.perf_counter() - t0


def median_rate(fn, items: int, rounds: int) -> tuple[float, list[float]]:
    """Items per second over the median of ``rounds`` calls, after one warm-up call (first calls
    allocate and pick kernels)."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return items / statistics.median(times), times


def ceiling_images(enc, paths: list[str], rounds: int) -> dict:
    """(a) images: ``encode_images`` on one batch of preprocessed pixels (decode excluded)."""
    import torch
    from PIL import Image

    distinct = list(dict.fromkeys(paths))[:IMAGE_BATCH]
    pix = [enc.preprocess(Image.open(p).convert("RGB")) for p in distinct]
    batch = torch.stack([pix[i % len(pix)] for i in range(IMAGE_BATCH)])
    rate, times = median_rate(lambda: enc.encode_images(batch), IMAGE_BATCH, rounds)
    return {"per_s": rate, "batch": IMAGE_BATCH, "rounds": rounds, "batch_s": times, "threads": enc.num_threads}


def ceiling_texts(enc, texts: list[str]) -> dict:
    """(a) texts: ``encode_texts`` on our token ids, batches of 256 (tokenizing timed apart)."""
    t0 = time.perf_counter()
    tokens = enc.tokenize(texts)
    tok_s = time.perf_counter() - t0
    batches = [tokens[i:i + TEXT_BATCH] for i in range(0, len(tokens), TEXT_BATCH)]
    enc.encode_texts(batches[0][:WARMUP_TEXTS])
    t0 = time.perf_counter()
    for b in batches:
        enc.encode_texts(b)
    sec = time.perf_counter() - t0
    return {"per_s": len(texts) / sec, "seconds": sec, "texts": len(texts), "batch": TEXT_BATCH,
            "tokenize_per_s": len(texts) / tok_s, "threads": enc.num_threads}


def decode_floor(paths: list[str]) -> dict:
    """The least CPU any JPEG decode of these files can cost: libjpeg at its smallest DCT scale
    (1/8 per side, PIL's ``draft`` asked for the smallest size), no resize, one thread. The
    Huffman (entropy) decoding of every coefficient remains at any scale, and it is most of a
    high-quality photo's decode; the job's own draft decode (>= 2x the resolution, then the exact
    resize) costs more than this."""
    from PIL import Image

    distinct = list(dict.fromkeys(paths))
    seconds = {}
    for p in distinct:
        t0 = time.process_time()
        with Image.open(p) as im:
            im.draft("RGB", (1, 1))
            im.load()
        seconds[p] = time.process_time() - t0
    per_row = sum(seconds[p] for p in paths) / len(paths)
    return {"core_s_per_image": per_row, "per_s_per_core": 1.0 / per_row, "files": len(distinct)}


def reachable_images(model_dir: Path, settings: dict, paths: list[str], rounds: int, cores: int) -> dict:
    """(d) An upper bound on end-to-end images/s that no implementation with this backend and
    libjpeg can pass on this CPU: every row needs at least the decode floor and one model
    forward, so on ``cores`` cores it is ``cores / (decode floor + model cost)``, both in
    core-seconds per image and both measured on one thread (where per-core efficiency is
    highest), start-up and everything else left out."""
    enc, _ = load_ours(model_dir, settings, 1)
    one = ceiling_images(enc, paths, rounds)
    del enc
    floor = decode_floor(paths)
    model_cost = 1.0 / one["per_s"]
    return {"per_s": cores / (floor["core_s_per_image"] + model_cost), "cores": cores,
            "model_per_s_one_thread": one["per_s"], "decode_floor": floor,
            "decode_share": floor["core_s_per_image"] / (floor["core_s_per_image"] + model_cost)}


# --------------------------------------------------------------------------------------------
# (b) the job
# --------------------------------------------------------------------------------------------
def job_command(manifest: Path, out: Path, model_dir: Path, overrides: list[str]) -> list[str]:
    """``clip-etl run`` with embeddings only: labels, captions and the index off."""
    exe = Path(sys.executable).with_name("clip-etl")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    return head + ["run", f"input.path={manifest}", f"output.path={out}", f"model.checkpoint={model_dir}",
                   "label.enabled=false", "caption.enabled=false", "index.enabled=false", *overrides]


def job_env() -> tuple[dict, str]:
    """The job's environment: this checkout first on PYTHONPATH (Ray's workers inherit it), no
    RAY_ADDRESS and a private RAY_TMPDIR, so it starts its own embedded Ray and never joins another
    local cluster (``ray_current_cluster`` lives in RAY_TMPDIR)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths have a length limit
    env["RAY_TMPDIR"] = ray_tmp
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env, ray_tmp


def run_job(name: str, manifest: Path, work: Path, model_dir: Path, overrides: list[str], timeout: float) -> dict:
    """(b): the job as a subprocess, timed from start to exit; its run record and checked results."""
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = job_command(manifest, out, model_dir, overrides)
    env, ray_tmp = job_env()
    log_path = work / f"job-{name}.log"
    print(f"  $ {' '.join(cmd)}", flush=True)
    try:
        with open(log_path, "w") as log:
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"clip-etl run ({name}) did not finish in {timeout:.0f}s (--timeout); "
                                 f"killed; log {log_path}") from None
            wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"clip-etl run ({name}) failed with exit status {proc.returncode}; log {log_path}:\n"
                         + "\n".join(tail))
    record = json.loads((out / "_run.json").read_text())
    return {"wall_s": wall, "out": str(out), "log": str(log_path), "command": cmd, "record": record}


def check_results(out: str, manifest: Path, column: str) -> dict:
    """The job's promise: one row per manifest row, every id once, every row ok with an embedding."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    want = pq.read_table(manifest, columns=["id"]).column("id")
    got = pq.read_table(Path(out) / "results", columns=["id", "status", column])
    problems = []
    if got.num_rows != len(want):
        problems.append(f"{got.num_rows} result rows for {len(want)} manifest rows")
    ids = got.column("id").to_pylist()
    if set(ids) != set(want.to_pylist()) or len(set(ids)) != got.num_rows:
        problems.append("the result ids are not the manifest ids, each once")
    not_ok = got.num_rows - int(pc.sum(pc.equal(got.column("status"), "ok")).as_py() or 0)
    if not_ok:
        problems.append(f"{not_ok} rows not ok")
    if got.column(column).null_count:
        problems.append(f"{got.column(column).null_count} rows without {column}")
    return {"rows": got.num_rows, "manifest_rows": len(want), "not_ok": not_ok, "problems": problems}


def job_summary(job: dict, rows: int) -> dict:
    """The figures of one job: wall rate, the job's own loop rate and its recorded times."""
    rec = job["record"]
    t = rec.get("timings") or {}
    return {"per_s": rows / job["wall_s"], "wall_s": job["wall_s"], "timings": t,
            "loop_per_s": t.get("rows_per_s"), "model": rec.get("model"), "counts": rec.get("counts"),
            "ray": {k: v for k, v in (rec.get("ray") or {}).items() if k != "dataset_stats"},
            "notes": rec.get("notes"), "log": job["log"], "command": job["command"]}


# --------------------------------------------------------------------------------------------
# (c) the user's loop with transformers
# --------------------------------------------------------------------------------------------
def hf_model(model_dir: Path):
    """``CLIPModel.from_pretrained`` in fp32, as a user would write it."""
    from transformers import CLIPModel

    t0 = time.perf_counter()
    model = CLIPModel.from_pretrained(str(model_dir)).float().eval()
    return model, time.perf_counter() - t0


def features(out):
    """transformers returns a tensor (v4) or an output whose pooler_output is projected (v5)."""
    return out if hasattr(out, "shape") else out.pooler_output


def user_images(model, model_dir: Path, paths: list[str]) -> dict:
    """(c) images: open + convert with PIL, CLIPImageProcessor, get_image_features, batch 32,
    over every manifest row (after a small warm-up batch, not counted)."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(str(model_dir))

    def step(batch: list[str]):
        images = [Image.open(p).convert("RGB") for p in batch]
        inputs = proc(images=images, return_tensors="pt")
        return features(model.get_image_features(pixel_values=inputs["pixel_values"]))

    sec = timed_loop(step, paths, IMAGE_BATCH, WARMUP_IMAGES)
    return {"per_s": len(paths) / sec, "seconds": sec, "images": len(paths), "batch": IMAGE_BATCH,
            "processor": type(proc).__name__, "threads": torch.get_num_threads()}


def timed_loop(step, items: list, batch: int, warmup: int) -> float:
    """Seconds the user's loop takes over ``items`` in batches, after a small warm-up batch, with
    every CPU (the user's setting; our encoders set their own) and without autograd."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    with torch.no_grad():
        step(batches[0][:warmup])
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        return time.perf_counter() - t0


def user_texts(model, model_dir: Path, texts: list[str]) -> dict:
    """(c) texts: CLIPTokenizer padded to 77 + get_text_features, batch 256 (after a small warm-up batch)."""
    import torch
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(model_dir))

    def step(batch: list[str]):
        inputs = tok(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return features(model.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"]))

    sec = timed_loop(step, texts, TEXT_BATCH, WARMUP_TEXTS)
    return {"per_s": len(texts) / sec, "seconds": sec, "texts": len(texts), "batch": TEXT_BATCH,
            "tokenizer": type(tok).__name__, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def fmt(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def print_job_details(b: dict, unit: str) -> None:
    """Everything the run record says about where the job's time went."""
    t = dict(b["timings"])
    busy = t.pop("stage_busy_s", {}) or {}
    steps = ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "rows_per_s" and isinstance(v, (int, float)))
    print(f"    _run.json timings (s): {steps}")
    outside = b["wall_s"] - (t.get("total_s") or 0.0)
    print(f"    outside the job's total_s (interpreter, imports, config, Ray shutdown): {outside:.1f} s")
    rows = (b["counts"] or {}).get("rows_out") or 0
    if busy:
        per = ", ".join(f"{k} {v:.2f} s ({rows / v:,.0f} {unit}/busy-s)" if v else f"{k} {v:.2f} s"
                        for k, v in busy.items())
        print(f"    stage busy seconds, summed over tasks/actors: {per}")
    m = b["model"] or {}
    print(f"    model as run: backend {m.get('backend')}, precision {m.get('precision')}, device {m.get('device')}; "
          f"model threads per actor {m.get('num_threads')}, CPUs reserved per actor "
          f"{(b['ray'] or {}).get('cpus_per_actor')}, per decode task {(b['ray'] or {}).get('cpus_per_decode_task')}")
    print(f"    ray: {b['ray']}")
    if b.get("notes"):
        print(f"    notes: {b['notes']}")


def print_kind(kind: str, res: dict) -> dict:
    """One table per input kind, and the ratios b/a and b/c (b taken start-to-exit)."""
    unit = "img/s" if kind == "images" else "texts/s"
    print(f"\n{kind}: {res['workload']}")
    width = max(len(label) for _, label in res["rows"])
    print(f"  {'measurement':<{width}} {unit:>9}")
    for key, label in res["rows"]:
        print(f"  {label:<{width}} {fmt(res[key]['per_s']):>9}")
    ratios = {}
    b = res["b"]["per_s"]
    for k in ("a", "c"):
        if k in res:
            ratios[f"b/{k}"] = b / res[k]["per_s"]
    ratios["b_loop/a"] = (res["b"]["loop_per_s"] or 0) / res["a"]["per_s"]
    if "c" in res:
        ratios["b_loop/c"] = (res["b"]["loop_per_s"] or 0) / res["c"]["per_s"]
    if "d" in res:
        ratios.update({"d/a": res["d"]["per_s"] / res["a"]["per_s"], "d/c": res["d"]["per_s"] / res["c"]["per_s"]})
    print("  " + "   ".join(f"ratio {k} = {v:.2f}x" for k, v in ratios.items()))
    if "d" in res:
        d = res["d"]
        print(f"  (d: decode floor {d['decode_floor']['core_s_per_image'] * 1e3:.1f} ms/image on one core, "
              f"the model {1e3 / d['model_per_s_one_thread']:.1f} ms/image on one thread: decoding is "
              f"{100 * d['decode_share']:.0f}% of the least work per image)")
    print("  (b = clip-etl run start to exit; b_loop = the job's rows/s over its processing loop, from _run.json)")
    print_job_details(res["b"], unit.split("/")[0])
    res["ratios"] = ratios
    return ratios


# --------------------------------------------------------------------------------------------
# The two parts
# --------------------------------------------------------------------------------------------
def images_part(args, work: Path, model_dir: Path, settings: dict, hf) -> dict:
    """(a), (b), (c) on the generated photos."""
    mp = (1.0, 3.0) if args.quick else (1.0, 12.0)
    n = args.images or (24 if args.quick else 256)
    folder = Path(args.data_dir) / cache_key(n, mp, (85, 92), 0)
    t0 = time.perf_counter()
    files = make_photos(folder, n, mp)
    print(f"[images] {describe_photos(files)} in {folder} ({time.perf_counter() - t0:.1f}s to generate or find)")
    manifest = work / "images.parquet"
    paths = write_image_manifest(manifest, files, args.repeat)
    res: dict = {"workload": f"{describe_photos(files)}; manifest {len(paths)} rows (x{args.repeat})",
                 "photos_dir": str(folder), "rows": len(paths)}

    enc, load_s = load_ours(model_dir, settings, None)
    export = " (the export included when it was not cached)" if enc.backend != "torch" else ""
    print(f"[images] (a) {enc.backend}/{enc.precision} encoder loaded in {load_s:.1f}s{export}, "
          f"{enc.num_threads} threads", flush=True)
    res["a"] = {**ceiling_images(enc, paths, args.rounds), "load_s": load_s}
    rows = [("a", f"(a) encode_images, {enc.backend}/{enc.precision}, {enc.num_threads} threads, "
                  "preprocessed, batch 32")]
    del enc
    print(f"[images] (a) {res['a']['per_s']:.1f} img/s; (b) clip-etl run ...", flush=True)
    job = run_job("images", manifest, work, model_dir, args.override, args.timeout)
    res["b"] = job_summary(job, len(paths))
    res["b"]["check"] = check_results(job["out"], manifest, "image_embedding")
    rows.append(("b", f"(b) clip-etl run, start to exit ({res['b']['wall_s']:.1f} s)"))
    res["b_loop"] = {"per_s": res["b"]["loop_per_s"]}
    rows.append(("b_loop", "(b) same job, its processing loop only (_run.json rows_per_s)"))
    print(f"[images] (b) {res['b']['per_s']:.1f} img/s start to exit; check {res['b']['check']}; (c) user loop ...",
          flush=True)
    res["c"] = user_images(hf[0], model_dir, paths)
    rows.append(("c", f"(c) PIL + {res['c']['processor']} + CLIPModel.get_image_features fp32, "
                      f"{res['c']['threads']} threads, batch 32"))
    print("[images] (d) decode floor and the model on one thread ...", flush=True)
    res["d"] = reachable_images(model_dir, settings, paths, args.rounds, os.cpu_count() or 1)
    rows.append(("d", f"(d) bound with this backend and libjpeg on {res['d']['cores']} cores: "
                      "decode floor + forward, no start-up"))
    res["rows"] = rows
    return res


def texts_part(args, work: Path, model_dir: Path, settings: dict, hf) -> dict:
    """(a), (b), (c) on the generated captions."""
    n = args.texts or (2000 if args.quick else 100_000)
    texts = captions(n)
    manifest = work / "texts.parquet"
    write_text_manifest(manifest, texts)
    words = np.array([len(t.split()) for t in texts])
    loop_n = min(n, args.loop_texts or (256 if args.quick else 10_000))
    res: dict = {"workload": f"{n:,} captions of {words.min()}-{words.max()} words (mean {words.mean():.1f}); "
                             f"loops (a) and (c) on the first {loop_n:,}", "rows": n}
    enc, load_s = load_ours(model_dir, settings, None)
    res["a"] = {**ceiling_texts(enc, texts[:loop_n]), "load_s": load_s}
    rows = [("a", f"(a) encode_texts on token ids, {enc.backend}/{enc.precision}, {enc.num_threads} threads, "
                  "batch 256")]
    print(f"[texts] (a) our tokenizer alone (not in the figure): {res['a']['tokenize_per_s']:,.0f} texts/s")
    del enc
    print(f"[texts] (a) {res['a']['per_s']:.1f} texts/s; (b) clip-etl run ...", flush=True)
    job = run_job("texts", manifest, work, model_dir, args.override, args.timeout)
    res["b"] = job_summary(job, n)
    res["b"]["check"] = check_results(job["out"], manifest, "text_embedding")
    rows.append(("b", f"(b) clip-etl run, start to exit ({res['b']['wall_s']:.1f} s)"))
    res["b_loop"] = {"per_s": res["b"]["loop_per_s"]}
    rows.append(("b_loop", "(b) same job, its processing loop only (_run.json rows_per_s)"))
    print(f"[texts] (b) {res['b']['per_s']:.1f} texts/s start to exit; check {res['b']['check']}; (c) user loop ...",
          flush=True)
    res["c"] = user_texts(hf[0], model_dir, texts[:loop_n])
    rows.append(("c", f"(c) {res['c']['tokenizer']} pad 77 + CLIPModel.get_text_features fp32, "
                      f"{res['c']['threads']} threads, batch 256"))
    res["rows"] = rows
    return res


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 24 images of 1-3 MP, 2000 texts, loops on 256 texts, 2 rounds")
    p.add_argument("--images", type=int, default=None, help="distinct generated photos (default 256; 24 quick)")
    p.add_argument("--texts", type=int, default=None, help="captions for the text part (default 100000; 2000 quick)")
    p.add_argument("--loop-texts", type=int, default=None,
                   help="texts timed in the in-process loops (a) and (c) (default 10000; 256 quick); the job gets all")
    p.add_argument("--repeat", type=int, default=1, help="list every photo K times under distinct ids (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="timed batches for the image ceiling (default 5; 2 quick)")
    p.add_argument("--skip-images", action="store_true", help="no image part")
    p.add_argument("--skip-texts", action="store_true", help="no text part")
    p.add_argument("--override", action="append", default=[], metavar="section.key=value",
                   help="extra clip-etl run override, repeatable (e.g. model.precision=fp32, embed.num_cpus=1); "
                        "model.backend/precision also apply to (a)")
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "clip-etl-bench-data"),
                   help="cache of generated photos and the model folder (default: <tmp>/clip-etl-bench-data)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per clip-etl run before it is killed")
    p.add_argument("--keep", action="store_true", help="keep the manifests, job outputs and logs (path printed)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.skip_images and args.skip_texts:
        p.error("--skip-images and --skip-texts leave nothing to measure")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    args.rounds = args.rounds or (2 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    retain_freed_memory()  # (a) and (c) run in this process: the heap setting the job's model actors use
    cpu, ver = cpu_info(), versions()
    print_header(cpu, ver, args)
    settings = pipeline_settings(args.override)
    t0 = time.perf_counter()
    model_dir = build_model_folder(Path(args.data_dir) / f"hf-vit-b32-random-seed{MODEL_SEED}")
    print(f"model: ViT-B/32 shape, random weights (seed {MODEL_SEED}), HF folder {model_dir} "
          f"({time.perf_counter() - t0:.1f}s to build or find); job settings {settings}", flush=True)
    hf = hf_model(model_dir)
    work = Path(tempfile.mkdtemp(prefix="clip-etl-bench-pipeline-"))
    results: dict = {"cpu": cpu, "versions": ver, "git": git_rev(), "args": vars(args), "settings": settings,
                     "load_before": loadavg(), "hf_load_s": hf[1]}
    try:
        if not args.skip_images:
            results["images"] = images_part(args, work, model_dir, settings, hf)
        if not args.skip_texts:
            results["texts"] = texts_part(args, work, model_dir, settings, hf)
        print(f"\nresults on {cpu['model']} ({cpu['cpus']} CPUs), torch {ver.get('torch')}")
        for kind in ("images", "texts"):
            if kind in results:
                print_kind(kind, results[kind])
        results["load_after"] = loadavg()
        print(f"\nload average before {results['load_before']}, after {results['load_after']}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The batch job: checks, shard plan, Ray Data pipeline, commits, index, run record.

This is the only place the stages are wired together. The order of work is chosen so that every
job-level failure happens before any compute is spent and says what is wrong in one line:

1. config values (done by :mod:`pipelines.config`), then the manifest: files, columns, ids;
2. the model: loaded once on the driver to prove it loads and to learn its fingerprint,
   embedding size, image size and tokenizer; label classes, templates and caption vocabulary
   are resolved here too (files are read on the driver and shipped as lists);
3. the shard plan, compared with ``OUTPUT/_plan.json`` of an earlier run into the same output:
   a different input or different settings refuse to mix results;
4. Ray: read (pending shards) -> decode (CPU tasks) -> embed/label/caption (actor pool) ->
   the driver's :class:`~pipelines.writer.ShardWriter` commits each complete shard;
5. the index (when on), then ``OUTPUT/_run.json`` and, last, ``OUTPUT/_SUCCESS``.

Re-running into the same output resumes: committed parts are kept untouched, the other shards
are processed, and ``_SUCCESS`` is written only when every shard is committed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

from . import io as pio
from .config import ConfigError, PipelineConfig, apply_job

RESULTS_DIR = "results"
INDEX_DIR = "index"
PLAN_FILE = "_plan.json"
RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"


class JobError(RuntimeError):
    """A job-level failure: the job stops and the CLI prints this message as one line."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Driver-side preparation
# --------------------------------------------------------------------------------------------
def _with_local_copy(spec: Any, s3: pio.S3Options, parse: Callable[[Any], Any]) -> Any:
    """Run ``parse`` on ``spec``; an ``s3://`` file is first copied to a temporary local file
    (clip_core parses local files only) that is removed afterwards."""
    if not (isinstance(spec, str) and pio.is_s3(spec)):
        return parse(spec)
    import os
    import tempfile

    data = pio.read_bytes(spec, s3)
    suffix = os.path.splitext(spec)[1] or ".txt"
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="clip-etl-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return parse(path)
    finally:
        os.unlink(path)


def _spec_error(key: str, spec: Any, e: Exception) -> JobError:
    if isinstance(e, FileNotFoundError):
        return JobError(f"{key}: file not found: {spec}")
    return JobError(f"{key}: {e}")


def resolve_label_spec(cfg: PipelineConfig, s3: pio.S3Options):
    """Class names and templates, resolved on the driver and shipped to the actors as lists."""
    from clip_core.prompts import resolve_classes, resolve_templates

    from .label import LabelSpec

    demo = cfg.model.checkpoint == "demo"
    class_spec = cfg.label.classes
    if class_spec == "auto":  # meaningful labels by default: the demo model only knows its shapes
        class_spec = "demo" if demo else "imagenet"
    template_spec = cfg.label.templates
    if template_spec is None:
        template_spec = "demo" if demo else "seed"
    try:
        classes = _with_local_copy(class_spec, s3, resolve_classes)
    except Exception as e:
        raise _spec_error("label.classes", cfg.label.classes, e) from e
    try:
        templates = _with_local_copy(template_spec, s3, resolve_templates)
    except Exception as e:
        raise _spec_error("label.templates", cfg.label.templates, e) from e
    return LabelSpec(classes=classes, templates=templates, top_k=cfg.label.top_k)


def resolve_caption_vocabulary(cfg: PipelineConfig, s3: pio.S3Options) -> dict:
    """The caption vocabulary as a validated mapping (shipped to the actors)."""
    from clip_core.captions import CaptionSpec

    voc = cfg.caption.vocabulary
    try:
        if voc is None:
            voc = "demo" if cfg.model.checkpoint == "demo" else "seed"
        if isinstance(voc, str) and voc.strip().lower() in ("seed", "default", "demo"):
            spec = CaptionSpec.named(voc)
        elif isinstance(voc, dict):
            spec = CaptionSpec.from_dict(voc)
        else:
            spec = _with_local_copy(voc, s3, CaptionSpec.from_yaml)
    except Exception as e:
        raise _spec_error("caption.vocabulary", voc, e) from e
    return spec.to_dict()


def _expects_gpu_actors(cfg: PipelineConfig) -> bool:
    """Whether the model actors will most likely run on GPUs (before Ray tells us for sure)."""
    gpus = cfg.embed.num_gpus
    if gpus != "auto":
        return float(gpus) > 0
    import torch

    return torch.cuda.is_available()


def load_driver_encoder(cfg: PipelineConfig, s3: pio.S3Options):
    """Load the model once on the driver (CPU): fail fast, and learn what the stages need."""
    from .embed import ModelSpec, load_job_encoder

    backend = cfg.model.backend
    if backend == "auto" and _expects_gpu_actors(cfg):
        backend = "torch"  # what GPU actors will resolve "auto" to: no ONNX export on the driver
    spec = ModelSpec(cfg.model.checkpoint, backend, cfg.model.precision, device="cpu", s3=s3)
    try:
        return load_job_encoder(spec)
    except ImportError as e:
        raise JobError(f"cannot load model {cfg.model.checkpoint!r} with backend {cfg.model.backend!r}: {e}") from e
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JobError(f"cannot load model {cfg.model.checkpoint!r} (backend {cfg.model.backend}): {msg}") from e


def encoder_tokenizer(encoder: Any):
    """The encoder's own tokenizer (picklable; export directories may carry their own
    vocabulary), called as ``(texts, context_length=, truncate=)`` in the decode tasks."""
    for name in ("tokenizer", "_tokenizer"):
        tok = getattr(encoder, name, None)
        if tok is not None and callable(tok) and not hasattr(tok, "__self__"):
            return tok
    from clip_core.tokenizer import get_default_tokenizer

    return get_default_tokenizer()


def redacted_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config for ``_run.json``, without S3 credentials."""
    data = cfg.to_dict()
    for key in ("access_key_id", "secret_access_key"):
        if data["s3"].get(key):
            data["s3"][key] = "<redacted>"
    return data


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("clip-etl", "ray", "torch", "numpy", "pyarrow", "pillow", "onnxruntime", "faiss-cpu", "s3fs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def run_job(cfg: PipelineConfig, job: str = "run", *, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run one job (``run``, ``embed``, ``label``, ``caption`` or ``index``); returns the run record.

    Raises :class:`JobError` (or :class:`~pipelines.config.ConfigError`) for job-level failures.
    """
    cfg = apply_job(cfg, job)
    if job == "index":
        return run_index_only(cfg, log=log)
    return _run_pipeline(cfg, job, log)


def _run_pipeline(cfg: PipelineConfig, job: str, log: Callable[[str], None]) -> dict[str, Any]:
    from .reader import ManifestError, build_manifest, check_ids, diff_plans, plan_shards, plan_to_dict

    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat()
    timings: dict[str, Any] = {}
    s3 = cfg.s3_options()
    out = cfg.output.path
    results_dir = pio.join(out, RESULTS_DIR)
    if not cfg.input.path:
        raise ConfigError("config key 'input.path' is required (the manifest Parquet file, folder, glob or s3:// URI)")

    # 1. manifest
    t0 = time.perf_counter()
    try:
        manifest = build_manifest(
            cfg.input.path,
            id_column=cfg.input.id_column,
            image_column=cfg.input.image_column,
            text_column=cfg.input.text_column,
            passthrough=cfg.output.passthrough,
            embed_images=cfg.embed.images,
            embed_texts=cfg.embed.texts,
            s3=s3,
        )
        shards = plan_shards(manifest.files, cfg.output.shard_size, cfg.input.max_rows)
        if cfg.input.check_unique_ids:
            check_ids(manifest, shards, s3)
    except ManifestError as e:
        raise JobError(str(e)) from e
    timings["manifest_s"] = round(time.perf_counter() - t0, 3)
    planned_rows = sum(s.num_rows for s in shards)

    # 2. model and text-side settings
    t0 = time.perf_counter()
    encoder = load_driver_encoder(cfg, s3)
    do_images = manifest.image_column is not None
    do_texts = manifest.text_column is not None
    do_label = cfg.label.enabled and do_images
    do_caption = cfg.caption.enabled and do_images
    label_spec = resolve_label_spec(cfg, s3) if do_label else None
    vocabulary = resolve_caption_vocabulary(cfg, s3) if do_caption else None
    model_info = _model_info(encoder)
    timings["model_check_s"] = round(time.perf_counter() - t0, 3)
    notes = []
    if cfg.label.enabled and not do_label:
        notes.append("label stage skipped: the manifest has no image column")
    if cfg.caption.enabled and not do_caption:
        notes.append("caption stage skipped: the manifest has no image column")

    # 3. plan
    settings = {
        "columns": {"id": manifest.id_column, "image": manifest.image_column, "text": manifest.text_column,
                    "passthrough": manifest.passthrough},
        "model": {"fingerprint": model_info.get("fingerprint"), "backend": cfg.model.backend,
                  "precision": cfg.model.precision},
        "label": None if label_spec is None else {
            "classes": _sha(label_spec.classes), "templates": _sha(label_spec.templates),
            "num_classes": len(label_spec.classes), "top_k": label_spec.top_k},
        "caption": None if vocabulary is None else {"vocabulary": _sha(vocabulary)},
        "decode": {"max_pixels": cfg.decode.max_pixels, "max_image_bytes": cfg.decode.max_image_bytes,
                   "exif_transpose": cfg.decode.exif_transpose, "truncate_text": cfg.decode.truncate_text},
    }
    plan = plan_to_dict(manifest, shards, cfg.output.shard_size, cfg.input.max_rows, settings)
    plan_path = pio.join(out, PLAN_FILE)
    try:
        old_plan = pio.read_json(plan_path, s3) if pio.exists(plan_path, s3) else None
    except Exception as e:
        raise JobError(f"cannot read {plan_path}: {e}") from e
    why = diff_plans(old_plan, plan) if old_plan is not None else None
    if why and _has_parts(results_dir, s3):
        raise JobError(
            f"output {out} was started with a different plan ({why}); use a new output.path, "
            "or delete the old output to start over"
        )
    if old_plan is None or why:
        if why:
            log(f"[clip-etl] replacing the plan of an output with no results yet ({why})")
        pio.write_json_atomic(plan_path, plan, s3)

    from .writer import (
        ShardWriter,
        clean_stale_temp_files,
        committed_parts,
        result_schema,
        summarize_results,
    )

    done = committed_parts(results_dir, shards, s3)
    pending = [s for s in shards if s.index not in done]
    done_rows = sum(s.num_rows for s in shards if s.index in done)
    success_path = pio.join(out, SUCCESS_FILE)
    index_dir = pio.join(out, INDEX_DIR)
    need_index = cfg.index.enabled and (bool(pending) or not pio.exists(pio.join(index_dir, "index.json"), s3))
    if pending or need_index:
        pio.remove(success_path, s3)
    clean_stale_temp_files(results_dir)
    log(
        f"[clip-etl] {job}: {planned_rows} rows in {len(shards)} shards from {len(manifest.files)} manifest "
        f"file(s); {len(done)} shards already committed, {len(pending)} to do -> {out}"
    )

    # 4. the Ray pipeline
    schema = result_schema(manifest, int(encoder.embed_dim), images=do_images, texts=do_texts,
                           label=do_label, caption=do_caption)
    ray_info: dict[str, Any] = {}
    writer = None
    if pending:
        writer = ShardWriter(results_dir, pending, schema, s3=s3, total_rows=planned_rows, done_rows=done_rows, log=log)
        ray_info = _process(cfg, manifest, pending, encoder, writer, s3,
                            do_images=do_images, do_texts=do_texts, label_spec=label_spec,
                            vocabulary=vocabulary, timings=timings)
    else:
        log("[clip-etl] nothing to process: every shard is committed")

    # 5. counts, index, run record, _SUCCESS
    t0 = time.perf_counter()
    counts = summarize_results(results_dir, shards, s3)
    timings["summarize_s"] = round(time.perf_counter() - t0, 3)
    counts = {"rows_in": planned_rows, **counts, "shards": len(shards), "shards_resumed": len(done),
              "shards_this_run": len(pending), "rows_this_run": writer.rows_written if writer else 0}
    if counts["rows_out"] != planned_rows:
        raise JobError(f"results hold {counts['rows_out']} rows but the manifest plan has {planned_rows}")

    actor_models = ray_info.get("actor_models") or []
    if len(actor_models) == 1:
        # the model that produced this run's embeddings (device/precision resolved on the actors)
        model_info = {**model_info, **actor_models[0], "checked_on_driver": {
            k: model_info.get(k) for k in ("fingerprint", "device", "precision")}}

    index_summary = None
    if need_index and counts["rows_out"] == 0:
        notes.append("index skipped: the results are empty")
        index_summary = {"skipped": "the results are empty"}
    elif need_index:
        t0 = time.perf_counter()
        index_summary = _build_index(cfg, results_dir, index_dir, s3, model_info, log)
        timings["index_s"] = round(time.perf_counter() - t0, 3)
    elif cfg.index.enabled:
        index_summary = {"skipped": "index is up to date"}
    timings["total_s"] = round(time.perf_counter() - t_start, 3)

    record = {
        "job": job,
        "status": "succeeded",
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "config": redacted_config(cfg),
        "versions": versions(),
        "model": model_info,
        "stages": {"images": do_images, "texts": do_texts, "label": do_label, "caption": do_caption,
                   "index": cfg.index.enabled},
        "counts": counts,
        "timings": timings,
        "ray": ray_info,
        "index": index_summary,
        "notes": notes,
        "output": {"results": results_dir, "index": index_dir if cfg.index.enabled else None},
    }
    pio.write_json_atomic(pio.join(out, RUN_FILE), record, s3)
    pio.write_bytes_atomic(success_path, b"", s3)
    log(
        f"[clip-etl] done: {counts['rows_out']} rows ({counts['ok']} ok, {counts['error']} error) in "
        f"{timings['total_s']:.1f}s -> {out}"
    )
    return record


def _has_parts(results_dir: str, s3: pio.S3Options) -> bool:
    try:
        return bool(pio.list_files(results_dir, suffix=".parquet", s3=s3))
    except FileNotFoundError:
        return False


def _model_info(encoder: Any) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        info.update(encoder.info())
    except Exception:
        pass
    for key in ("fingerprint", "embed_dim", "image_size", "context_length", "backend", "precision"):
        if key not in info and hasattr(encoder, key):
            info[key] = getattr(encoder, key)
    return json.loads(json.dumps(info, default=str))


def _process(cfg, manifest, pending, encoder, writer, s3, *, do_images, do_texts, label_spec, vocabulary,
             timings) -> dict[str, Any]:
    """Stream the pending shards through decode and the actor pool into the writer."""
    from .decode import DECODE_ENV, DecodeOptions, decode_dataset
    from .embed import ModelSpec, StageSpec, embed_dataset
    from .ray_runtime import actor_gpus, ray_session
    from .reader import read_dataset

    t0 = time.perf_counter()
    with ray_session(cfg.ray) as session:
        timings["ray_start_s"] = round(time.perf_counter() - t0, 3)
        gpus = actor_gpus(cfg.embed.num_gpus, session)
        drop = (manifest.image_column,) if manifest.image_is_bytes and manifest.image_column not in manifest.passthrough else ()
        opts = DecodeOptions(
            image_column=manifest.image_column,
            text_column=manifest.text_column,
            manifest_dirs=manifest.manifest_dirs(),
            transform=encoder.preprocess,
            tokenizer=encoder_tokenizer(encoder),
            context_length=int(encoder.context_length),
            drop_columns=tuple(c for c in drop if c),
            max_pixels=cfg.decode.max_pixels,
            max_image_bytes=cfg.decode.max_image_bytes,
            exif_transpose=cfg.decode.exif_transpose,
            truncate_text=cfg.decode.truncate_text,
            io_threads=cfg.decode.io_threads,
            s3=s3,
        )
        model = ModelSpec(
            cfg.model.checkpoint, cfg.model.backend, cfg.model.precision,
            device="auto" if gpus > 0 else "cpu",
            num_threads=max(1, int(cfg.embed.num_cpus)) if gpus == 0 else None,
            s3=s3,
        )
        stages = StageSpec(images=do_images, texts=do_texts, label=label_spec,
                           caption=vocabulary is not None, caption_vocabulary=vocabulary)
        ds = read_dataset(manifest, pending, s3, runtime_env={"env_vars": DECODE_ENV})
        ds = decode_dataset(ds, opts, batch_size=cfg.decode.batch_size, num_cpus=cfg.decode.num_cpus,
                            concurrency=cfg.decode.concurrency)
        ds = embed_dataset(ds, model, stages, actors=cfg.embed.actors, batch_size=cfg.embed.batch_size,
                           num_cpus=cfg.embed.num_cpus, num_gpus=gpus)
        t1 = time.perf_counter()
        writer.start()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(batch)
        writer.finish()
        timings["process_s"] = round(time.perf_counter() - t1, 3)
        timings["stage_busy_s"] = {k: round(v, 3) for k, v in sorted(writer.stage_seconds.items())}
        timings["stage_busy_s"]["write"] = round(writer.write_seconds, 3)
        if timings["process_s"] > 0:
            timings["rows_per_s"] = round(writer.rows_written / timings["process_s"], 2)
        actor_models = [json.loads(m) for m in sorted(writer.actor_models)]
        return {**session.to_dict(), "actors": cfg.embed.actors, "gpus_per_actor": gpus,
                "actor_models": actor_models}


def _build_index(cfg, results_dir, index_dir, s3, model_info, log) -> dict[str, Any]:
    try:
        from .index_build import build_index
    except ImportError as e:
        raise JobError(f"index stage unavailable ({e}); set index.enabled=false") from e
    log(f"[clip-etl] building the index from {results_dir} -> {index_dir}")
    try:
        summary = build_index(
            results_dir,
            index_dir,
            id_column="id",
            embedding_column=cfg.index.embedding_column,
            factory=cfg.index.factory,
            shards=cfg.index.shards,
            vectors_per_shard=cfg.index.vectors_per_shard,
            memory_budget_gb=cfg.index.memory_budget_gb,
            target_recall=cfg.index.target_recall,
            merge=cfg.index.merge,
            s3=s3,
            model_info=model_info,
            progress=True,
        )
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JobError(f"index build failed: {msg}") from e
    return json.loads(json.dumps(summary, default=str)) if isinstance(summary, dict) else {"result": str(summary)}


def run_index_only(cfg: PipelineConfig, *, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """``clip-etl index``: build ``OUTPUT/index/`` from the existing ``OUTPUT/results/``."""
    s3 = cfg.s3_options()
    out = cfg.output.path
    results_dir = pio.join(out, RESULTS_DIR)
    try:
        parts = pio.list_files(results_dir, suffix=".parquet", s3=s3)
    except FileNotFoundError:
        parts = []
    if not parts:
        raise JobError(f"no results to index under {results_dir}; run `clip-etl run` or `clip-etl embed` first")
    if not pio.exists(pio.join(out, SUCCESS_FILE), s3):
        log(f"[clip-etl] warning: {out} has no _SUCCESS; indexing the {len(parts)} committed part(s) there")
    model_info = None
    run_path = pio.join(out, RUN_FILE)
    if pio.exists(run_path, s3):
        try:
            model_info = pio.read_json(run_path, s3).get("model")
        except Exception:
            model_info = None
    t0 = time.perf_counter()
    summary = _build_index(cfg, results_dir, pio.join(out, INDEX_DIR), s3, model_info, log)
    log(f"[clip-etl] index built in {time.perf_counter() - t0:.1f}s -> {pio.join(out, INDEX_DIR)}")
    return {"job": "index", "status": "succeeded", "index": summary}


__all__ = ["JobError", "run_job", "run_index_only", "versions"]

"""The batch job: the driver plans, coordinates and records; Ray workers carry the data.

This is the only place the stages are wired together, in the order the data meets them. Every
job-level failure happens before compute is spent and says what is wrong in one line:

1. config values (:mod:`pipelines.config`), then the manifest's files and columns, from footers;
2. the output lease (:mod:`pipelines.etl.lease`): a second live run into the same output is refused;
3. Ray; the model resolved once for the actors (:mod:`pipelines.etl.model`) and loaded on the driver
   to prove it loads; ids checked for nulls and duplicates in Ray tasks;
4. the shard plan, compared with ``OUTPUT/_plan.json`` of an earlier run into the same output:
   different input, settings or resolved model refuse to mix results;
5. read (pending shards) -> decode (CPU tasks) -> embed/label/caption (actor pool) -> write
   pieces (CPU tasks, :mod:`pipelines.etl.write`); the driver sees one metadata row per piece and
   commits each covered shard with a compaction task (:mod:`pipelines.etl.commit`);
6. counts from the commits and the part footers, the index (when on), ``OUTPUT/_run.json``
   and, last, ``OUTPUT/_SUCCESS``.

Re-running into the same output resumes: committed parts are kept untouched, the other shards
are processed, and ``_SUCCESS`` is written only when every shard is committed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from pipelines import storage as pio
from pipelines.config import ConfigError, PipelineConfig, apply_job
from pipelines.curation.filter import FILTER_DIR
from pipelines.report.summary import summary_table

RESULTS_DIR = "results"
INDEX_DIR = "index"
DEDUP_DIR = "dedup"  # = pipelines.curation.dedup.DEDUP_DIR
PLAN_FILE = "_plan.json"
RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
RUN_LABELS = 30  # labels named in _run.json's counts (the rest summed as "(other)")


class JobError(RuntimeError):
    """A job-level failure: the job stops and the CLI prints this message as one line."""


def _import_torch_in_background() -> None:
    """Import torch (seconds of CPU) in a thread while Ray starts (seconds, mostly spent waiting on
    its processes), so the model check that follows finds it imported. A failed import is left to
    that check, which reports it."""
    def _import() -> None:
        try:
            importlib.import_module("torch")
        except Exception:  # noqa: BLE001 - reported by the model check's own import
            pass

    threading.Thread(target=_import, name="clip-etl-import-torch", daemon=True).start()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Driver-side preparation
# --------------------------------------------------------------------------------------------
def _with_local_copy(spec: Any, s3: pio.S3Options, parse: Callable[[Any], Any]) -> Any:
    """Run ``parse`` on ``spec``; an ``s3://`` file is first copied to a temporary local file
    (clip_core parses local files only) that is removed afterwards. The copy keeps the file's
    extension (``.txt`` when it has none): the parsers tell JSON from plain lists by it."""
    if not (isinstance(spec, str) and pio.is_s3(spec)):
        return parse(spec)
    import os
    import tempfile

    suffix = os.path.splitext(spec)[1] or ".txt"
    with tempfile.TemporaryDirectory(prefix="clip-etl-") as tmp:
        return parse(pio.fetch_to_local(spec, os.path.join(tmp, "spec" + suffix), s3))


def _spec_error(key: str, spec: Any, e: Exception) -> JobError:
    if isinstance(e, FileNotFoundError):
        return JobError(f"{key}: file not found: {spec}")
    return JobError(f"{key}: {e}")


def resolve_label_spec(cfg: PipelineConfig, s3: pio.S3Options):
    """Class names and templates, resolved on the driver and shipped to the actors as lists."""
    from clip_core.prompts import resolve_classes, resolve_templates

    from pipelines.etl.label import LabelSpec

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


def load_driver_encoder(cfg: PipelineConfig, s3: pio.S3Options, backend: str, precision: str):
    """Load the model once on the driver (CPU): fail fast, and learn what the stages need."""
    from pipelines.etl.embed import ModelSpec, load_job_encoder

    spec = ModelSpec(cfg.model.checkpoint, backend, precision, device="cpu", s3=s3)
    try:
        return load_job_encoder(spec)
    except ImportError as e:
        raise JobError(f"cannot load model {cfg.model.checkpoint!r} with backend {backend!r}: {e}") from e
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JobError(f"cannot load model {cfg.model.checkpoint!r} (backend {backend}): {msg}") from e


def encoder_tokenizer(encoder: Any):
    """The encoder's own tokenizer (picklable; export directories may carry their own
    vocabulary), called as ``(texts, context_length=, truncate=)`` in the decode tasks."""
    for name in ("tokenizer", "_tokenizer"):
        tok = getattr(encoder, name, None)
        if tok is not None and callable(tok) and not hasattr(tok, "__self__"):
            return tok
    from clip_core.tokenizer import get_default_tokenizer

    return get_default_tokenizer()


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
def run_job(cfg: PipelineConfig, job: str = "run", *, log: Callable[[str], None] = _log,
            progress: bool | None = None) -> dict[str, Any]:
    """Run one job (``run``, ``embed``, ``label``, ``caption``, ``index`` or ``dedup``); returns the run record.

    ``progress``: Ray Data's progress bars (default: when stderr is a terminal). Raises
    :class:`JobError` (or :class:`~pipelines.config.ConfigError`) for job-level failures.
    """
    cfg = apply_job(cfg, job)
    if job == "index":
        return run_index_only(cfg, log=log)
    if job == "dedup":
        return run_dedup_only(cfg, log=log)
    return _run_pipeline(cfg, job, log, sys.stderr.isatty() if progress is None else progress)


@dataclass
class _Run:
    """What the steps of one run share; all of it small (no rows, pixels or embeddings)."""

    cfg: PipelineConfig
    job: str
    log: Callable[[str], None]
    s3: pio.S3Options
    progress: bool = False  # Ray Data's progress bars
    run_id: str = field(default_factory=pio.unique_suffix)
    timings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lease: Any = None
    cpus: Any = None  # ray_runtime.StageCpus: what each model actor and decode task reserves
    decode_in_actors: bool = False  # the model actors decode their own batches (CPU actors)
    s3_requests: Counter = field(default_factory=Counter)  # the workers' S3 attempts and failures
    driver_s3_before: Counter = field(default_factory=pio.s3_request_counts)  # this process, at start

    @property
    def out(self) -> str:
        """The output root; a local one made absolute, since workers on other nodes write into it."""
        path = self.cfg.output.path
        return path if pio.is_s3(path) else pio.strip_scheme(path)

    def path(self, *parts: str) -> str:
        return pio.join(self.out, *parts)

    @property
    def tmp_prefix(self) -> str:
        """Temp files carry the run id: cleanup can tell a dead run's from a live one's."""
        from pipelines.etl.lease import temp_prefix

        return temp_prefix(self.run_id)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - t0, 3)


@dataclass
class _Stages:
    """Which outputs this run produces, resolved on the driver and shipped to the actors."""

    images: bool
    texts: bool
    label: Any  # LabelSpec or None
    vocabulary: dict | None  # caption vocabulary, or None when captions are off
    heads: list = field(default_factory=list)  # pipelines.curation.heads.HeadSpec of each heads: item

    @property
    def caption(self) -> bool:
        return self.vocabulary is not None


def _run_pipeline(cfg: PipelineConfig, job: str, log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """The steps in the order the data meets them; every job-level check comes before compute."""
    from pipelines.etl.embed import actor_threads
    from pipelines.etl.lease import LeaseHeldError, OutputLease
    from pipelines.etl.write import committed_parts
    from pipelines.ray_runtime import actor_gpus, decode_in_actors, ray_session, stage_cpus

    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat()
    run = _Run(cfg, job, log, cfg.s3_options(), progress)
    if not cfg.input.path:
        raise ConfigError("config key 'input.path' is required (the manifest Parquet file, folder, glob or s3:// URI)")
    with run.timed("manifest_s"):
        manifest, shards = _read_manifest(run)
    heads = _load_heads(run, manifest)
    try:
        lease = OutputLease(run.out, run.s3, timeout_s=cfg.output.lease_timeout_s, run_id=run.run_id).acquire()
    except LeaseHeldError as e:
        raise JobError(str(e)) from e
    except Exception as e:  # a missing bucket, refused credentials: the first write to the output
        raise JobError(f"cannot write to output {run.out}: {type(e).__name__}: {e}") from e
    with lease:  # heartbeats until the run ends, then released
        run.lease = lease
        stack = ExitStack()
        _import_torch_in_background()
        with run.timed("ray_start_s"):
            session = stack.enter_context(ray_session(cfg.ray))
        with stack:
            gpus = actor_gpus(cfg.embed.num_gpus, session)
            run.decode_in_actors = decode_in_actors(cfg.decode.placement, gpus)
            run.cpus = stage_cpus(cfg.embed.num_cpus, cfg.decode.num_cpus, gpus, cfg.embed.actors, session,
                                  run.decode_in_actors)
            with run.timed("model_check_s"):
                resolved, encoder = _resolve_model(run, gpus)
            _check_head_dims(run, heads, encoder)
            if shards is None:  # webdataset: Ray tasks count the tars' samples and check their keys
                with run.timed("tar_index_s"):
                    manifest, shards = _index_tars(run, manifest)
            else:
                with run.timed("id_check_s"):
                    _check_ids(run, manifest, shards)
            stages = replace(_stage_specs(run, manifest), heads=heads)
            if cfg.output.overwrite:
                _discard_output(run)
            _check_plan(run, manifest, shards, resolved, stages)
            done = committed_parts(run.path(RESULTS_DIR), shards, run.s3)
            pending = [s for s in shards if s.index not in done]
            need_index = _prepare_output(run, shards, done, pending)
            committed, ray_info = {}, {**session.to_dict(), "actors": cfg.embed.actors, "gpus_per_actor": gpus,
                                       "cpus_per_actor": run.cpus.actor,
                                       "decode": "actors" if run.decode_in_actors else "tasks",
                                       "cpus_per_decode_task": None if run.decode_in_actors else run.cpus.decode}
            if pending:
                committed, info = _process(run, manifest, shards, pending, encoder, resolved, stages, gpus)
                ray_info.update(info)
            else:
                log("[clip-etl] nothing to process: every shard is committed")
            counts = _counts(run, shards, done, committed, resolved)
            model_info = {**_model_info(encoder), **resolved.to_dict(), "actor_cpu": resolved.cpu,
                          "num_threads": actor_threads(run.cpus.actor) if gpus == 0 else None}
            steps = {"index": _index_step(run, need_index, counts, model_info), "dedup": _dedup_step(run, counts),
                     "filter": _filter_step(run, bool(committed))}
        # the record and _SUCCESS are written while the lease is held: no other run can interleave
        run.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        record = _run_record(run, started_at, model_info, stages, counts, ray_info, steps)
        _publish(run, record)
    return record


def _run_record(run: _Run, started_at: str, model_info: dict, stages: _Stages, counts: dict, ray_info: dict,
                steps: dict[str, Any]) -> dict[str, Any]:
    """``_run.json``: what ran, on what, with which counts, timings and step summaries (config redacted)."""
    cfg = run.cfg
    return {
        "job": run.job, "status": "succeeded", "run_id": run.run_id, "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(), "config": cfg.to_dict(redact=True),
        "versions": versions(), "model": model_info,
        "stages": {"images": stages.images, "texts": stages.texts, "label": stages.label is not None,
                   "caption": stages.caption, "index": cfg.index.enabled,
                   "clip_score": stages.images and stages.texts, "heads": [h.name for h in stages.heads]},
        "counts": counts, "timings": run.timings, "ray": ray_info, **steps, "notes": run.notes,
        "s3_requests": {"driver": pio.s3_requests_since(run.driver_s3_before), "workers": dict(run.s3_requests)},
        "output": {"results": run.path(RESULTS_DIR), "index": run.path(INDEX_DIR) if cfg.index.enabled else None},
    }


def _publish(run: _Run, record: dict[str, Any]) -> None:
    """Write the run record, the report page, then ``_SUCCESS`` (last: it says the rest is complete)."""
    pio.write_json_atomic(run.path(RUN_FILE), record, run.s3)
    report = write_run_report(run.out, run.s3, run.log)
    pio.write_bytes_atomic(run.path(SUCCESS_FILE), b"", run.s3)
    counts = record["counts"]
    run.log(f"[clip-etl] done: {counts['rows_out']} rows ({counts['ok']} ok, {counts['error']} error) in "
            f"{run.timings['total_s']:.1f}s -> {run.out}")
    run.log(summary_table(record, report))


def write_run_report(out: str, s3: pio.S3Options, log: Callable[[str], None]) -> str | None:
    """``OUTPUT/report.html``; a finished job never fails for its report, it warns instead."""
    from pipelines.report import write_report

    try:
        return write_report(out, s3)
    except Exception as e:
        log(f"[clip-etl] warning: the run report could not be written: {_first_line(e)}")
        return None


def _load_heads(run: _Run, manifest) -> list:
    """Step 1b: a filter needs clip_score; every ``heads:`` file is read on the driver (its arrays
    go to the actors), its input present and its column name free: all before the lease and Ray."""
    from pipelines.curation.heads import HeadError, load_head
    from pipelines.etl.write import result_schema

    if run.cfg.filter.enabled and not (manifest.image_column and manifest.text_column):
        raise JobError("filter.min_clip_score / filter.top_fraction need clip_score, which needs both an image "
                       "and a text column; the manifest has only one")
    if not run.cfg.heads:
        return []
    taken = set(result_schema(manifest, 1, images=True, texts=True, label=True, caption=True).names)
    has = {"image_embedding": manifest.image_column is not None, "text_embedding": manifest.text_column is not None}
    heads = []
    for i, h in enumerate(run.cfg.heads):
        if h.name in taken:
            raise JobError(f"heads[{i}].name: {h.name!r} is already a results column; name the head otherwise")
        if not has[h.input]:
            raise JobError(f"heads[{i}] {h.name!r} reads {h.input}, but the manifest has no "
                           f"{'image' if h.input == 'image_embedding' else 'text'} column")
        try:
            heads.append(load_head(h, run.s3))
        except (HeadError, OSError) as e:
            raise JobError(f"heads[{i}] {h.name!r}: {e}") from e
    return heads


def _check_head_dims(run: _Run, heads: list, encoder: Any) -> None:
    """Each head's input dimension against the model's, on the driver before any work."""
    dim = int(encoder.embed_dim)
    for h in heads:
        if h.in_dim != dim:
            raise JobError(f"head {h.name!r} ({h.source}) takes {h.in_dim}-dim input but model "
                           f"{run.cfg.model.checkpoint!r} gives {dim}-dim embeddings")


def _filter_step(run: _Run, results_changed: bool) -> dict | None:
    """Step 9: ``OUTPUT/filter/`` from the committed results, when a filter is set. A global
    decision, so it is redone whole each run; with no filter set, a filter folder that the new
    shards of this run made stale is removed."""
    from pipelines.curation.filter import run_filter

    f = run.cfg.filter
    if not f.enabled:
        if results_changed and pio.exists(run.path(FILTER_DIR), run.s3):
            pio.remove_tree(run.path(FILTER_DIR), run.s3)
            run.notes.append("removed OUTPUT/filter/: it did not cover this run's new shards")
        return None
    with run.timed("filter_s"):
        return run_filter(run.path(RESULTS_DIR), run.path(FILTER_DIR), f.min_clip_score, f.top_fraction,
                          run.s3, run.tmp_prefix, run.log)


def _read_manifest(run: _Run):
    """Step 1: the manifest's files and columns (footers only) and the shard plan; for tar shards
    the files only (the plan needs their samples counted: :func:`_index_tars`, once Ray is up)."""
    from pipelines.etl.read import ManifestError, build_manifest, plan_shards
    from pipelines.etl.webdataset import tar_manifest

    cfg = run.cfg
    if cfg.input.format == "webdataset":
        try:
            return tar_manifest(cfg.input.path, passthrough=cfg.output.passthrough, embed_images=cfg.embed.images,
                                embed_texts=cfg.embed.texts, s3=run.s3), None
        except ManifestError as e:
            raise JobError(str(e)) from e
    try:
        manifest = build_manifest(
            cfg.input.path, id_column=cfg.input.id_column, image_column=cfg.input.image_column,
            text_column=cfg.input.text_column, passthrough=cfg.output.passthrough,
            embed_images=cfg.embed.images, embed_texts=cfg.embed.texts, s3=run.s3)
    except ManifestError as e:
        raise JobError(str(e)) from e
    return manifest, plan_shards(manifest.files, cfg.output.shard_size, cfg.input.max_rows)


def _resolve_model(run: _Run, gpus: float):
    """Step 2: the one model of this run, resolved for the actors (see :mod:`pipelines.etl.model`)."""
    from pipelines.etl.model import resolve_model

    try:
        return resolve_model(run.cfg, gpus, run.s3,
                             lambda backend, precision: load_driver_encoder(run.cfg, run.s3, backend, precision))
    except JobError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JobError(f"cannot resolve model {run.cfg.model.checkpoint!r} for the actors: {msg}") from e


def _index_tars(run: _Run, manifest):
    """Step 3 for tar shards: their samples counted and keys checked in Ray tasks, and the plan."""
    from pipelines.etl.read import ManifestError
    from pipelines.etl.webdataset import index_tars

    try:
        return index_tars(manifest, max_rows=run.cfg.input.max_rows, check_ids=run.cfg.input.check_unique_ids,
                          s3=run.s3)
    except ManifestError as e:
        raise JobError(str(e)) from e


def _check_ids(run: _Run, manifest, shards) -> None:
    from pipelines.etl.read import ManifestError, check_ids

    if run.cfg.input.check_unique_ids:
        try:
            check_ids(manifest, shards, run.s3)
        except ManifestError as e:
            raise JobError(str(e)) from e


def _stage_specs(run: _Run, manifest) -> _Stages:
    """Step 3: which outputs the actors make, with their class names and caption vocabulary."""
    cfg = run.cfg
    images, texts = manifest.image_column is not None, manifest.text_column is not None
    label = resolve_label_spec(cfg, run.s3) if cfg.label.enabled and images else None
    vocabulary = resolve_caption_vocabulary(cfg, run.s3) if cfg.caption.enabled and images else None
    for stage in ("label", "caption"):
        if getattr(cfg, stage).enabled and not images:
            run.notes.append(f"{stage} stage skipped: the manifest has no image column")
    return _Stages(images, texts, label, vocabulary)


def _check_plan(run: _Run, manifest, shards, resolved, stages: _Stages) -> None:
    """Step 4: this run's plan against the one an earlier run left in the output."""
    from pipelines.etl.read import diff_plans, plan_to_dict

    cfg, label = run.cfg, stages.label
    settings = {
        "columns": {"id": manifest.id_column, "image": manifest.image_column, "text": manifest.text_column,
                    "passthrough": manifest.passthrough},
        "model": resolved.to_dict(),
        "label": None if label is None else {
            "classes": _sha(label.classes), "templates": _sha(label.templates),
            "num_classes": len(label.classes), "top_k": label.top_k},
        "caption": None if stages.vocabulary is None else {"vocabulary": _sha(stages.vocabulary)},
        "decode": {"max_pixels": cfg.decode.max_pixels, "max_image_bytes": cfg.decode.max_image_bytes,
                   "exif_transpose": cfg.decode.exif_transpose, "jpeg_draft": cfg.decode.jpeg_draft,
                   "truncate_text": cfg.decode.truncate_text,
                   **({"allowed_roots": list(_allowed_roots(cfg.input.allowed_roots))} if cfg.input.allowed_roots else {})},
    }
    # added only when present, so outputs without them keep the plan they were started with
    if stages.images and stages.texts:
        settings["clip_score"] = True
    if stages.heads:
        settings["heads"] = [h.plan_settings() for h in stages.heads]
    plan = plan_to_dict(manifest, shards, cfg.output.shard_size, cfg.input.max_rows, settings)
    plan_path = run.path(PLAN_FILE)
    try:
        old = pio.read_json(plan_path, run.s3) if pio.exists(plan_path, run.s3) else None
    except Exception as e:
        raise JobError(f"cannot read {plan_path}: {e}") from e
    why = diff_plans(old, plan) if old is not None else None
    if why and _has_parts(run.path(RESULTS_DIR), run.s3):
        old_model = (old.get("settings") or {}).get("model")
        if old_model != settings["model"]:
            raise JobError(
                f"output {run.out} holds results of model {json.dumps(old_model, sort_keys=True)}, but this run "
                f"resolves {json.dumps(settings['model'], sort_keys=True)}; set model.backend/model.precision "
                "to what the output was written with, or use a new output.path")
        raise JobError(f"output {run.out} was started with a different plan ({why}); use a new output.path, "
                       "or delete the old output to start over")
    if old is None or why:
        if why:
            run.log(f"[clip-etl] replacing the plan of an output with no results yet ({why})")
        pio.write_json_atomic(plan_path, plan, run.s3)


def _discard_output(run: _Run) -> None:
    """``output.overwrite``: remove what an earlier run left (its parts, pieces, index, plan and
    record) so this run redoes everything. Only after every job-level check has passed, so a
    mistyped command never costs the old output, and under the lease, so no live run is touched."""
    from pipelines.etl.write import PIECES_DIR

    for name in (SUCCESS_FILE, RUN_FILE, PLAN_FILE):
        pio.remove(run.path(name), run.s3)
    for name in (RESULTS_DIR, PIECES_DIR, INDEX_DIR, FILTER_DIR, DEDUP_DIR):
        pio.remove_tree(run.path(name), run.s3)
    run.log(f"[clip-etl] output.overwrite: discarded the earlier results, index and plan in {run.out}")


def _prepare_output(run: _Run, shards, done, pending) -> bool:
    """Step 5: clear what dead runs left (the lease says no other run is alive); returns whether
    the index must be (re)built."""
    from pipelines.etl.write import PIECES_DIR, clean_stale_temp_files

    need_index = run.cfg.index.enabled and (bool(pending) or not pio.exists(run.path(INDEX_DIR, "index.json"), run.s3))
    if pending or need_index:
        pio.remove(run.path(SUCCESS_FILE), run.s3)
    pio.remove_tree(run.path(PIECES_DIR), run.s3)
    clean_stale_temp_files(run.path(RESULTS_DIR), run.run_id)
    planned = sum(s.num_rows for s in shards)
    run.log(f"[clip-etl] {run.job}: {planned} rows in {len(shards)} shards; {len(done)} shards already "
            f"committed, {len(pending)} to do -> {run.out}")
    return need_index


def _process(run: _Run, manifest, shards, pending, encoder, resolved, stages: _Stages, gpus: float):
    """Step 6: read -> decode -> embed -> write pieces on the cluster; the driver commits shards
    from the pieces' metadata. Returns (counts per committed shard, Ray facts for the record)."""
    import ray
    from ray.data import DataContext

    from pipelines.etl.commit import ModelMismatchError, ShardCommitter
    from pipelines.etl.decode import DECODE_ENV, block_rows, decode_dataset
    from pipelines.etl.embed import ModelSpec, StageSpec, actor_threads, embed_dataset, resolve_batch_size
    from pipelines.etl.read import read_dataset
    from pipelines.etl.write import PIECES_DIR, PieceWriter, result_schema, write_pieces

    cfg = run.cfg
    schema = result_schema(manifest, int(encoder.embed_dim), images=stages.images, texts=stages.texts,
                           label=stages.label is not None, caption=stages.caption,
                           heads=[h.field() for h in stages.heads])
    model = ModelSpec(cfg.model.checkpoint, resolved.backend, resolved.precision, device=resolved.device,
                      num_threads=actor_threads(run.cpus.actor) if gpus == 0 else None, s3=run.s3)
    stage_spec = StageSpec(images=stages.images, texts=stages.texts, label=stages.label,
                           caption=stages.caption, caption_vocabulary=stages.vocabulary, heads=stages.heads)
    # bytes images are read with their shard: a smaller read would re-read the shard's row groups
    rows = None if manifest.image_is_bytes else block_rows(int(encoder.image_size) if stages.images else None,
                                                           cfg.decode.batch_size)
    retries = cfg.ray.max_retries
    embed_batch = resolve_batch_size(cfg.embed.batch_size, stages.images, gpus > 0)
    DataContext.get_current().enable_progress_bars = run.progress  # quiet in CI and with --quiet
    # Reads keep the decode tasks' runtime_env even when the actors decode: in the default pool,
    # on a two-node cluster, every write could land on the head node (BENCHMARKS.md).
    ds = read_dataset(manifest, pending, run.s3, runtime_env={"env_vars": DECODE_ENV}, block_rows=rows,
                      max_retries=retries)
    decode = _decode_options(run, manifest, encoder)
    if run.decode_in_actors:
        decode = replace(decode, decode_threads=actor_threads(run.cpus.actor))
    else:
        ds = decode_dataset(ds, decode, batch_size=cfg.decode.batch_size, num_cpus=run.cpus.decode,
                            concurrency=cfg.decode.concurrency, max_retries=retries)
    ds = embed_dataset(ds, model, stage_spec, actors=cfg.embed.actors, batch_size=embed_batch,
                       num_cpus=run.cpus.actor, num_gpus=gpus, decode=decode if run.decode_in_actors else None,
                       max_retries=retries)
    pieces_dir = run.path(PIECES_DIR)
    ds = write_pieces(ds, PieceWriter(pieces_dir, schema, run.tmp_prefix, run.s3), max_retries=retries)
    done_rows = sum(s.num_rows for s in shards) - sum(s.num_rows for s in pending)
    committer = ShardCommitter(run.path(RESULTS_DIR), pieces_dir, pending, schema,
                               expected_encoder=resolved.to_dict(), tmp_prefix=run.tmp_prefix, s3=run.s3,
                               total_rows=sum(s.num_rows for s in shards), done_rows=done_rows, log=run.log,
                               heartbeat=run.lease.check)
    with run.timed("process_s"):
        try:
            for meta in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                committer.add(meta)
                run.lease.check()
            committer.finish()
        except ModelMismatchError as e:
            raise JobError(str(e)) from e
        except (ray.exceptions.ActorDiedError, ray.exceptions.WorkerCrashedError) as e:
            raise JobError(f"a Ray worker of the job kept dying ({retries} retries, ray.max_retries; committed "
                           f"shards are kept, a re-run resumes): {_first_line(e)}") from e
    pio.remove_tree(pieces_dir, run.s3)
    run.timings["stage_busy_s"] = {k: round(v, 3) for k, v in sorted(committer.stage_seconds.items())}
    if run.timings["process_s"] > 0:
        run.timings["rows_per_s"] = round(committer.rows_written / run.timings["process_s"], 2)
    run.s3_requests.update(committer.s3_requests)
    info = {"embed_batch_size": embed_batch, "pieces": committer.pieces_seen, "pieces_per_node": dict(committer.nodes),
            "actor_models": [json.loads(m) for m in sorted(committer.encoders)], "dataset_stats": _stats(ds)}
    return committer.committed, info


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {' '.join(lines[:2])}"[:400]


def _decode_options(run: _Run, manifest, encoder):
    from pipelines.etl.decode import DecodeOptions

    cfg = run.cfg
    drop = (manifest.image_column,) if manifest.image_is_bytes and manifest.image_column not in manifest.passthrough else ()
    return DecodeOptions(
        image_column=manifest.image_column, text_column=manifest.text_column,
        manifest_dirs=manifest.manifest_dirs(), transform=encoder.preprocess,
        tokenizer=encoder_tokenizer(encoder), context_length=int(encoder.context_length),
        drop_columns=tuple(c for c in drop if c), max_pixels=cfg.decode.max_pixels,
        max_image_bytes=cfg.decode.max_image_bytes, exif_transpose=cfg.decode.exif_transpose,
        jpeg_draft=cfg.decode.jpeg_draft, truncate_text=cfg.decode.truncate_text, io_threads=cfg.decode.io_threads,
        timeout_s=cfg.decode.timeout_s, allowed_roots=_allowed_roots(cfg.input.allowed_roots), s3=run.s3)


def _allowed_roots(roots: list[str] | None) -> tuple[str, ...]:
    """Local roots made absolute here (workers run elsewhere); their symlinks resolve on each node."""
    return tuple(r if pio.is_s3(r) else os.path.abspath(os.path.expanduser(r)) for r in roots or ())


def _stats(ds) -> str | None:
    """Ray Data's own per-operator report (timings, rows, object store bytes) for the record."""
    try:
        return ds.stats()
    except Exception:  # stats are a report, never a reason to fail a finished run
        return None


def _counts(run: _Run, shards, done: dict, committed: dict, resolved) -> dict[str, Any]:
    """Step 7: the counts of every part, from its footer or its commit: the data is not re-read."""
    from pipelines.etl.commit import encoder_identity
    from pipelines.etl.write import top_counts

    parts = {**done, **committed}
    causes: Counter = Counter()
    for c in parts.values():
        causes.update(c["errors_by_cause"])
        for enc in c.get("encoders", []):
            if encoder_identity(json.loads(enc)) != encoder_identity(resolved.to_dict()):
                raise JobError(f"a part in {run.path(RESULTS_DIR)} was written by encoder {enc}, not by this "
                               f"run's {json.dumps(resolved.to_dict(), sort_keys=True)}")
    planned = sum(s.num_rows for s in shards)
    counts = {"rows_in": planned, "rows_out": sum(c["rows"] for c in parts.values()),
              "ok": sum(c["ok"] for c in parts.values()), "error": sum(c["error"] for c in parts.values()),
              "errors_by_cause": dict(sorted(causes.items())), "shards": len(shards), "shards_resumed": len(done),
              "shards_this_run": len(committed), "rows_this_run": sum(c["rows"] for c in committed.values())}
    if counts["rows_out"] != planned:
        raise JobError(f"results hold {counts['rows_out']} rows but the manifest plan has {planned}")
    if parts and all("labels" in c for c in parts.values()):  # parts of older runs may lack them
        counts["labels"] = top_counts(sum((Counter(c["labels"]) for c in parts.values()), Counter()), RUN_LABELS)
    return counts


def _index_step(run: _Run, need_index: bool, counts: dict, model_info: dict) -> dict | None:
    """Step 8: the index over the results, when on and not up to date."""
    if need_index and counts["rows_out"] == 0:
        run.notes.append("index skipped: the results are empty")
        return {"skipped": "the results are empty"}
    if need_index:
        with run.timed("index_s"):
            return _build_index(run.cfg, run.path(RESULTS_DIR), run.path(INDEX_DIR), run.s3, model_info, run.log)
    return {"skipped": "index is up to date"} if run.cfg.index.enabled else None


def _dedup_step(run: _Run, counts: dict) -> dict | None:
    """Step 8b (``clip-etl run`` with ``dedup.enabled``): semantic dedup of the committed results,
    unless ``OUTPUT/dedup/`` is complete, made with the same settings, and no row came in since."""
    from pipelines.curation.dedup import DedupError, dedup_results, is_current

    cfg = run.cfg
    if not (cfg.dedup.enabled and run.job == "run"):
        return None
    if counts["rows_out"] == 0:
        run.notes.append("dedup skipped: the results are empty")
        return {"skipped": "the results are empty"}
    if not counts["rows_this_run"] and is_current(run.out, cfg.dedup, run.s3):
        return {"skipped": "dedup is up to date"}
    with run.timed("dedup_s"):
        try:
            return dedup_results(run.out, cfg.dedup, s3=run.s3, ray_config=cfg.ray, log=run.log)
        except DedupError as e:
            raise JobError(f"dedup failed: {e}") from e


def run_dedup_only(cfg: PipelineConfig, *, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """``clip-etl dedup OUTPUT``: write ``OUTPUT/dedup/`` from the existing ``OUTPUT/results/``."""
    from pipelines.curation.dedup import DedupError, dedup_results

    s3 = cfg.s3_options()
    results_dir = pio.join(cfg.output.path, RESULTS_DIR)
    if not _has_parts(results_dir, s3):
        raise JobError(f"no results to deduplicate under {results_dir}; run `clip-etl run` or `clip-etl embed` first")
    if not pio.exists(pio.join(cfg.output.path, SUCCESS_FILE), s3):
        log(f"[clip-etl] warning: {cfg.output.path} has no _SUCCESS; deduplicating the committed part(s) there")
    try:
        summary = dedup_results(cfg.output.path, cfg.dedup, s3=s3, ray_config=cfg.ray, log=log)
    except DedupError as e:
        raise JobError(str(e)) from e
    return {"job": "dedup", "status": "succeeded", "dedup": summary}


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


def _build_index(cfg, results_dir, index_dir, s3, model_info, log) -> dict[str, Any]:
    try:
        from pipelines.index.build import build_index
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
            tuning_query_file=cfg.index.tuning_queries,
            merge=cfg.index.merge,
            s3=s3,
            ray_config=cfg.ray,
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
    if model_info is not None:  # the output's report shows the new index
        write_run_report(out, s3, log)
    return {"job": "index", "status": "succeeded", "index": summary}


__all__ = ["JobError", "run_job", "run_dedup_only", "run_index_only", "versions"]

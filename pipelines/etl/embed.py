"""Stage 3: the model actors — image and text embeddings, then labels and captions.

Why a callable class on an actor pool: loading a CLIP checkpoint (and encoding every class prompt
and caption sentence) takes seconds to minutes, so it happens once in ``__init__`` and the actor
then serves batch after batch. Ray Data's ``ActorPoolStrategy`` keeps a fixed number of these
actors, each with explicit ``num_cpus`` / ``num_gpus``, fed integer-sized batches so GPU memory
use is predictable.

The batch function also settles each row's ``status`` and ``error`` (rule, documented in the
README): a row is ``ok`` when every input it provides (image and/or text) was embedded; if any
provided input failed the row is ``error`` and keeps the embedding of the part that succeeded;
a row with neither an image nor a text is ``error`` ("row.no_input").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import storage as pio
from pipelines.etl.decode import IMAGE_ERROR_COL, PIXELS_COL, TEXT_ERROR_COL, TOKEN_DTYPE, TOKENS_COL
from pipelines.etl.label import LabelSpec, build_captioner, build_classifier, caption_column, label_columns
from pipelines.ray_runtime import node_id

NO_INPUT = "row.no_input: row has neither image nor text"
# Cosine of the row's image and text embeddings (DataComp's CLIP score), where it has both.
CLIP_SCORE_FIELD = pa.field("clip_score", pa.float32())
ACTOR_INFO_COL = "__actor_model"  # JSON of the actor's encoder and node (first row of each batch), for _run.json


@dataclass
class ModelSpec:
    """How an actor builds its encoder; plain data so it pickles to every node."""

    checkpoint: str  # "demo", a local path, or an s3:// URI (fetched once per node)
    backend: str = "auto"  # auto | torch | torchscript | onnx | onnx-int8 (auto resolves per actor device)
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 | int8
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # CPU threads for the model
    s3: pio.S3Options | None = None  # for s3:// checkpoints


@dataclass
class StageSpec:
    """Which outputs the actors produce."""

    images: bool  # the manifest has images and they are embedded
    texts: bool  # the manifest has texts and they are embedded
    label: LabelSpec | None = None  # zero-shot labels (from image embeddings)
    caption: bool = False  # captions (from image embeddings)
    caption_vocabulary: dict | None = None  # resolved CaptionSpec mapping; None = built-in
    heads: list = field(default_factory=list)  # loaded pipelines.curation.heads.HeadSpec, one column each
    extra: dict = field(default_factory=dict)  # reserved


def localize_checkpoint(source: str, s3: pio.S3Options | None = None) -> str:
    """A local path for ``source``: s3:// files or folders are downloaded once per node into a
    cache keyed by the URI, published with an atomic rename (:func:`pipelines.storage.fetch_to_local`)
    so concurrent actors agree."""
    if not pio.is_s3(source):
        return source
    from clip_core.encoders import cache_dir

    root = str(cache_dir("models"))
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    target = os.path.join(root, key, os.path.basename(source.rstrip("/")))
    if os.path.exists(target):
        return target
    return pio.fetch_to_local(source, target, s3)


def actor_threads(num_cpus: float) -> int:
    """The model's CPU threads in an actor that reserves ``num_cpus``: a fraction of a core
    still runs a thread, so 1.8 CPUs is 2 threads (the rest of that core goes to the small read
    and write tasks, or to decode tasks beside the actor)."""
    return max(1, math.ceil(num_cpus))


def resolve_batch_size(batch_size: int | str, images: bool, gpu: bool = False) -> int:
    """``embed.batch_size``; ``auto`` is 256 for texts alone: a text batch is sorted into length
    buckets, each trimmed to its longest row, so a larger batch of mixed captions runs on fewer
    padded tokens. With images it is 32 on CPUs, where a ViT-B/32 batch of 64 outgrows the caches
    and runs 0.8x as fast per image (torch fp32 and bf16 on Zen 5; ONNX is flat), and 64 on GPUs
    (BENCHMARKS.md, "End to end")."""
    if batch_size != "auto":
        return int(batch_size)
    if not images:
        return 256
    return 64 if gpu else 32


def load_job_encoder(spec: ModelSpec):
    """The encoder for a model spec (driver check and actors share this)."""
    from clip_core.encoders import load_encoder

    return load_encoder(
        localize_checkpoint(spec.checkpoint, spec.s3),
        backend=spec.backend,
        precision=spec.precision,
        device=spec.device,
        num_threads=spec.num_threads,
    )


def fixed_size_list(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """[N, D] float32 -> fixed_size_list<float32>[D], null where ``valid`` is false."""
    n, d = values.shape
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), pa.float32())
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, d, mask=mask)


def _stack(column: pa.ChunkedArray, dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Cells of raw arrays -> (the valid rows ``[M, *shape]``, validity mask ``[N]``).

    Read straight from the Arrow buffers: in a chunk without nulls the rows already lie back to
    back, so the result is a view of the block (read-only when it lives in the object store) and
    no Python object is made per row. Nulls (compacted by Arrow's filter) or several chunks cost
    one vectorised copy. Cells are ``fixed_size_binary`` or ``binary`` of equal lengths.
    """
    width = np.dtype(dtype).itemsize * math.prod(shape)
    rows, valid = [], []
    for chunk in column.chunks:
        ok = chunk.is_valid()
        valid.append(ok.to_numpy(zero_copy_only=False))
        if chunk.null_count:
            chunk = chunk.filter(ok)
        rows.append(_chunk_values(chunk, dtype, width).reshape(-1, *shape))
    if not rows:
        return np.zeros((0, *shape), dtype), np.zeros(0, dtype=bool)
    return (rows[0] if len(rows) == 1 else np.concatenate(rows)), np.concatenate(valid)


def _chunk_values(chunk: pa.Array, dtype, width: int) -> np.ndarray:
    """The values of a null-free chunk of ``width``-byte cells as one flat array (a view)."""
    n = len(chunk)
    if n == 0:
        return np.zeros(0, dtype)
    if pa.types.is_fixed_size_binary(chunk.type):
        if chunk.type.byte_width != width:
            raise ValueError(f"cells are {chunk.type.byte_width} bytes, expected {width}")
        data, start = chunk.buffers()[1], chunk.offset * width
    elif pa.types.is_binary(chunk.type):
        offsets = np.frombuffer(chunk.buffers()[1], np.int32, count=n + 1, offset=chunk.offset * 4)
        if (np.diff(offsets) != width).any():
            raise ValueError(f"cells must all be {width} bytes")
        data, start = chunk.buffers()[2], int(offsets[0])
    else:
        raise TypeError(f"raw-array cells must be binary or fixed_size_binary, got {chunk.type}")
    return np.frombuffer(data, dtype, count=n * width // np.dtype(dtype).itemsize, offset=start)


def _run_isolated(fn, inputs: np.ndarray, what: str) -> tuple[np.ndarray | None, list[str | None]]:
    """Run the model on a batch; if it raises, retry row by row so one poisoned input cannot fail
    the block. If every row fails alone too, the model itself is broken: re-raise."""
    try:
        return np.asarray(fn(inputs), dtype=np.float32), [None] * len(inputs)
    except Exception:
        if len(inputs) <= 1:
            raise
    outs, errs, dim = [], [], None
    for i in range(len(inputs)):
        try:
            out = np.asarray(fn(inputs[i : i + 1]), dtype=np.float32)[0]
            dim = out.shape[0]
            outs.append(out)
            errs.append(None)
        except Exception as e:
            outs.append(None)
            errs.append(f"{what}.model_failed: {type(e).__name__}: {e}")
    if dim is None:
        raise RuntimeError(f"the model failed on every {what} of a batch; last error: {errs[-1]}")
    return np.stack([o if o is not None else np.zeros(dim, np.float32) for o in outs]), errs


def _embed_present(fn, inputs: np.ndarray, has: np.ndarray, what: str, out: np.ndarray, ok: np.ndarray,
                   row_errors: list[list[str]]) -> None:
    """Embed the rows that have an input (``inputs`` holds only those) into their places in
    ``out``; a row the model failed on gets its error instead."""
    if not len(inputs):
        return
    emb, errs = _run_isolated(fn, inputs, what)
    for j, i in enumerate(np.flatnonzero(has)):
        if errs[j]:
            row_errors[i].append(errs[j])
        else:
            out[i] = emb[j]
            ok[i] = True


def embed_batch(
    table: pa.Table,
    encoder: Any,
    stages: StageSpec,
    *,
    classifier: Any = None,
    captioner: Any = None,
) -> pa.Table:
    """Pure batch function: decoded rows in, result rows out (internal tags kept for the writer).

    Adds ``image_embedding`` / ``text_embedding`` (when those inputs exist), the label and caption
    columns (when on), ``clip_score`` (when both exist), one column per head, ``status`` and
    ``error``; drops the pixel/token/error work columns.
    """
    n = table.num_rows
    dim = int(encoder.embed_dim)
    img_err = table.column(IMAGE_ERROR_COL).to_pylist()
    txt_err = table.column(TEXT_ERROR_COL).to_pylist()
    row_errors: list[list[str]] = [[e for e in (a, b) if e] for a, b in zip(img_err, txt_err)]
    present = np.zeros(n, dtype=bool)  # the row provides at least one input
    new: dict[str, pa.Array] = {}

    img_emb, txt_emb = np.zeros((n, dim), np.float32), np.zeros((n, dim), np.float32)
    img_ok, txt_ok = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    if stages.images:
        r = int(encoder.image_size)
        pixels, has_pixels = _stack(table.column(PIXELS_COL), np.uint8, (r, r, 3))  # [M, R, R, 3] uint8
        present |= has_pixels | np.array([e is not None for e in img_err])
        _embed_present(_image_fn(encoder), pixels, has_pixels, "image", img_emb, img_ok, row_errors)
        new["image_embedding"] = fixed_size_list(img_emb, img_ok)

    if stages.texts:
        tokens, has_tokens = _stack(table.column(TOKENS_COL), TOKEN_DTYPE, (int(encoder.context_length),))
        present |= has_tokens | np.array([e is not None for e in txt_err])
        _embed_present(_text_fn(encoder), tokens, has_tokens, "text", txt_emb, txt_ok, row_errors)
        new["text_embedding"] = fixed_size_list(txt_emb, txt_ok)

    if stages.label is not None:
        new.update(label_columns(classifier, img_emb, img_ok, stages.label.top_k))
    if stages.caption:
        new["caption"] = caption_column(captioner, img_emb, img_ok)
    if stages.images and stages.texts:
        new["clip_score"] = clip_score_column(img_emb, img_ok, txt_emb, txt_ok)
    inputs = {"image_embedding": (img_emb, img_ok), "text_embedding": (txt_emb, txt_ok)}
    for head in stages.heads:
        new[head.name] = head.column(*inputs[head.input])

    for i in np.flatnonzero(~present):
        if not row_errors[i]:
            row_errors[i].append(NO_INPUT)
    new["status"] = pa.array(["error" if e else "ok" for e in row_errors], pa.string())
    new["error"] = pa.array(["; ".join(e) if e else None for e in row_errors], pa.string())

    drop = [c for c in (PIXELS_COL, TOKENS_COL, IMAGE_ERROR_COL, TEXT_ERROR_COL) if c in table.column_names]
    table = table.drop_columns(drop)
    for name, arr in new.items():
        table = table.append_column(name, arr)
    return table


def clip_score_column(img: np.ndarray, img_ok: np.ndarray, txt: np.ndarray, txt_ok: np.ndarray) -> pa.Array:
    """Pure batch function: the cosine of each row's image and text embeddings (both are
    L2-normalized, so it is their dot product), null where either is missing."""
    both = img_ok & txt_ok
    score = np.einsum("nd,nd->n", img, txt).astype(np.float32)
    return pa.array(score, pa.float32(), mask=~both)


def _image_fn(encoder):
    """uint8 ``[M, R, R, 3]`` -> embeddings, normalised with the encoder's own mean/std. Torch
    backends normalise on the encoder's device, so only uint8 crosses to it; ONNX sessions take
    host arrays, so they normalise on the CPU."""
    onnx = str(getattr(encoder, "backend", "torch")).startswith("onnx")
    device = "cpu" if onnx else getattr(encoder, "device", "cpu")
    return lambda x: encoder.encode_images(encoder.preprocess.normalize(x, device=device))  # x: [M, R, R, 3] uint8


def _text_fn(encoder):
    import torch

    return lambda x: encoder.encode_texts(torch.from_numpy(np.ascontiguousarray(x)))


class EmbedActor:
    """Ray Data actor: loads the encoder (and the label/caption text embeddings) once, then runs
    :func:`embed_batch` on every batch it is given; with ``decode`` it first decodes the batch
    itself (CPU actors, see :func:`pipelines.ray_runtime.stage_cpus`)."""

    def __init__(self, model: ModelSpec, stages: StageSpec, decode: Any = None):
        from clip_core.encoders import retain_freed_memory
        from pipelines.etl.decode import DecodeFn

        retain_freed_memory()  # this process lives for the run: no heap trimming between layers
        self.encoder = load_job_encoder(model)
        self.stages = stages
        self.decode = DecodeFn(decode) if decode is not None else None
        self.classifier = build_classifier(self.encoder, stages.label) if stages.label is not None else None
        self.captioner = (
            build_captioner(self.encoder, stages.caption_vocabulary) if stages.caption else None
        )
        self.node = node_id()  # an actor stays on its node: asked once, reported with every batch

    def __call__(self, table: pa.Table) -> pa.Table:
        from pipelines.etl.read import add_stage_time

        if self.decode is not None:
            table = self.decode(table)
        t0 = time.perf_counter()
        out = embed_batch(table, self.encoder, self.stages, classifier=self.classifier, captioner=self.captioner)
        out = add_stage_time(out, "embed", time.perf_counter() - t0)
        # Which model really ran, and where (device and precision resolve per actor): in _run.json.
        fp = [None] * out.num_rows
        if fp:
            fp[0] = json.dumps({"fingerprint": self.encoder.fingerprint, "device": self.encoder.device,
                                "precision": self.encoder.precision, "backend": self.encoder.backend,
                                "node": self.node}, sort_keys=True)
        return out.append_column(ACTOR_INFO_COL, pa.array(fp, pa.string()))


def embed_dataset(
    ds,
    model: ModelSpec,
    stages: StageSpec,
    *,
    actors: int,
    batch_size: int,
    num_cpus: float,
    num_gpus: float,
    decode: Any = None,
    max_retries: int = 3,
):
    """Thin Ray wrapper: the model stage as a fixed pool of :class:`EmbedActor` (decoding in the
    actors when ``decode``, the decode options, is given). An actor that dies is restarted, and
    its batches retried, ``max_retries`` times; Ray Data's default, forever, would make a model
    that crashes on load hang the job instead of failing it."""
    import ray.data

    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"model": model, "stages": stages, "decode": decode},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=int(batch_size),
        batch_format="pyarrow",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        zero_copy_batch=True,
        max_restarts=max_retries,
        max_task_retries=max_retries,
    )


__all__ = [
    "actor_threads",
    "ACTOR_INFO_COL",
    "CLIP_SCORE_FIELD",
    "clip_score_column",
    "EmbedActor",
    "ModelSpec",
    "NO_INPUT",
    "StageSpec",
    "embed_batch",
    "embed_dataset",
    "fixed_size_list",
    "load_job_encoder",
    "localize_checkpoint",
    "resolve_batch_size",
]

"""Stage 2: fetch, decode and preprocess images, and check and tokenize texts.

Where it runs (``decode.placement``): beside GPU actors, in stateless CPU tasks that scale with
the cluster's CPUs and feed the actor pool through the object store, since decoding JPEGs inside
the actors would leave the GPUs waiting. Beside CPU actors, in the actors themselves, with the
model's threads between its batches: on the same cores a decode task slows a multi-threaded CPU
model by more than the time it takes (see ``pipelines.ray_runtime.decode_in_actors``).

Errors are data: every failure of one row — a missing file, bytes that are not an image, a
truncated JPEG, a decompression bomb, an empty text — is caught here and recorded in the row's
``__image_error`` / ``__text_error`` column as ``"<input>.<cause>: <detail>"`` (for example
``"image.missing_file: no such file: /data/x.jpg"``). The cause codes are a fixed vocabulary,
counted per cause in ``_run.json``, and travel with the exception (``ImageDecodeError.cause``,
``TextTooLongError``, :class:`RowError`), never read back from its wording:

==================  ==========================================================================
cause               meaning
==================  ==========================================================================
missing_file        the path does not exist (local or S3)
not_a_file          the path is a directory
unreadable          permission denied, an I/O or network error after retries
unsupported_uri     a URI scheme other than s3:// (http(s) is not fetched)
empty_file          zero bytes
too_large           the file exceeds ``decode.max_image_bytes`` or the image exceeds
                    ``decode.max_pixels`` (decompression bomb)
not_an_image        the bytes are no image format Pillow knows (random bytes, a text file)
truncated           the image data ends early
corrupt             a damaged header or image data
unsupported_mode    a pixel format that cannot be converted to RGB
preprocess_failed   the resize/crop step failed
empty               (text) the text is empty or only whitespace
too_long            (text) longer than the model's context and ``decode.truncate_text`` is false
==================  ==========================================================================

A null image or text cell is not an error: that input is simply absent for the row.

Images leave this stage resized and cropped but not normalised: ``uint8 [R, R, 3]``, a quarter of
the float32 tensor, so the object store carries 4x less and the actor normalises a whole batch in
one vectorised step on the model's device (``ImageTransform.normalize``). A uint8 image cannot
hold NaN or inf, and the transform's mean/std are checked once, so no per-image finiteness check
is needed.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import storage as pio

# fixed_size_binary(R*R*3): uint8 [R, R, 3] per row, null when there is no usable image. A fixed
# width puts the batch's pixels back to back in one Arrow buffer, which the actor views as
# [N, R, R, 3] without touching a row.
PIXELS_COL = "__pixels"
TOKENS_COL = "__tokens"  # int64 [context_length] as raw bytes, null when there is no usable text
IMAGE_ERROR_COL = "__image_error"
TEXT_ERROR_COL = "__text_error"
DECODE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class DecodeOptions:
    """What the decode function needs to know; built once by the job, shipped to every task."""

    image_column: str | None  # manifest column with paths/bytes, None when images are off
    text_column: str | None  # manifest column with texts, None when texts are off
    manifest_dirs: list[str]  # folder of each manifest file, for relative image paths
    transform: Any  # the encoder's preprocess (ImageTransform); decoding uses its .pixels / .resolution
    tokenizer: Any  # picklable tokenizer: (texts, context_length, truncate) -> LongTensor
    context_length: int  # the text encoder's context length
    drop_columns: tuple[str, ...] = ()  # columns not needed after this stage (bytes images)
    max_pixels: int = 2 * 89_478_485  # larger images are "too_large"
    max_image_bytes: int = 64 * 1024 * 1024  # larger files are "too_large"
    exif_transpose: bool = False  # apply EXIF orientation
    jpeg_draft: bool = True  # JPEGs decode at a DCT scale keeping >= 2x the model's resolution
    truncate_text: bool = True  # cut long texts instead of failing them
    io_threads: int = 8  # fetches in flight within one task
    decode_threads: int = 1  # images decoded at once: 1 in a decode task; the model's threads in a CPU actor
    s3: pio.S3Options | None = None  # S3 settings for s3:// image URIs


# Decoded pixels per block: a few MiB, so decode tasks run side by side and the model starts on
# the first block while later ones decode (see ``read.ManifestDatasource``).
BLOCK_BYTES = 8 * 1024 * 1024
TEXT_BLOCK_ROWS = 1024  # texts only: tokenizing is cheap, and fewer blocks cost the driver less


def block_rows(resolution: int | None, batch_size: int) -> int:
    """Manifest rows per block: :data:`BLOCK_BYTES` of uint8 pixels at ``resolution`` (None: no
    images), rounded up to whole decode batches."""
    if resolution is None:
        rows = TEXT_BLOCK_ROWS
    else:
        rows = max(1, BLOCK_BYTES // (resolution * resolution * 3))
    return max(1, -(-rows // batch_size)) * batch_size


class RowError(Exception):
    """A per-row failure with a cause code from the table in the module docstring."""

    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def fetch_image_bytes(value: Any, manifest_dir: str, opts: DecodeOptions) -> tuple[bytes, str]:
    """(encoded bytes, where they came from) for one image cell; raises :class:`RowError`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) > opts.max_image_bytes:
            raise RowError("too_large", f"image bytes are {len(data)} bytes, limit {opts.max_image_bytes}")
        return data, "<bytes>"
    if not isinstance(value, str) or not value.strip():
        raise RowError("missing_file", f"empty image path {value!r}")
    path = pio.resolve_relative(value.strip(), manifest_dir)
    if "://" in path and not pio.is_s3(path):
        raise RowError("unsupported_uri", f"only local paths and s3:// URIs are fetched: {path}")
    try:
        if pio.is_s3(path):
            fs = pio.fsspec_filesystem(path, opts.s3)
            key = pio.strip_scheme(path)
            try:
                # a ranged GET: an oversized object costs at most the limit, and no extra HEAD
                data = fs.cat_file(key, start=0, end=opts.max_image_bytes + 1)
            except (FileNotFoundError, IsADirectoryError):
                if fs.isdir(key):
                    raise RowError("not_a_file", f"is a directory: {path}") from None
                raise RowError("missing_file", f"no such file: {path}") from None
        else:
            if os.path.isdir(path):
                raise RowError("not_a_file", f"is a directory: {path}")
            size = os.path.getsize(path)
            if size > opts.max_image_bytes:
                raise RowError("too_large", f"file is {size} bytes, limit {opts.max_image_bytes}: {path}")
            with open(path, "rb") as f:
                data = f.read()
    except RowError:
        raise
    except FileNotFoundError:
        raise RowError("missing_file", f"no such file: {path}") from None
    except IsADirectoryError:
        raise RowError("not_a_file", f"is a directory: {path}") from None
    except PermissionError:
        raise RowError("unreadable", f"permission denied: {path}") from None
    except Exception as e:  # network errors after retries, odd filesystems
        raise RowError("unreadable", f"{type(e).__name__}: {e}: {path}") from None
    if len(data) > opts.max_image_bytes:
        raise RowError("too_large", f"file is {len(data)} bytes, limit {opts.max_image_bytes}: {path}")
    return data, path


def decode_fetched(data: bytes, where: str, opts: DecodeOptions) -> np.ndarray:
    """Encoded bytes -> uint8 ``[R, R, 3]`` (resized and cropped); every failure is a :class:`RowError`."""
    from clip_core.preprocess import ImageDecodeError, load_image

    if not data:
        raise RowError("empty_file", f"zero bytes: {where}")
    draft = 2 * opts.transform.resolution if opts.jpeg_draft else None
    try:
        img = load_image(data, exif_transpose=opts.exif_transpose, max_pixels=opts.max_pixels, draft_size=draft)
    except ImageDecodeError as e:
        raise RowError(e.cause, f"{e}: {where}") from None
    except Exception as e:  # a decoder bug must still not fail the block
        raise RowError("corrupt", f"{type(e).__name__}: {e}: {where}") from None
    try:
        return opts.transform.pixels(img)  # [R, R, 3] uint8
    except Exception as e:
        raise RowError("preprocess_failed", f"{type(e).__name__}: {e}: {where}") from None


def decode_image(value: Any, manifest_dir: str, opts: DecodeOptions) -> np.ndarray:
    """One image cell -> uint8 ``[R, R, 3]`` (resized and cropped); every failure is a :class:`RowError`."""
    return decode_fetched(*fetch_image_bytes(value, manifest_dir, opts), opts)


def _prefetched(fetch: Callable[[int], Any], items: list[int], depth: int) -> Iterator[Any]:
    """``fetch(i)`` for each item, in order, with up to ``depth`` fetches running ahead in threads.

    Fetching waits on disks and S3, so threads hide its latency; the bound keeps a task's memory
    at ``depth`` files rather than a whole batch of them.
    """
    if depth <= 1 or len(items) <= 1:
        yield from (fetch(i) for i in items)
        return
    with ThreadPoolExecutor(max_workers=min(depth, len(items))) as pool:
        pending = deque(pool.submit(fetch, i) for i in items[:depth])
        for i in items[depth:]:
            yield pending.popleft().result()
            pending.append(pool.submit(fetch, i))
        while pending:
            yield pending.popleft().result()


def decode_images(values: list[Any], files: list[int], opts: DecodeOptions) -> tuple[list[bytes | None], list[str | None]]:
    """A column of image cells -> (uint8 [R, R, 3] pixel bytes or None, error or None).

    Fetches run ahead in ``io_threads`` threads; decoding and resizing run in the calling thread,
    one image at a time, so a task that reserves one CPU keeps to one CPU and never competes
    with the model's threads. With ``decode_threads`` > 1 (decoding inside a CPU model actor,
    while its model is idle) that many threads decode what the fetches deliver; PIL releases the
    GIL while it decodes and resizes.
    """
    pixels: list[bytes | None] = [None] * len(values)
    errors: list[str | None] = [None] * len(values)

    def fetch(i: int) -> tuple[bytes, str] | RowError:
        try:
            return fetch_image_bytes(values[i], opts.manifest_dirs[files[i]], opts)
        except RowError as e:
            return e

    def decode(i: int, fetched: tuple[bytes, str] | RowError) -> None:
        try:
            if isinstance(fetched, RowError):
                raise fetched
            pixels[i] = decode_fetched(*fetched, opts).tobytes()
        except RowError as e:
            errors[i] = f"image.{e.cause}: {e.detail}"

    todo = [i for i, v in enumerate(values) if v is not None]
    ready = zip(todo, _prefetched(fetch, todo, opts.io_threads))
    if opts.decode_threads > 1:  # in a CPU model actor, between its batches: the model's cores
        with ThreadPoolExecutor(max_workers=opts.decode_threads) as pool:
            list(pool.map(lambda item: decode(*item), ready))
        return pixels, errors
    for item in ready:
        decode(*item)
    return pixels, errors


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------
def tokenize_texts(values: list[Any], opts: DecodeOptions) -> tuple[list[bytes | None], list[str | None]]:
    """A column of texts -> (int64 token bytes or None, error or None)."""
    from clip_core.tokenizer import TextTooLongError

    tokens: list[bytes | None] = [None] * len(values)
    errors: list[str | None] = [None] * len(values)
    todo: list[int] = []
    for i, text in enumerate(values):
        if text is None:
            continue
        if not isinstance(text, str):
            errors[i] = f"text.corrupt: not a string ({type(text).__name__})"
        elif not text.strip():
            errors[i] = "text.empty: text is empty"
        else:
            todo.append(i)
    if not todo:
        return tokens, errors

    def run(idx: list[int]) -> np.ndarray:
        out = opts.tokenizer([values[i] for i in idx], context_length=opts.context_length, truncate=opts.truncate_text)
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.int64)

    try:
        arr = run(todo)
        for j, i in enumerate(todo):
            tokens[i] = arr[j].tobytes()
    except Exception:  # isolate the row(s) that fail, keep the others
        for i in todo:
            try:
                tokens[i] = run([i])[0].tobytes()
            except TextTooLongError as e:
                errors[i] = f"text.too_long: {e}"
            except Exception as e:
                errors[i] = f"text.corrupt: {type(e).__name__}: {e}"
    return tokens, errors


# --------------------------------------------------------------------------------------------
# The batch function and its Ray wrapper
# --------------------------------------------------------------------------------------------
def decode_batch(table: pa.Table, opts: DecodeOptions) -> pa.Table:
    """Pure batch function: add pixels/tokens/error columns to a batch of manifest rows.

    Never raises for a bad row; the batch keeps its row count and order.
    """
    from pipelines.etl.read import FILE_COL

    n = table.num_rows
    if opts.image_column:
        files = table.column(FILE_COL).to_pylist()
        pixels, img_err = decode_images(table.column(opts.image_column).to_pylist(), files, opts)
    else:
        pixels, img_err = [None] * n, [None] * n
    if opts.text_column:
        tokens, txt_err = tokenize_texts(table.column(opts.text_column).to_pylist(), opts)
    else:
        tokens, txt_err = [None] * n, [None] * n
    drop = [c for c in opts.drop_columns if c in table.column_names]
    if drop:
        table = table.drop_columns(drop)
    r = opts.transform.resolution
    return (
        table.append_column(PIXELS_COL, pa.array(pixels, pa.binary(r * r * 3)))
        .append_column(TOKENS_COL, pa.array(tokens, pa.binary()))
        .append_column(IMAGE_ERROR_COL, pa.array(img_err, pa.string()))
        .append_column(TEXT_ERROR_COL, pa.array(txt_err, pa.string()))
    )


class DecodeFn:
    """Ray Data UDF around :func:`decode_batch` that also records its busy time."""

    def __init__(self, opts: DecodeOptions):
        self.opts = opts

    def __call__(self, table: pa.Table) -> pa.Table:
        from pipelines.etl.read import add_stage_time

        t0 = time.perf_counter()
        out = decode_batch(table, self.opts)
        return add_stage_time(out, "decode", time.perf_counter() - t0)


def decode_dataset(ds, opts: DecodeOptions, *, batch_size: int, num_cpus: float, concurrency: int | None):
    """Thin Ray wrapper: the decode stage as stateless CPU tasks over a Dataset."""
    kwargs: dict[str, Any] = {}
    if concurrency is not None:
        kwargs["concurrency"] = concurrency
    return ds.map_batches(
        DecodeFn(opts),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        zero_copy_batch=True,
        # One thread per task: torch (the tokenizer's tensors) would otherwise start a thread per
        # core in every task. A task-specific environment also keeps Ray Data from fusing these
        # tasks into the model actors, so decoding scales with the cluster's CPUs, not with the
        # number of actors.
        runtime_env={"env_vars": DECODE_ENV},
        **kwargs,
    )


__all__ = [
    "DecodeFn",
    "DecodeOptions",
    "IMAGE_ERROR_COL",
    "PIXELS_COL",
    "RowError",
    "TEXT_ERROR_COL",
    "TOKENS_COL",
    "block_rows",
    "decode_batch",
    "decode_dataset",
    "decode_fetched",
    "decode_image",
    "decode_images",
    "fetch_image_bytes",
    "tokenize_texts",
]

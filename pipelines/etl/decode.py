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
not_a_file          the path is a directory, a pipe, a socket or a device
not_allowed         the path lies outside ``input.allowed_roots`` (after symlinks and ``..``)
not_utf8            the path (image) or the text is not valid UTF-8
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
timeout             fetching or decoding took longer than ``decode.timeout_s``
empty               (text) the text is empty or only whitespace
too_long            (text) longer than the model's context and ``decode.truncate_text`` is false
==================  ==========================================================================

Rows read from tar shards may also carry causes found while reading (``truncated_tar``,
``corrupt_tar``, ``duplicate_member``; see :mod:`pipelines.etl.webdataset`), which
:func:`add_read_errors` puts with the row's image or text errors.

A null image or text cell is not an error: that input is simply absent for the row.

One file cannot stall a worker: fetches and decodes run on threads, and one that runs past
``decode.timeout_s`` is given up (``timeout``) while the batch moves on. Python cannot stop a
thread inside a C decoder or a blocked read, so that thread finishes on its own and is never
waited for; ``decode.max_pixels`` and ``decode.max_image_bytes`` bound what it can cost.

Images leave this stage resized and cropped but not normalised: ``uint8 [R, R, 3]``, a quarter of
the float32 tensor, so the object store carries 4x less and the actor normalises a whole batch in
one vectorised step on the model's device (``ImageTransform.normalize``). A uint8 image cannot
hold NaN or inf, and the transform's mean/std are checked once, so no per-image finiteness check
is needed.
"""

from __future__ import annotations

import functools
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage as pio

# fixed_size_binary(R*R*3): uint8 [R, R, 3] per row, null when there is no usable image. A fixed
# width puts the batch's pixels back to back in one Arrow buffer, which the actor views as
# [N, R, R, 3] without touching a row.
PIXELS_COL = "__pixels"
TOKENS_COL = "__tokens"  # TOKEN_DTYPE [context_length] as raw bytes, null when there is no usable text
# Token ids cross the object store as int32: every vocabulary fits (CLIP's has 49,408 ids), at half
# the bytes of the int64 the model takes; the encoder widens them.
TOKEN_DTYPE = np.int32
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
    timeout_s: float | None = 60.0  # per image, for its fetch and for its decode; None: no limit
    allowed_roots: tuple[str, ...] = ()  # absolute folders / s3:// prefixes images must lie in; () = anywhere
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


class NotUtf8:
    """A string cell whose bytes are not valid UTF-8 (Parquet does not check them): it becomes
    that row's ``not_utf8`` error instead of failing the whole batch's conversion to Python."""

    def __init__(self, error: UnicodeDecodeError):
        self.detail = f"byte 0x{error.object[error.start]:02x} at position {error.start} is not valid UTF-8"


def column_values(table: pa.Table, name: str) -> list[Any]:
    """A column as Python values, with :class:`NotUtf8` for string cells that are not UTF-8."""
    col = table.column(name)
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        pass
    out: list[Any] = []
    for raw in pc.cast(col, pa.large_binary()).to_pylist():
        try:
            out.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(NotUtf8(e))
    return out


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _real_roots(roots: tuple[str, ...]) -> tuple[str, ...]:
    """Local roots with their symlinks resolved on this node; s3:// prefixes ending in "/"."""
    return tuple(r.rstrip("/") + "/" if pio.is_s3(r) else os.path.realpath(r) for r in roots)


def allowed_path(path: str, roots: tuple[str, ...]) -> str:
    """``path`` as it will be opened (symlinks and ``..`` resolved) when it lies in one of
    ``roots``; raises the row error ``not_allowed`` otherwise. No roots: any path."""
    if not roots:
        return path
    if pio.is_s3(path):
        key = path.split("://", 1)[1]
        if any(part in (".", "..") for part in key.split("/")):  # S3 keeps them literally; readers may not
            raise RowError("not_allowed", f"'.' or '..' in an S3 key is refused with input.allowed_roots: {path}")
        inside = [r for r in _real_roots(roots) if pio.is_s3(r) and path.startswith(r)]
    else:
        real = os.path.realpath(path)
        inside = [r for r in _real_roots(roots) if not pio.is_s3(r) and os.path.commonpath([r, real]) == r]
        path = real
    if not inside:
        raise RowError("not_allowed", f"outside input.allowed_roots: {path}")
    return path


def _read_local(path: str, limit: int) -> bytes:
    """A regular file's bytes; a pipe, socket or device is refused before it can block a read."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise RowError("not_a_file", f"is a directory: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise RowError("not_a_file", f"not a regular file (a pipe, socket or device): {path}")
    if st.st_size > limit:
        raise RowError("too_large", f"file is {st.st_size} bytes, limit {limit}: {path}")
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _read_s3(path: str, opts: DecodeOptions) -> bytes:
    fs = pio.fsspec_filesystem(path, opts.s3)
    key = pio.strip_scheme(path)
    try:
        # a ranged GET: an oversized object costs at most the limit, and no extra HEAD
        return fs.cat_file(key, start=0, end=opts.max_image_bytes + 1)
    except (FileNotFoundError, IsADirectoryError):
        if fs.isdir(key):
            raise RowError("not_a_file", f"is a directory: {path}") from None
        raise RowError("missing_file", f"no such file: {path}") from None


def fetch_image_bytes(value: Any, manifest_dir: str, opts: DecodeOptions) -> tuple[bytes, str]:
    """(encoded bytes, where they came from) for one image cell; raises :class:`RowError`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) > opts.max_image_bytes:
            raise RowError("too_large", f"image bytes are {len(data)} bytes, limit {opts.max_image_bytes}")
        return data, "<bytes>"
    if isinstance(value, NotUtf8):
        raise RowError("not_utf8", f"image path: {value.detail}")
    if not isinstance(value, str) or not value.strip():
        raise RowError("missing_file", f"empty image path {value!r}")
    path = pio.resolve_relative(value.strip(), manifest_dir)
    if "://" in path and not pio.is_s3(path):
        raise RowError("unsupported_uri", f"only local paths and s3:// URIs are fetched: {path}")
    try:
        path = allowed_path(path, opts.allowed_roots)
        data = _read_s3(path, opts) if pio.is_s3(path) else _read_local(path, opts.max_image_bytes)
    except RowError:
        raise
    except FileNotFoundError:
        raise RowError("missing_file", f"no such file: {path}") from None
    except IsADirectoryError:
        raise RowError("not_a_file", f"is a directory: {path}") from None
    except PermissionError:
        raise RowError("unreadable", f"permission denied: {path}") from None
    except Exception as e:  # network errors after retries, odd filesystems, NUL bytes in a path
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


def _timeout_error(what: str, limit: float) -> RowError:
    return RowError("timeout", f"{what} took longer than {limit:g} s (decode.timeout_s)")


def _prefetched(fetch: Callable[[int], Any], items: list[int], depth: int, limit: float | None) -> Iterator[Any]:
    """``fetch(i)`` for each item, in order, with up to ``depth`` fetches running ahead in threads.

    Fetching waits on disks and S3, so threads hide its latency; the bound keeps a task's memory
    at ``depth`` files rather than a whole batch of them. A fetch still running ``limit`` seconds
    after it is waited for is given up: its item yields the ``timeout`` row error.
    """
    if limit is None and (depth <= 1 or len(items) <= 1):
        yield from (fetch(i) for i in items)
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(depth, len(items))))
    try:
        pending = deque(pool.submit(fetch, i) for i in items[:depth])
        for i in [*items[depth:], *[None] * len(pending)]:
            try:
                yield pending.popleft().result(timeout=limit)
            except FutureTimeout:
                yield _timeout_error("fetching the image", limit)
            if i is not None:
                pending.append(pool.submit(fetch, i))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a fetch that hangs is never waited for


def _run_limited(fn: Callable[[Any], Any], items: Iterable[tuple[int, Any]], threads: int,
                 limit: float | None) -> Iterator[tuple[int, Any]]:
    """``(i, fn(x))`` for every ``(i, x)``, or ``(i, RowError)``, on ``threads`` threads, in
    completion order; a call running longer than ``limit`` seconds yields the ``timeout`` error.

    Its thread cannot be stopped, so the calls that have not started move to a fresh pool; the
    stuck one ends on its own. At most ``2 * threads`` items are held at once (memory bound).
    """
    started: dict[int, float] = {}

    def call(i: int, x: Any) -> Any:
        started[i] = time.monotonic()
        return _call_or_error(fn, x)

    pool = ThreadPoolExecutor(max_workers=threads)
    pending: dict[Future, tuple[int, Any]] = {}
    source = iter(items)
    try:
        while True:
            for i, x in source:
                pending[pool.submit(call, i, x)] = (i, x)
                if len(pending) >= 2 * threads:
                    break
            if not pending:
                return
            done, _ = wait(pending, timeout=None if limit is None else min(0.25, limit / 2),
                           return_when=FIRST_COMPLETED)
            for f in done:
                yield pending.pop(f)[0], f.result()
            now = time.monotonic()
            stuck = [f for f, (i, _) in pending.items() if limit is not None and now - started.get(i, now) > limit]
            for f in stuck:
                yield pending.pop(f)[0], _timeout_error("decoding the image", limit)
            if stuck:
                queued = [f for f in pending if f.cancel()]
                pool.shutdown(wait=False)
                pool = ThreadPoolExecutor(max_workers=threads)
                for f in queued:
                    i, x = pending.pop(f)
                    pending[pool.submit(call, i, x)] = (i, x)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def decode_images(values: list[Any], files: list[int], opts: DecodeOptions) -> tuple[list[bytes | None], list[str | None]]:
    """A column of image cells -> (uint8 [R, R, 3] pixel bytes or None, error or None).

    Fetches run ahead in ``io_threads`` threads; decoding and resizing run one image at a time
    (on the calling thread when there is no time limit), so a task that reserves one CPU keeps
    to one CPU and never competes with the model's threads. With ``decode_threads`` > 1
    (decoding inside a CPU model actor, while its model is idle) that many threads decode what
    the fetches deliver; PIL releases the GIL while it decodes and resizes.
    """
    pixels: list[bytes | None] = [None] * len(values)
    errors: list[str | None] = [None] * len(values)

    def fetch(i: int) -> tuple[bytes, str] | RowError:
        try:
            return fetch_image_bytes(values[i], opts.manifest_dirs[files[i]], opts)
        except RowError as e:
            return e

    def decode(fetched: tuple[bytes, str] | RowError) -> bytes:
        if isinstance(fetched, RowError):
            raise fetched
        return decode_fetched(*fetched, opts).tobytes()

    todo = [i for i, v in enumerate(values) if v is not None]
    ready = zip(todo, _prefetched(fetch, todo, opts.io_threads, opts.timeout_s))
    if opts.timeout_s is None and opts.decode_threads <= 1:
        results = ((i, _call_or_error(decode, x)) for i, x in ready)
    else:
        results = _run_limited(decode, ready, opts.decode_threads, opts.timeout_s)
    for i, result in results:
        if isinstance(result, RowError):
            errors[i] = f"image.{result.cause}: {result.detail}"
        else:
            pixels[i] = result
    return pixels, errors


def _call_or_error(fn: Callable[[Any], Any], x: Any) -> Any:
    try:
        return fn(x)
    except RowError as e:
        return e


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------
def tokenize_texts(values: list[Any], opts: DecodeOptions) -> tuple[list[bytes | None], list[str | None]]:
    """A column of texts -> (TOKEN_DTYPE token bytes or None, error or None)."""
    from clip_core.tokenizer import TextTooLongError

    tokens: list[bytes | None] = [None] * len(values)
    errors: list[str | None] = [None] * len(values)
    todo: list[int] = []
    for i, text in enumerate(values):
        if text is None:
            continue
        if isinstance(text, NotUtf8):
            errors[i] = f"text.not_utf8: {text.detail}"
        elif not isinstance(text, str):
            errors[i] = f"text.corrupt: not a string ({type(text).__name__})"
        elif not text.strip():
            errors[i] = "text.empty: text is empty"
        else:
            todo.append(i)
    if not todo:
        return tokens, errors

    def run(idx: list[int]) -> np.ndarray:
        out = opts.tokenizer([values[i] for i in idx], context_length=opts.context_length, truncate=opts.truncate_text)
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=TOKEN_DTYPE)

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
    from pipelines.etl.read import FILE_COL, READ_ERROR_COL

    n = table.num_rows
    if opts.image_column:
        files = table.column(FILE_COL).to_pylist()
        pixels, img_err = decode_images(column_values(table, opts.image_column), files, opts)
    else:
        pixels, img_err = [None] * n, [None] * n
    if opts.text_column:
        tokens, txt_err = tokenize_texts(column_values(table, opts.text_column), opts)
    else:
        tokens, txt_err = [None] * n, [None] * n
    add_read_errors(table, img_err, txt_err)
    drop = [c for c in (*opts.drop_columns, READ_ERROR_COL) if c in table.column_names]
    if drop:
        table = table.drop_columns(drop)
    r = opts.transform.resolution
    return (
        table.append_column(PIXELS_COL, pa.array(pixels, pa.binary(r * r * 3)))
        .append_column(TOKENS_COL, pa.array(tokens, pa.binary()))
        .append_column(IMAGE_ERROR_COL, pa.array(img_err, pa.string()))
        .append_column(TEXT_ERROR_COL, pa.array(txt_err, pa.string()))
    )


def add_read_errors(table: pa.Table, img_err: list[str | None], txt_err: list[str | None]) -> None:
    """Put the errors the read stage found (``read.READ_ERROR_COL``, e.g. a tar member cut short)
    with the row's others: ``text.*`` causes with the text errors, the rest with the image errors.
    The cell they concern is null, so decoding added no error of its own for it."""
    from pipelines.etl.read import READ_ERROR_COL

    if READ_ERROR_COL not in table.column_names:
        return
    for i, err in enumerate(table.column(READ_ERROR_COL).to_pylist()):
        if err:
            errors = txt_err if err.startswith("text.") else img_err
            errors[i] = f"{errors[i]}; {err}" if errors[i] else err


class DecodeFn:
    """Ray Data UDF around :func:`decode_batch` that also records its busy time."""

    def __init__(self, opts: DecodeOptions):
        self.opts = opts

    def __call__(self, table: pa.Table) -> pa.Table:
        from pipelines.etl.read import add_stage_time

        t0, requests = time.perf_counter(), pio.s3_request_counts()
        out = decode_batch(table, self.opts)
        return add_stage_time(out, "decode", time.perf_counter() - t0, pio.s3_requests_since(requests))


def decode_dataset(ds, opts: DecodeOptions, *, batch_size: int, num_cpus: float, concurrency: int | None,
                   max_retries: int = 3):
    """Thin Ray wrapper: the decode stage as stateless CPU tasks over a Dataset; a task whose worker
    died is retried ``max_retries`` times (Ray Data's default is forever)."""
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
        max_retries=max_retries,
        **kwargs,
    )


__all__ = [
    "DecodeFn",
    "DecodeOptions",
    "IMAGE_ERROR_COL",
    "NotUtf8",
    "PIXELS_COL",
    "RowError",
    "TEXT_ERROR_COL",
    "TOKENS_COL",
    "TOKEN_DTYPE",
    "add_read_errors",
    "allowed_path",
    "block_rows",
    "column_values",
    "decode_batch",
    "decode_dataset",
    "decode_fetched",
    "decode_image",
    "decode_images",
    "fetch_image_bytes",
    "tokenize_texts",
]

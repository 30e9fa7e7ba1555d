"""Small JPEG thumbnails of the sampled rows' images, as ``data:`` URIs for a one-file page.

Images are fetched the way the job fetched them (:func:`pipelines.etl.decode.fetch_image_bytes`:
paths relative to the manifest, ``s3://`` URIs, raw bytes, the job's ``input.allowed_roots`` and
size limit) and decoded with the job's decoder. A thumbnail that cannot be made is a reason
string, shown as a placeholder: a missing image never fails the report.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipelines import storage as pio

THUMB_PX = 96  # longest side of a thumbnail
THUMB_QUALITY = 80  # JPEG quality


def manifest_dir(input_path: str | None) -> str:
    """The folder that relative image paths were resolved against (a manifest file's folder, or
    the manifest folder itself)."""
    if not input_path:
        return "."
    path = str(input_path)
    if path.endswith(".parquet") or any(ch in path for ch in "*?["):
        return pio.dirname(path.split("*")[0] if "*" in path else path)
    return path if pio.is_s3(path) else pio.strip_scheme(path)


def _fetch_options(config: dict[str, Any], s3: pio.S3Options | None):
    from pipelines.etl.decode import DecodeOptions

    decode = config.get("decode") or {}
    roots = (config.get("input") or {}).get("allowed_roots") or ()
    return DecodeOptions(image_column=None, text_column=None, manifest_dirs=[], transform=None, tokenizer=None,
                         context_length=0, max_image_bytes=int(decode.get("max_image_bytes") or 64 << 20),
                         max_pixels=int(decode.get("max_pixels") or 2 * 89_478_485),
                         allowed_roots=tuple(roots), s3=s3)


def thumbnail(value: Any, base_dir: str, opts) -> str:
    """A ``data:image/jpeg;base64,...`` URI; raises on any failure (the caller shows why)."""
    from clip_core.preprocess import load_image
    from pipelines.etl.decode import fetch_image_bytes

    data, _ = fetch_image_bytes(value, base_dir, opts)
    img = load_image(data, max_pixels=opts.max_pixels, draft_size=2 * THUMB_PX).convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(values: list[Any], config: dict[str, Any], s3: pio.S3Options | None) -> list[tuple[str | None, str]]:
    """``(data URI or None, why not)`` per value, fetched a few at a time."""
    opts = _fetch_options(config, s3)
    base_dir = manifest_dir((config.get("input") or {}).get("path"))

    def one(value: Any) -> tuple[str | None, str]:
        if value is None:
            return None, "no image"
        try:
            return thumbnail(value, base_dir, opts), ""
        except Exception as e:  # RowError, decoder errors, network errors: a placeholder
            return None, (str(e) or type(e).__name__)[:200]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, values))


__all__ = ["THUMB_PX", "manifest_dir", "thumbnail", "thumbnails"]

"""Image decoding and OpenAI-exact CLIP preprocessing, without torchvision.

Why not torchvision: it is a heavy, CUDA-version-coupled dependency and only
five small steps are needed. They are reproduced here operation for operation,
so outputs are bit-identical to OpenAI's pipeline
``Resize(R, BICUBIC) -> CenterCrop(R) -> convert("RGB") -> ToTensor() -> Normalize``:

* Resize: shorter side -> ``R``, longer side -> ``int(R * long / short)``
  (truncation), via ``PIL.Image.resize(..., BICUBIC)`` with no ``reducing_gap``;
  skipped when the size already matches. PIL's own rules still apply, e.g. it
  resizes ``P`` and ``1`` images with NEAREST and premultiplies alpha for
  ``RGBA``/``LA`` -- exactly what happens under torchvision too.
* CenterCrop: offsets ``int(round((size - R) / 2.0))`` (banker's rounding), with
  zero padding first if the image is smaller than ``R`` (cannot happen after the
  resize, kept for completeness).
* The RGB conversion happens *after* the crop, so resizing runs in the image's
  own mode (this matters for ``L``, ``P``, ``RGBA``).
* ToTensor + Normalize: ``float32(x) / 255``, then ``- mean``, then ``/ std``,
  as three separately rounded float32 torch operations, like torchvision.

The transform is two public steps, so a pipeline can ship the 1-byte-per-value
image between processes and normalise a whole batch where the model runs (4x
less data than float32, and one vectorised pass on the model's device):
:func:`resize_crop` (PIL image -> ``uint8 [R, R, 3]``, all of the geometry and
the RGB conversion) and :func:`normalize` (``uint8 [N, R, R, 3]`` ->
``float32 [N, 3, R, R]``). :class:`ImageTransform` is exactly the two in a row.

Decoding rule (``load_image``): ordinary modes -- ``RGB``, ``RGBA``, ``RGBX``,
``L``, ``LA`` and ``P`` without transparency -- are returned exactly as PIL
opened them, so ``image_transform(load_image(path))`` equals OpenAI's
``preprocess(Image.open(path))``. Only exotic modes are normalised, because PIL
either cannot convert them to RGB correctly or warns while doing it:

* ``CMYK``, ``YCbCr`` and other colour spaces -> ``convert("RGB")`` (or
  ``ImageDecodeError`` if PIL cannot convert them);
* ``I;16`` variants and ``I`` -> ``L`` with ``round(v / 257)``, i.e. the full
  16-bit range onto 0..255 (PIL's own conversion clips everything above 255 to
  white); ``I`` values are clipped to 0..65535 first;
* ``F`` -> ``L``; values are taken as 0..1 when the maximum is <= 1, else as
  0..255; clipped, NaN -> 0;
* ``1`` -> ``L`` (0 / 255), so it is resized bicubically instead of NEAREST;
* ``P`` with transparency and ``PA`` -> ``RGBA`` (the transform's
  ``convert("RGB")`` then drops alpha, as it does for any RGBA input);
* premultiplied ``La`` / ``RGBa`` -> ``LA`` / ``RGBA``.

Every failure surfaces as one exception type, :class:`ImageDecodeError`, so a
pipeline can turn bad inputs into error rows with a single ``except``.
Decoding is eager (``.load()``): truncated files fail inside ``load_image``,
never later inside a model batch. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left
alone; if some other library switches it on process-wide, PIL will pad
truncated files instead of failing and this module cannot tell.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ImageDecodeError",
    "ImageTransform",
    "center_crop",
    "image_transform",
    "load_image",
    "normalize",
    "preprocess_batch",
    "resize_crop",
    "resize_shorter_side",
]

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Twice PIL's default MAX_IMAGE_PIXELS: the size at which PIL itself refuses to
# open a file (about 179 Mpx, e.g. 13379 x 13379). Decoding that much RGB costs
# ~540 MB, a sane per-image ceiling for a batch worker.
DEFAULT_MAX_PIXELS: int = 2 * 89_478_485

_PASSTHROUGH_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P"})


class ImageDecodeError(ValueError):
    """An input could not be turned into an image; the message says why in plain words, and
    ``cause`` says it as data, one of: ``missing_file``, ``not_a_file``, ``unreadable``,
    ``empty_file``, ``too_large``, ``not_an_image``, ``truncated``, ``corrupt``,
    ``unsupported_mode`` (the pipeline's per-row error causes)."""

    def __init__(self, message: str, cause: str = "corrupt"):
        super().__init__(message)
        self.cause = cause


# -- decoding ---------------------------------------------------------------------------


def _read_source(source: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageDecodeError(f"file not found: {path}", "missing_file") from exc
        except IsADirectoryError as exc:
            raise ImageDecodeError(f"is a directory: {path}", "not_a_file") from exc
        except PermissionError as exc:
            if path.is_dir():  # Windows reports directories as permission errors
                raise ImageDecodeError(f"is a directory: {path}", "not_a_file") from exc
            raise ImageDecodeError(f"permission denied: {path}", "unreadable") from exc
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file: {path} ({exc})", "unreadable") from exc
    else:
        raise TypeError(
            "load_image expects bytes, bytearray, memoryview, str or os.PathLike, "
            f"got {type(source).__name__}"
        )
    if not data:
        raise ImageDecodeError("empty file", "empty_file")
    return data


def _pil_cause(exc: BaseException) -> str:
    """``truncated`` or ``corrupt`` for an error PIL raised while reading an image. PIL reports a
    cut-off file as EOFError or as a plain OSError whose message says so: at this one boundary
    the message is the only tell; everywhere past it the cause travels as data."""
    return "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc).lower() else "corrupt"


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    values = np.asarray(img).astype(np.int64)
    values = np.clip(values, 0, 65535)
    # round(v / 257): 257 * k maps back to k exactly and 65535 to 255.
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")


def _float_to_l(img: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _normalise_mode(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in _PASSTHROUGH_MODES and not (mode == "P" and "transparency" in img.info):
        return img
    if mode == "P" or mode == "PA":
        return img.convert("RGBA")
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(img)
    if mode == "F":
        return _float_to_l(img)
    if mode == "1":
        return img.convert("L")
    if mode == "La":
        return img.convert("LA")
    if mode == "RGBa":
        return img.convert("RGBA")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"unsupported image mode {mode!r} ({exc})", "unsupported_mode") from exc


def load_image(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    *,
    exif_transpose: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode an image fully and return it in a mode the CLIP transform handles.

    ``source`` is encoded file content or a filesystem path. Animated formats
    yield their first frame. EXIF orientation is applied only with
    ``exif_transpose=True`` (OpenAI's preprocessing ignores it); a corrupt EXIF
    block leaves the image unrotated rather than failing. ``max_pixels`` caps
    ``width * height``, checked from the header before any pixel is decoded;
    ``None`` disables this check (PIL still refuses beyond twice its global
    ``Image.MAX_IMAGE_PIXELS``). ``draft_size`` lets a JPEG decode at 1/2, 1/4
    or 1/8 scale (libjpeg's DCT scaling) while both sides stay at least that
    many pixels: a 12 MP photo bound for a 224 px model then costs a fraction
    of a full decode, and the exact resize runs on the smaller image (a fast
    path: its cost in accuracy is measured in BENCHMARKS.md). Other formats
    ignore it. Any failure raises :class:`ImageDecodeError`; a wrong argument
    type raises ``TypeError``.
    """
    data = _read_source(source)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc} (decompression bomb)", "too_large") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (cannot identify image file)", "not_an_image") from exc
    except Exception as exc:
        raise ImageDecodeError(f"corrupt image header ({type(exc).__name__}: {exc})", _pil_cause(exc)) from exc

    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width} x {height} pixels exceeds limit {max_pixels} "
            "(decompression bomb)", "too_large"
        )
    if draft_size is not None and img.format == "JPEG":
        img.draft(None, (draft_size, draft_size))  # keeps the mode; a no-op when already small
    try:
        img.load()
    except Exception as exc:
        if _pil_cause(exc) == "truncated":
            raise ImageDecodeError(f"truncated image ({exc})", "truncated") from exc
        raise ImageDecodeError(f"corrupt image data ({type(exc).__name__}: {exc})") from exc

    if exif_transpose:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            pass  # unreadable EXIF: keep the pixels as stored
    return _normalise_mode(img)


# -- OpenAI transform -------------------------------------------------------------------


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` for a PIL image (int size, no max_size)."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` for a PIL image, including its zero padding."""
    width, height = img.size
    if size > width or size > height:
        pad_left = (size - width) // 2 if size > width else 0
        pad_top = (size - height) // 2 if size > height else 0
        pad_right = (size - width + 1) // 2 if size > width else 0
        pad_bottom = (size - height + 1) // 2 if size > height else 0
        img = ImageOps.expand(img, border=(pad_left, pad_top, pad_right, pad_bottom), fill=0)
        width, height = img.size
        if (width, height) == (size, size):
            return img
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def resize_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """The geometric half of the transform: resize, center crop, RGB -> ``uint8 [R, R, 3]``.

    Everything up to ``ToTensor`` happens here, in PIL, so the result is the
    exact 8-bit image torchvision would convert; it is all a worker needs to
    ship. The array is a fresh, writable copy.
    """
    img = center_crop(resize_shorter_side(img, resolution), resolution)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # [R, R, 3] uint8


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Finite means and positive finite stds keep every normalised uint8 value finite, so no
    # per-image check for NaN/inf is needed downstream.
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need one value per RGB channel")
    mean_t = tuple(float(m) for m in mean)
    std_t = tuple(float(s) for s in std)
    if not all(math.isfinite(m) for m in mean_t) or not all(math.isfinite(s) and s > 0 for s in std_t):
        raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean_t}, std={std_t}")
    return mean_t, std_t


def normalize(
    pixels: np.ndarray | torch.Tensor,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The arithmetic half of the transform: ``uint8 [N, R, R, 3]`` -> ``float32 [N, 3, R, R]``.

    ``pixels`` is a numpy array or a torch tensor (on any device), channels last
    as :func:`resize_crop` makes them. With ``device`` the uint8 batch moves
    there first, so the transfer carries 1 byte per value and the float work
    runs on that device. ToTensor + Normalize are reproduced op for op
    (``/ 255``, ``- mean``, ``/ std``, each rounded to float32), so the result
    is bit-identical to torchvision's on any device.
    """
    mean, std = _check_mean_std(mean, std)
    if isinstance(pixels, torch.Tensor):
        x = pixels
    else:
        array = np.asarray(pixels)
        with warnings.catch_warnings():
            # A read-only input (e.g. a view of an Arrow buffer) is only read here, never written.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(array)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"pixels must be uint8 [N, R, R, 3], got {x.dtype} {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)  # [N, R, R, 3] uint8
    like = {"dtype": torch.float32, "device": x.device}
    x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # [N, 3, R, R] float32
    # 255 is a tensor on x's device, not a Python number: CUDA turns division by a CPU scalar
    # into multiplication by its reciprocal, which is up to one float32 ulp off.
    x.div_(torch.tensor(255.0, **like))
    x.sub_(torch.tensor(mean, **like).view(1, 3, 1, 1))
    return x.div_(torch.tensor(std, **like).view(1, 3, 1, 1))  # [N, 3, R, R] float32


class ImageTransform:
    """Picklable callable: PIL image -> normalised ``float32`` tensor ``[3, R, R]``.

    A class rather than a closure so it can be shipped to worker processes and
    so callers can read back ``resolution``, ``mean`` and ``std``; its two
    halves, :meth:`pixels` and :meth:`normalize`, let a pipeline run them in
    different processes with one model's constants.
    """

    def __init__(
        self,
        resolution: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution: int = int(resolution)
        self.mean, self.std = _check_mean_std(mean, std)

    def pixels(self, img: Image.Image) -> np.ndarray:
        """:func:`resize_crop` at this resolution: ``uint8 [R, R, 3]``."""
        return resize_crop(img, self.resolution)

    def normalize(self, pixels: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """:func:`normalize` with this transform's mean and std: ``uint8 [N, R, R, 3]`` -> ``float32 [N, 3, R, R]``."""
        return normalize(pixels, self.mean, self.std, device)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(img)[None])[0]  # [3, R, R] float32

    def __repr__(self) -> str:
        return f"ImageTransform(resolution={self.resolution}, mean={self.mean}, std={self.std})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageTransform):
            return NotImplemented
        return (self.resolution, self.mean, self.std) == (other.resolution, other.mean, other.std)

    def __hash__(self) -> int:
        return hash((self.resolution, self.mean, self.std))


def image_transform(
    resolution: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> ImageTransform:
    """Return OpenAI's CLIP eval preprocessing for square inputs of ``resolution`` pixels."""
    return ImageTransform(resolution, mean, std)


def preprocess_batch(
    images: Sequence[Image.Image],
    resolution: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """Transform and stack images into a ``float32`` tensor ``[N, 3, R, R]``."""
    transform = ImageTransform(resolution, mean, std)
    r = transform.resolution
    pixels = np.empty((len(images), r, r, 3), dtype=np.uint8)  # [N, R, R, 3] uint8
    for i, img in enumerate(images):
        pixels[i] = transform.pixels(img)
    return transform.normalize(pixels)  # [N, 3, R, R] float32

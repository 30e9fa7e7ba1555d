"""Tests for image decoding and the OpenAI-exact CLIP transform."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clip_core.preprocess import (
    DEFAULT_MAX_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageDecodeError,
    ImageTransform,
    center_crop,
    image_transform,
    load_image,
    normalize,
    preprocess_batch,
    resize_crop,
    resize_shorter_side,
)

SIZES = [(1, 1), (224, 224), (300, 200), (200, 300), (641, 479), (225, 224), (224, 225), (500, 37)]
MODES = ["RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16"]


# -- reference and fixtures ------------------------------------------------------------


def reference_openai_preprocess(img: Image.Image, res: int, mean=OPENAI_MEAN, std=OPENAI_STD):
    """OpenAI's torchvision pipeline written out by hand, step for step.

    Resize(res, BICUBIC) -> CenterCrop(res) -> convert("RGB") -> ToTensor -> Normalize.
    """
    w, h = img.size
    if w <= h:
        new_w, new_h = res, int(res * h / w)
    else:
        new_w, new_h = int(res * w / h), res
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - res) / 2.0))
    left = int(round((new_w - res) / 2.0))
    img = img.crop((left, top, left + res, top + res)).convert("RGB")
    x = np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    x = x - np.asarray(mean, dtype=np.float32)[:, None, None]
    return x / np.asarray(std, dtype=np.float32)[:, None, None]


def make_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Noise plus a few drawn shapes, so resizing sees both texture and edges."""
    rng = np.random.default_rng(seed + size[0] * 7919 + size[1])
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(rgb)
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(250, 20, 30))
    draw.line((0, 0, w - 1, h - 1), fill=(0, 255, 0), width=max(1, w // 50))
    draw.rectangle((0, h // 2, w // 3, h - 1), outline=(10, 10, 240), width=2)
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        alpha[: h // 3] = 0
        alpha[-h // 3 :] = 255
        out = rgb.copy()
        out.putalpha(Image.fromarray(alpha, "L"))
        return out
    if mode == "LA":
        return make_image("RGBA", size, seed).convert("LA")
    if mode == "P":
        pal = Image.fromarray(rng.integers(0, 64, (h, w), dtype=np.uint8), "P")
        pal.putpalette(rng.integers(0, 256, 64 * 3, dtype=np.uint8).tolist())
        ImageDraw.Draw(pal).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=7)
        return pal
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return rgb.convert(mode)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` pixels with almost no data: a cheap bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_same(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert actual.dtype == torch.float32
    assert tuple(actual.shape) == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=1e-6)


# -- transform parity ------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_transform_matches_openai_reference(mode: str, size: tuple[int, int]):
    img = make_image(mode, size)
    for res in (224, 336, 64):
        assert_same(image_transform(res)(img), reference_openai_preprocess(img, res))


def test_transform_custom_mean_std():
    img = make_image("RGB", (300, 200))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    t = image_transform(96, mean=mean, std=std)
    assert (t.resolution, t.mean, t.std) == (96, mean, std)
    assert_same(t(img), reference_openai_preprocess(img, 96, mean, std))


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")],
)
def test_load_image_keeps_ordinary_modes_for_parity(mode: str, fmt: str):
    data = encode(make_image(mode, (320, 240)), fmt)
    opened = Image.open(io.BytesIO(data))
    loaded = load_image(data)
    assert loaded.mode == opened.mode == mode
    assert_same(image_transform(224)(loaded), reference_openai_preprocess(opened, 224))


def test_resize_rule_truncates_long_side():
    assert resize_shorter_side(Image.new("L", (641, 479)), 224).size == (299, 224)
    assert resize_shorter_side(Image.new("L", (479, 641)), 224).size == (224, 299)
    assert resize_shorter_side(Image.new("L", (300, 200)), 224).size == (336, 224)
    assert resize_shorter_side(Image.new("L", (1, 1)), 224).size == (224, 224)
    same = Image.new("L", (224, 500))
    assert resize_shorter_side(same, 224) is same  # already right: untouched


def test_resize_uses_bicubic_without_reducing_gap():
    img = make_image("RGB", (640, 480))
    expected = img.resize((298, 224), Image.BICUBIC)
    assert np.array_equal(np.asarray(resize_shorter_side(img, 224)), np.asarray(expected))


@pytest.mark.parametrize("width,left", [(225, 0), (226, 1), (227, 2), (229, 2), (231, 4)])
def test_center_crop_uses_bankers_rounding(width: int, left: int):
    columns = np.tile(np.arange(width, dtype=np.uint8), (224, 1))
    cropped = np.asarray(center_crop(Image.fromarray(columns, "L"), 224))
    assert cropped.shape == (224, 224)
    assert cropped[0, 0] == left
    rows = np.ascontiguousarray(columns.T)
    assert np.asarray(center_crop(Image.fromarray(rows, "L"), 224))[0, 0] == left


def test_center_crop_pads_small_images_with_zeros():
    img = Image.fromarray(np.full((3, 5), 9, dtype=np.uint8), "L")
    out = np.asarray(center_crop(img, 8))
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[2:5, 1:6] = 9  # left (8-5)//2 = 1, top (8-3)//2 = 2
    assert np.array_equal(out, expected)


def test_transform_output_and_pickling():
    t = image_transform(224)
    assert isinstance(t, ImageTransform)
    assert (t.resolution, t.mean, t.std) == (224, OPENAI_MEAN, OPENAI_STD)
    img = make_image("RGB", (300, 200))
    out = t(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
    clone = pickle.loads(pickle.dumps(t))
    assert clone == t
    assert torch.equal(clone(img), out)


def test_preprocess_batch():
    images = [make_image("RGB", (300, 200)), make_image("L", (50, 80)), make_image("P", (1, 1))]
    batch = preprocess_batch(images, 64)
    assert batch.shape == (3, 3, 64, 64)
    for row, img in zip(batch, images):
        assert torch.equal(row, image_transform(64)(img))
    assert preprocess_batch([], 64).shape == (0, 3, 64, 64)


def test_two_steps_are_the_transform():
    """resize_crop + normalize on a batch is bit for bit the per-image transform."""
    images = [make_image(mode, size) for mode, size in zip(MODES, SIZES)]
    for res in (224, 64):
        pixels = np.stack([resize_crop(img, res) for img in images])  # [N, R, R, 3] uint8
        assert pixels.dtype == np.uint8 and pixels.shape == (len(images), res, res, 3)
        expected = torch.stack([image_transform(res)(img) for img in images])
        for batch in (pixels, torch.from_numpy(pixels)):
            out = normalize(batch)
            assert out.dtype == torch.float32 and out.shape == (len(images), 3, res, res) and out.is_contiguous()
            assert torch.equal(out, expected)
        for img, row in zip(images, normalize(pixels)):
            assert_same(row, reference_openai_preprocess(img, res))


def test_transform_halves_use_its_constants():
    t = image_transform(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    img = make_image("RGBA", (50, 41))
    assert np.array_equal(t.pixels(img), resize_crop(img, 32))
    assert torch.equal(t.normalize(t.pixels(img)[None])[0], t(img))
    assert torch.equal(t.normalize(t.pixels(img)[None]), normalize(t.pixels(img)[None], t.mean, t.std))


def test_normalize_reads_read_only_arrays_without_warning():
    import warnings

    pixels = np.frombuffer(resize_crop(make_image("RGB", (40, 30)), 16).tobytes(), np.uint8).reshape(1, 16, 16, 3)
    assert not pixels.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize(pixels)
    assert torch.equal(out, normalize(pixels.copy()))


def test_normalize_moves_uint8_to_the_device_first():
    out = normalize(np.zeros((2, 8, 8, 3), np.uint8), device="meta")
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_on_cuda_is_bit_identical():
    images = [make_image(mode, (300, 200)) for mode in MODES]
    pixels = np.stack([resize_crop(img, 224) for img in images])
    assert torch.equal(normalize(pixels, device="cuda").cpu(), normalize(pixels))


def test_normalize_rejects_what_is_not_uint8_channels_last():
    with pytest.raises(ValueError):
        normalize(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        normalize(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError):
        normalize(np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize("mean, std", [((0.5,) * 3, (0.5, 0.0, 0.5)), ((0.5,) * 3, (0.5, -1.0, 0.5)),
                                       ((float("nan"), 0.5, 0.5), (0.5,) * 3), ((0.5,) * 3, (float("inf"),) * 3),
                                       ((0.5, 0.5), (0.5,) * 3)])
def test_constants_that_would_give_non_finite_pixels_are_rejected(mean, std):
    with pytest.raises(ValueError):
        image_transform(32, mean, std)
    with pytest.raises(ValueError):
        normalize(np.zeros((1, 8, 8, 3), np.uint8), mean, std)


def test_rejects_bad_resolution():
    with pytest.raises(ValueError):
        image_transform(0)


# -- odd but valid inputs ------------------------------------------------------------


def test_one_pixel_image_decodes():
    img = load_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert img.size == (1, 1)
    assert image_transform(224)(img).shape == (3, 224, 224)


def test_cmyk_jpeg_becomes_rgb():
    src = make_image("RGB", (64, 48))
    img = load_image(encode(src.convert("CMYK"), "JPEG", quality=95))
    assert img.mode == "RGB" and img.size == (64, 48)
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(src, dtype=int))
    assert diff.mean() < 12  # lossy, but the same picture


def test_16bit_png_scales_full_range_to_8bit():
    values = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = load_image(data)
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 0, 1, 1, 128, 255]]  # round(v / 257)


def test_16bit_big_endian_tiff_scales_full_range():
    values = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)
    src = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    data = encode(src, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    assert np.asarray(load_image(data)).tolist() == [[0, 1, 255, 4]]


def test_32bit_int_and_float_tiffs():
    ints = np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32)
    assert np.asarray(load_image(encode(Image.fromarray(ints), "TIFF"))).tolist() == [
        [0, 1, 255, 255, 0]
    ]
    unit = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    assert np.asarray(load_image(encode(Image.fromarray(unit), "TIFF"))).tolist() == [[0, 128, 255, 0]]
    wide = np.array([[0.0, 100.4, 300.0, -2.0]], dtype=np.float32)
    assert np.asarray(load_image(encode(Image.fromarray(wide), "TIFF"))).tolist() == [[0, 100, 255, 0]]


def test_one_bit_image_becomes_l():
    src = Image.fromarray(np.array([[0, 255, 0], [255, 0, 255]], dtype=np.uint8)).convert("1")
    img = load_image(encode(src, "PNG"))
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 255, 0], [255, 0, 255]]


def test_palette_png_with_transparency_becomes_rgba():
    src = make_image("P", (40, 30))
    src.putpixel((0, 0), 5)
    data = encode(src, "PNG", transparency=5)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    img = load_image(data)
    assert img.mode == "RGBA"
    assert img.getpixel((0, 0))[3] == 0
    assert image_transform(64)(img).shape == (3, 64, 64)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame(fmt: str):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = load_image(data)
    assert img.convert("RGB").getpixel((8, 8)) == (255, 0, 0)


def test_exif_orientation_only_on_request():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(make_image("RGB", (40, 20)), "JPEG", exif=exif.tobytes())
    assert load_image(data).size == (40, 20)
    assert load_image(data, exif_transpose=False).size == (40, 20)
    assert load_image(data, exif_transpose=True).size == (20, 40)


def test_accepts_all_source_kinds(tmp_path: Path):
    data = encode(make_image("RGB", (30, 20)), "PNG")
    path = tmp_path / "img.png"
    path.write_bytes(data)
    expected = np.asarray(load_image(data))
    for source in (bytearray(data), memoryview(data), str(path), path):
        assert np.array_equal(np.asarray(load_image(source)), expected)
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


# -- bad inputs ------------------------------------------------------------------------


def _decode_error(source, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        load_image(source, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


def test_zero_bytes(tmp_path: Path):
    assert "empty file" in str(_decode_error(b""))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty file" in str(_decode_error(empty))


def test_random_bytes():
    noise = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    err = _decode_error(noise)
    assert "not an image (cannot identify image file)" in str(err)
    assert err.__cause__ is not None


def test_text_file_named_jpg(tmp_path: Path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert "not an image" in str(_decode_error(path))


def test_truncated_jpeg():
    data = encode(make_image("RGB", (320, 240)), "JPEG")
    err = _decode_error(data[: len(data) // 2])
    assert "truncated image" in str(err)
    assert err.__cause__ is not None


def test_truncated_png():
    data = encode(make_image("RGB", (320, 240)), "PNG")
    assert "truncated image" in str(_decode_error(data[: len(data) // 2]))


def test_missing_path(tmp_path: Path):
    path = tmp_path / "nope.png"
    assert str(_decode_error(path)) == f"file not found: {path}"
    assert "file not found" in str(_decode_error(str(path)))


def test_directory_path(tmp_path: Path):
    assert str(_decode_error(tmp_path)) == f"is a directory: {tmp_path}"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_own_limit():
    data = png_header_only(12000, 12000)
    message = str(_decode_error(data, max_pixels=100_000_000))
    assert "image too large: 12000 x 12000 pixels exceeds limit 100000000" in message
    assert "decompression bomb" in message


def test_decompression_bomb_with_default_limit():
    message = str(_decode_error(png_header_only(20000, 20000)))
    assert "image too large" in message and "decompression bomb" in message


def test_pixel_limit_applies_to_real_images_and_can_be_disabled():
    data = encode(make_image("RGB", (300, 200)), "PNG")
    assert "300 x 200 pixels exceeds limit 50000" in str(_decode_error(data, max_pixels=50_000))
    assert load_image(data, max_pixels=60_000).size == (300, 200)
    assert load_image(data, max_pixels=None).size == (300, 200)


def test_default_limit_is_sane():
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485
    assert 100_000_000 < DEFAULT_MAX_PIXELS < 250_000_000


def _photo_jpeg(size: tuple[int, int]) -> bytes:
    """A smooth JPEG with edges (a gradient and a disc): what draft decoding is for."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, w // 2, h // 2], fill=(250, 20, 40))
    return encode(img, "JPEG", quality=90)


def test_jpeg_draft_decodes_at_a_dct_scale_that_keeps_the_size_asked():
    data = _photo_jpeg((1600, 1200))
    assert load_image(data).size == (1600, 1200)
    # 1200 // 448 = 2: the largest DCT scale (1/2, 1/4, 1/8) keeping both sides >= 448 is 1/2
    assert load_image(data, draft_size=448).size == (800, 600)
    assert load_image(data, draft_size=100).size == (200, 150)  # 1/8, the smallest libjpeg has
    assert load_image(data, draft_size=1000).size == (1600, 1200)  # 1200 < 2 * 1000: full decode
    png = encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG")
    assert load_image(png, draft_size=448).size == (1600, 1200)  # not a JPEG: ignored


def test_jpeg_draft_then_exact_resize_stays_close_to_the_full_decode():
    data = _photo_jpeg((2000, 1500))
    exact = resize_crop(load_image(data), 224).astype(np.int16)
    draft = resize_crop(load_image(data, draft_size=448), 224).astype(np.int16)
    assert exact.shape == draft.shape == (224, 224, 3)
    assert np.abs(exact - draft).mean() < 1.5  # measured 0.3 here; BENCHMARKS.md has embedding cosines
    assert not np.array_equal(exact, draft)  # the draft did decode differently

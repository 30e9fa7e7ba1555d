"""Images cross the object store as uint8 and are normalised in the actor: same embeddings as the
float path, a quarter of the bytes, and rows stay aligned around missing or failed images."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from clip_core.preprocess import image_transform, resize_crop
from pipeline_fixtures import tiny_checkpoint, tiny_encoder  # noqa: F401 (fixtures)
from pipeline_fixtures import image_bytes, make_image
from pipelines.etl.decode import IMAGE_ERROR_COL, PIXELS_COL, DecodeOptions, decode_batch
from pipelines.etl.embed import StageSpec, _stack, embed_batch
from pipelines.etl.read import FILE_COL

# different sizes, aspect ratios and modes, including ones the transform converts (RGBA, L, P, LA)
IMAGES = [((48, 40), "RGB"), ((20, 90), "RGBA"), ((33, 33), "L"), ((100, 31), "P"), ((7, 5), "LA"),
          ((301, 64), "RGB")]


def _images():
    return [make_image(i, size, mode) for i, (size, mode) in enumerate(IMAGES)]


def _decode(values, transform, texts=None, root: str = "/nonexistent") -> pa.Table:
    """``values`` are encoded images (bytes) or paths relative to ``root`` (str), one kind per call."""
    from clip_core.tokenizer import get_default_tokenizer

    kind = pa.string() if any(isinstance(v, str) for v in values) else pa.binary()
    columns = {"image": pa.array(values, kind), FILE_COL: pa.array([0] * len(values), pa.int32())}
    if texts is not None:
        columns["text"] = pa.array(texts, pa.string())
    opts = DecodeOptions(image_column="image", text_column="text" if texts is not None else None,
                         manifest_dirs=[root], transform=transform, tokenizer=get_default_tokenizer(),
                         context_length=77, io_threads=2)
    return decode_batch(pa.table(columns), opts)


def _float_path(encoder, images) -> np.ndarray:
    """Today's reference: the OpenAI float transform per image, stacked, through the encoder."""
    r = encoder.image_size
    return encoder.encode_images(torch.stack([image_transform(r)(img) for img in images]))  # [N, D]


@pytest.fixture(scope="module", params=["torch", "onnx"])
def encoder(request, tiny_checkpoint, tiny_encoder):  # noqa: F811 (fixture)
    if request.param == "torch":
        return tiny_encoder
    from clip_core.encoders import load_encoder

    return load_encoder(tiny_checkpoint, backend="onnx", precision="fp32", device="cpu", num_threads=1)


def test_uint8_path_embeddings_equal_the_float_path(encoder):
    assert encoder.precision == "fp32"
    images = _images()
    table = _decode([image_bytes(img, "PNG") for img in images], encoder.preprocess)
    out = embed_batch(table, encoder, StageSpec(images=True, texts=False))
    assert out.column("status").to_pylist() == ["ok"] * len(images)
    got = np.array(out.column("image_embedding").to_pylist(), np.float32)
    ref = _float_path(encoder, images)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert np.abs(got - ref).max() <= 1e-6


def test_pixels_column_is_uint8_r_r_3(tiny_encoder):  # noqa: F811 (fixture)
    images = _images()
    for transform in (tiny_encoder.preprocess, image_transform(224)):
        r = transform.resolution
        col = _decode([image_bytes(img, "PNG") for img in images], transform).column(PIXELS_COL)
        assert col.type == pa.binary(r * r * 3)
        assert col.nbytes == len(images) * r * r * 3  # no offsets, no validity bitmap: bytes are pixels
        for cell, img in zip(col.to_pylist(), images):
            assert cell == resize_crop(img, r).tobytes()


def test_missing_and_failed_images_keep_rows_aligned(tiny_encoder, tmp_path):  # noqa: F811 (fixture)
    images = _images()[:4]
    for i, img in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(img, "PNG"))
    (tmp_path / "text.png").write_text("not an image")
    values = ["0.png", None, "text.png", "1.png", "missing.png", "2.png", None, "3.png"]
    texts = [None, "a text", None, None, "another text", None, None, "third"]
    good = {0: 0, 3: 1, 5: 2, 7: 3}  # row -> image
    table = _decode(values, tiny_encoder.preprocess, texts, root=str(tmp_path))
    pixels = table.column(PIXELS_COL)
    assert [i for i, v in enumerate(pixels.to_pylist()) if v is not None] == sorted(good)
    errors = table.column(IMAGE_ERROR_COL).to_pylist()
    assert errors[2].startswith("image.not_an_image") and errors[4].startswith("image.missing_file")

    # Ray Data hands the actor slices and several chunks: the alignment must survive both
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=3))
    assert chunked.column(PIXELS_COL).num_chunks == 3
    out = embed_batch(chunked, tiny_encoder, StageSpec(images=True, texts=True))
    emb = out.column("image_embedding").to_pylist()
    assert [i for i, v in enumerate(emb) if v is not None] == sorted(good)
    ref = _float_path(tiny_encoder, images)
    got = np.array([emb[i] for i in sorted(good)], np.float32)
    assert np.abs(got - ref[[good[i] for i in sorted(good)]]).max() <= 1e-6
    status = out.column("status").to_pylist()
    assert status == ["ok", "ok", "error", "ok", "error", "ok", "error", "ok"]
    assert out.column("error").to_pylist()[6].startswith("row.no_input")


def test_stack_views_the_arrow_buffer_and_respects_offsets_and_nulls():
    rows = np.arange(5 * 12, dtype=np.uint8).reshape(5, 2, 2, 3)
    cells = [r.tobytes() for r in rows]
    fixed = pa.array(cells, pa.binary(12))
    arr, valid = _stack(pa.chunked_array([fixed]), np.uint8, (2, 2, 3))
    assert valid.all() and np.array_equal(arr, rows)
    assert arr.__array_interface__["data"][0] == fixed.buffers()[1].address  # a view, no copy

    with_nulls = pa.array([cells[0], None, cells[2], cells[3], None], pa.binary(12))
    sliced = pa.chunked_array([with_nulls.slice(1, 3), with_nulls.slice(4)])  # offsets != 0
    arr, valid = _stack(sliced, np.uint8, (2, 2, 3))
    assert valid.tolist() == [False, True, True, False]
    assert np.array_equal(arr, rows[[2, 3]])

    tokens = np.arange(4 * 6, dtype=np.int64).reshape(4, 6)
    binary = pa.array([tokens[0].tobytes(), None, tokens[2].tobytes(), tokens[3].tobytes()], pa.binary())
    arr, valid = _stack(pa.chunked_array([binary.slice(1)]), np.int64, (6,))
    assert valid.tolist() == [False, True, True] and np.array_equal(arr, tokens[2:])

    arr, valid = _stack(pa.chunked_array([], pa.binary(12)), np.uint8, (2, 2, 3))
    assert arr.shape == (0, 2, 2, 3) and valid.shape == (0,)
    with pytest.raises(ValueError):
        _stack(pa.chunked_array([fixed]), np.uint8, (3, 3, 3))


class _DeviceRecorder:
    """An encoder stub that records where and in what form the pixels reach ``encode_images``."""

    embed_dim = 4
    image_size = 8

    def __init__(self, backend: str, device: str):
        self.backend, self.device = backend, device
        self.preprocess = image_transform(self.image_size)
        self.seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        self.seen.append((pixels.device.type, pixels.dtype, tuple(pixels.shape)))
        return np.ones((pixels.shape[0], self.embed_dim), np.float32) / 2


@pytest.mark.parametrize("backend, device, expected", [
    ("torch", "meta", "meta"),  # stands in for a GPU: normalisation runs on the encoder's device
    ("onnx", "meta", "cpu"),  # ONNX sessions take host arrays: normalised on the CPU
])
def test_normalisation_runs_where_the_backend_wants_it(backend, device, expected):
    enc = _DeviceRecorder(backend, device)
    table = _decode([image_bytes(img, "PNG") for img in _images()[:3]], enc.preprocess)
    embed_batch(table, enc, StageSpec(images=True, texts=False))
    assert enc.seen == [(expected, torch.float32, (3, 3, 8, 8))]

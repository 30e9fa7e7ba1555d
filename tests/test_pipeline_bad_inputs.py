"""A manifest full of bad inputs: every row comes out, with the exact status and cause.

Row-level failures never fail the job: it exits 0, counts in == counts out, and each bad row
says why (``image.<cause>`` / ``text.<cause>`` / ``row.no_input``). The run sets
``input.allowed_roots`` to the files' folder, so paths that leave it (``..``, a symlink) are
refused; a named pipe posing as a JPEG must not block a reader.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline_fixtures import ray_local, tiny_checkpoint, tiny_encoder  # noqa: F401 (fixtures)
from pipeline_fixtures import image_bytes, make_image, read_results, write_manifest
from pipelines import cli

LONG_TEXT = " ".join(f"word{i}" for i in range(3000))
MAX_IMAGE_BYTES = 150_000


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 30000 x 30000 pixels."""
    from PIL import Image

    data = bytearray(image_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])  # type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", 30000, 30000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def make_bad_files(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}

    def put(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        files[name] = folder / name

    put("good.png", image_bytes(make_image(1), "PNG"))
    put("zero.jpg", b"")
    put("random.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    jpeg = image_bytes(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)), "JPEG", quality=95)
    put("truncated.jpg", jpeg[: len(jpeg) // 2])
    put("text.jpg", b"this is a text file, not a picture\n" * 20)
    (folder / "a_directory.jpg").mkdir()
    files["a_directory.jpg"] = folder / "a_directory.jpg"
    put("cmyk.jpg", image_bytes(make_image(2).convert("CMYK"), "JPEG"))
    sixteen = Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16))
    put("sixteen.png", image_bytes(sixteen, "PNG"))
    pal = make_image(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("palette.png", image_bytes(pal, "PNG", transparency=0))
    put("one.png", image_bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    put("bomb.png", _bomb_png())
    noise = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    put("huge_file.png", image_bytes(noise, "PNG"))  # > MAX_IMAGE_BYTES
    put("page.jpg", b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>\n")
    os.mkfifo(folder / "fifo.jpg")  # opening it for reading would wait for a writer forever
    files["fifo.jpg"] = folder / "fifo.jpg"
    outside = folder.parent / "outside.png"  # a real image, but outside the allowed root
    outside.write_bytes(image_bytes(make_image(4), "PNG"))
    (folder / "link_out.png").symlink_to(outside)
    files["link_out.png"] = folder / "link_out.png"
    (folder / "link_in.png").symlink_to(folder / "good.png")
    files["link_in.png"] = folder / "link_in.png"
    return files


def _string_column(values: list) -> pa.Array:
    """A string column that may hold bytes that are not UTF-8, as other writers produce them
    (Parquet does not check; pyarrow's own constructors would refuse)."""
    raw = pa.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), null_count=raw.null_count)


# (id, image file or None or "MISSING", text, expected status, expected error causes)
CASES = [
    ("good", "good.png", "a good row", "ok", []),
    ("zero", "zero.jpg", None, "error", ["image.empty_file"]),
    ("random", "random.jpg", None, "error", ["image.not_an_image"]),
    ("truncated", "truncated.jpg", None, "error", ["image.truncated"]),
    ("text_as_jpg", "text.jpg", None, "error", ["image.not_an_image"]),
    ("missing", "MISSING", None, "error", ["image.missing_file"]),
    ("directory", "a_directory.jpg", None, "error", ["image.not_a_file"]),
    ("cmyk", "cmyk.jpg", None, "ok", []),
    ("sixteen_bit", "sixteen.png", None, "ok", []),
    ("palette_alpha", "palette.png", None, "ok", []),
    ("one_pixel", "one.png", None, "ok", []),
    ("bomb", "bomb.png", None, "error", ["image.too_large"]),
    ("huge_file", "huge_file.png", None, "error", ["image.too_large"]),
    ("empty_text", "good.png", "", "error", ["text.empty"]),
    ("blank_text", None, "   \n", "error", ["text.empty"]),
    ("long_text", None, LONG_TEXT, "ok", []),
    ("nothing", None, None, "error", ["row.no_input"]),
    ("text_only", None, "only a text", "ok", []),
    ("image_only", "one.png", None, "ok", []),
    ("missing_with_text", "MISSING", "a text that works", "error", ["image.missing_file"]),
    ("html_page", "page.jpg", None, "error", ["image.not_an_image"]),
    ("fifo", "fifo.jpg", None, "error", ["image.not_a_file"]),
    ("dotdot_out", "../outside.png", None, "error", ["image.not_allowed"]),
    ("symlink_out", "link_out.png", None, "error", ["image.not_allowed"]),
    ("symlink_in", "link_in.png", None, "ok", []),
    ("nul_text", None, "a cat\x00 on a mat", "ok", []),
    ("not_utf8_text", None, b"caf\xe9 au lait", "error", ["text.not_utf8"]),
    ("not_utf8_path", "NOT_UTF8", None, "error", ["image.not_utf8"]),
]


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    files = make_bad_files(root / "files")
    images = []
    for _, name, *_ in CASES:
        if name is None:
            images.append(None)
        elif name == "MISSING":
            images.append(str(root / "files" / "does_not_exist.jpg"))
        elif name == "NOT_UTF8":
            images.append(b"files/\xff\xfe.jpg")
        else:
            images.append(f"files/{name}")  # relative to the manifest
    manifest = write_manifest(root / "manifest.parquet", {
        "id": [c[0] for c in CASES], "image": _string_column(images), "text": _string_column([c[2] for c in CASES])})
    return root, manifest, files


@pytest.mark.e2e
def test_bad_inputs_give_exact_statuses(ray_local, bad_manifest, tiny_checkpoint, tmp_path):
    root, manifest, _ = bad_manifest
    out = tmp_path / "out"
    rc = cli.main(["run", f"input.path={manifest}", f"input.allowed_roots=[{root / 'files'}]",
                   f"output.path={out}", f"model.checkpoint={tiny_checkpoint}",
                   "model.precision=fp32", "output.shard_size=7", "embed.batch_size=4", "decode.batch_size=5",
                   f"decode.max_image_bytes={MAX_IMAGE_BYTES}", "label.classes=[red, green]",
                   "index.enabled=false"])
    assert rc == 0
    assert (out / "_SUCCESS").exists()
    table = read_results(out)
    assert table.num_rows == len(CASES)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(c[0] for c in CASES)
    for rid, name, text, status, causes in CASES:
        row = rows[rid]
        assert row["status"] == status, (rid, row["error"])
        if causes:
            for cause in causes:
                assert row["error"].startswith(cause) or f"; {cause}" in row["error"], (rid, row["error"])
        else:
            assert row["error"] is None, (rid, row["error"])
        image_ok = name is not None and not any(c.startswith("image.") for c in causes)
        assert (row["image_embedding"] is not None) == bool(image_ok), rid
        text_ok = isinstance(text, str) and bool(text.strip())
        assert (row["text_embedding"] is not None) == text_ok, rid
        assert (row["label"] is not None) == bool(image_ok), rid
    # messages name the cause and the file
    assert "does_not_exist.jpg" in rows["missing"]["error"]
    assert "truncated.jpg" in rows["truncated"]["error"]

    record = json.loads((out / "_run.json").read_text())
    counts = record["counts"]
    n_err = sum(1 for c in CASES if c[3] == "error")
    assert (counts["rows_in"], counts["rows_out"], counts["ok"], counts["error"]) == (
        len(CASES), len(CASES), len(CASES) - n_err, n_err)
    assert counts["errors_by_cause"] == {
        "image.empty_file": 1, "image.missing_file": 2, "image.not_a_file": 2, "image.not_allowed": 2,
        "image.not_an_image": 3, "image.not_utf8": 1, "image.too_large": 2, "image.truncated": 1,
        "row.no_input": 1, "text.empty": 2, "text.not_utf8": 1}


# -- the same files through the pure functions (no Ray): quick and precise ------------------
@pytest.fixture(scope="module")
def decode_opts(tiny_encoder, bad_manifest):
    from pipelines.etl.decode import DecodeOptions

    root, _, _ = bad_manifest
    return DecodeOptions(image_column="image", text_column="text", manifest_dirs=[str(root)],
                         transform=tiny_encoder.preprocess, tokenizer=tiny_encoder._tokenizer,
                         context_length=tiny_encoder.context_length, max_image_bytes=MAX_IMAGE_BYTES, io_threads=1,
                         allowed_roots=(str(root / "files"),))


@pytest.mark.parametrize("rid, name, text, status, causes",
                         [c for c in CASES if c[1] not in (None, "MISSING", "NOT_UTF8")])
def test_decode_image_causes(decode_opts, rid, name, text, status, causes):
    from pipelines.etl.decode import decode_images

    pixels, errors = decode_images([f"files/{name}"], [0], decode_opts)
    image_causes = [c for c in causes if c.startswith("image.")]
    if image_causes:
        assert pixels == [None] and errors[0].startswith(image_causes[0] + ":"), errors
    else:
        r = decode_opts.transform.resolution
        assert errors == [None] and len(pixels[0]) == 3 * r * r  # uint8 [R, R, 3]


def test_decode_bytes_and_uris(decode_opts, bad_manifest):
    from pipelines.etl.decode import decode_images

    _, _, files = bad_manifest
    pixels, errors = decode_images([files["good.png"].read_bytes(), b"", "http://example.com/x.jpg", ""], [0] * 4,
                                   decode_opts)
    assert pixels[0] is not None and errors[0] is None
    assert errors[1].startswith("image.empty_file")
    assert errors[2].startswith("image.unsupported_uri")
    assert errors[3].startswith("image.missing_file")


def test_tokenize_texts(decode_opts):
    import dataclasses

    from pipelines.etl.decode import tokenize_texts

    tokens, errors = tokenize_texts(["ok", "", None, LONG_TEXT], decode_opts)
    assert tokens[0] is not None and tokens[3] is not None and tokens[2] is None
    # int32 ids cross the object store: 4 bytes a position, the tokenizer's ids exactly
    assert len(tokens[0]) == 4 * decode_opts.context_length
    expected = decode_opts.tokenizer(["ok"], context_length=decode_opts.context_length, truncate=True)
    assert np.frombuffer(tokens[0], np.int32).tolist() == np.asarray(expected)[0].tolist()
    assert errors == [None, "text.empty: text is empty", None, None]
    strict = dataclasses.replace(decode_opts, truncate_text=False)
    tokens, errors = tokenize_texts(["ok", LONG_TEXT], strict)
    assert errors[0] is None and tokens[1] is None and errors[1].startswith("text.too_long:")


# -- manifests that cannot be used: one clear job-level error before any work starts --------
def _ids_not_utf8() -> pa.Array:
    return _string_column(["a", b"b\xff"])


BAD_MANIFESTS = {
    # name: (files as {file name: columns}, words the error must contain)
    "mixed_id_types": ({"a.parquet": {"id": [1, 2], "text": ["x", "y"]},
                        "b.parquet": {"id": ["c", "d"], "text": ["z", "w"]}}, ["incompatible schemas"]),
    "float_ids": ({"m.parquet": {"id": [1.5, 2.5], "text": ["x", "y"]}}, ["id column", "string or integer"]),
    "int_texts": ({"m.parquet": {"id": ["a", "b"], "text": [1, 2]}}, ["'text'", "must hold strings"]),
    "int_images": ({"m.parquet": {"id": ["a", "b"], "image": [1, 2]}}, ["'image'", "paths (string) or encoded"]),
    "column_missing_in_one_file": ({"a.parquet": {"id": ["a"], "image": ["x.png"], "text": ["x"]},
                                    "b.parquet": {"id": ["b"], "text": ["y"]}}, ["'image'", "missing from", "b.parquet"]),
    "no_usable_column": ({"m.parquet": {"id": ["a"], "caption": ["x"]}}, ["no 'image' or 'text' column"]),
    "ids_not_utf8": ({"m.parquet": {"id": _ids_not_utf8(), "text": ["x", "y"]}}, ["id column", "not valid UTF-8"]),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_an_unusable_manifest_fails_before_any_work(ray_local, name, tiny_checkpoint, tmp_path, capsys):
    files, words = BAD_MANIFESTS[name]
    for file, columns in files.items():
        write_manifest(tmp_path / "in" / file, columns)
    out = tmp_path / "out"
    rc = cli.main(["run", f"input.path={tmp_path / 'in'}", f"output.path={out}", f"model.checkpoint={tiny_checkpoint}",
                   "index.enabled=false"])
    assert rc == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clip-etl: error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (out / "_plan.json").exists() and not (out / "results").exists()

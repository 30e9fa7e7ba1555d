"""The decode stage's own mechanics: a decode task decodes one image at a time while fetches run
ahead (bounded), one slow file costs at most ``decode.timeout_s``, paths stay inside
``input.allowed_roots``, and ``jpeg_draft`` is the fast path with the exact path one setting away."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from clip_core.preprocess import image_transform, load_image, resize_crop
from clip_core.tokenizer import get_default_tokenizer
from pipelines.etl import decode as decode_mod
from pipelines.etl.decode import DecodeOptions, decode_images


def _options(root, **kw) -> DecodeOptions:
    return DecodeOptions(image_column="image", text_column=None, manifest_dirs=[str(root)],
                         transform=image_transform(32), tokenizer=get_default_tokenizer(), context_length=77, **kw)


def _write_jpegs(root, n: int, size=(400, 300)) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        arr = np.clip(rng.normal(128, 40, (size[1] // 10, size[0] // 10, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).resize(size, Image.BICUBIC).save(root / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
    return names


@pytest.mark.parametrize("timeout_s", [60.0, None])
def test_decoding_is_one_image_at_a_time_and_fetches_are_bounded(tmp_path, monkeypatch, timeout_s):
    names = _write_jpegs(tmp_path, 12)
    decode_threads, in_flight, peak = set(), [0, 0], [0, 0]  # [fetches, decodes]
    lock = threading.Lock()
    real_fetch, real_decode = decode_mod.fetch_image_bytes, decode_mod.decode_fetched

    def counted(k: int, fn, *args):
        with lock:
            in_flight[k] += 1
            peak[k] = max(peak[k], in_flight[k])
        try:
            return fn(*args)
        finally:
            with lock:
                in_flight[k] -= 1

    def slow_fetch(value, manifest_dir, opts):
        def fetch():
            time.sleep(0.02)
            return real_fetch(value, manifest_dir, opts)
        return counted(0, fetch)

    def recording_decode(data, where, opts):
        decode_threads.add(threading.get_ident())
        return counted(1, real_decode, data, where, opts)

    monkeypatch.setattr(decode_mod, "fetch_image_bytes", slow_fetch)
    monkeypatch.setattr(decode_mod, "decode_fetched", recording_decode)
    opts = _options(tmp_path, io_threads=3, timeout_s=timeout_s)
    pixels, errors = decode_images(names + ["missing.jpg", None], [0] * 14, opts)
    assert peak[1] == 1  # one CPU-bound decode at a time per task
    if timeout_s is None:  # no limit to watch: decoding stays on the calling thread
        assert decode_threads == {threading.get_ident()}
    assert 2 <= peak[0] <= 3  # fetches overlapped, never more than io_threads at once
    assert all(p is not None for p in pixels[:12]) and errors[:12] == [None] * 12
    assert errors[12].startswith("image.missing_file") and pixels[12] is None  # order kept around errors
    assert pixels[13] is None and errors[13] is None  # a null cell is no error


@pytest.mark.parametrize("decode_threads", [1, 2])
def test_a_slow_decode_times_out_and_the_batch_moves_on(tmp_path, monkeypatch, decode_threads):
    names = _write_jpegs(tmp_path, 6)
    release = threading.Event()
    real_decode = decode_mod.decode_fetched

    def decode_that_hangs_on_2(data, where, opts):
        if where.endswith("2.jpg"):
            release.wait(30)  # a decoder stuck in C: nothing can interrupt it
        return real_decode(data, where, opts)

    monkeypatch.setattr(decode_mod, "decode_fetched", decode_that_hangs_on_2)
    t0 = time.monotonic()
    pixels, errors = decode_images(names, [0] * 6, _options(tmp_path, timeout_s=0.5, decode_threads=decode_threads))
    elapsed = time.monotonic() - t0
    release.set()
    assert elapsed < 5, elapsed
    assert errors[2].startswith("image.timeout: decoding the image took longer than 0.5 s") and pixels[2] is None
    assert all(p is not None for k, p in enumerate(pixels) if k != 2)
    assert [e for k, e in enumerate(errors) if k != 2] == [None] * 5


def test_a_fetch_that_hangs_times_out(tmp_path, monkeypatch):
    names = _write_jpegs(tmp_path, 4)
    release = threading.Event()
    real_fetch = decode_mod.fetch_image_bytes

    def fetch_that_hangs_on_1(value, manifest_dir, opts):
        if value == "1.jpg":
            release.wait(30)  # a stalled network mount or S3 connection
        return real_fetch(value, manifest_dir, opts)

    monkeypatch.setattr(decode_mod, "fetch_image_bytes", fetch_that_hangs_on_1)
    t0 = time.monotonic()
    pixels, errors = decode_images(names, [0] * 4, _options(tmp_path, timeout_s=0.5, io_threads=2))
    elapsed = time.monotonic() - t0
    release.set()
    assert elapsed < 5, elapsed
    assert errors[1].startswith("image.timeout: fetching the image") and pixels[1] is None
    assert errors[0] is errors[2] is errors[3] is None and None not in (pixels[0], pixels[2], pixels[3])


def test_allowed_roots_follow_symlinks_and_dotdot(tmp_path):
    from pipelines.etl.decode import RowError, allowed_path

    (tmp_path / "data").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "data" / "ok.png").write_bytes(b"x")
    (tmp_path / "data" / "link.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "data2").mkdir()  # shares a name prefix with the root, but is not inside it
    roots = (str(tmp_path / "data"),)
    assert allowed_path(str(tmp_path / "data" / "ok.png"), roots) == str(tmp_path / "data" / "ok.png")
    assert allowed_path(str(tmp_path / "x" / "ok.png"), ()) == str(tmp_path / "x" / "ok.png")  # no roots: anything
    for bad in (tmp_path / "data" / "link.png", tmp_path / "data" / ".." / "secret.png", tmp_path / "data2" / "a.png"):
        with pytest.raises(RowError) as e:
            allowed_path(str(bad), roots)
        assert e.value.cause == "not_allowed"
    s3_roots = ("s3://bucket/images/",)
    assert allowed_path("s3://bucket/images/a/b.jpg", s3_roots) == "s3://bucket/images/a/b.jpg"
    for bad in ("s3://bucket/images/../private/x.jpg", "s3://bucket/imagesX/a.jpg", "s3://other/images/a.jpg",
                str(tmp_path / "data" / "ok.png")):
        with pytest.raises(RowError) as e:
            allowed_path(bad, s3_roots)
        assert e.value.cause == "not_allowed"


def test_jpeg_draft_is_the_default_and_false_is_the_exact_path(tmp_path):
    names = _write_jpegs(tmp_path, 3, size=(800, 600))  # 600 // 64 = 9: decodes at 1/8
    exact = [resize_crop(load_image((tmp_path / n).read_bytes()), 32).tobytes() for n in names]
    full, _ = decode_images(names, [0] * 3, _options(tmp_path, jpeg_draft=False))
    assert full == exact
    draft, _ = decode_images(names, [0] * 3, _options(tmp_path))
    assert draft != exact
    diff = [np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8)).mean() for a, b in zip(draft, exact)]
    assert max(diff) < 2.0, diff


def test_decode_threads_decode_in_parallel_and_keep_the_order(tmp_path, monkeypatch):
    names = _write_jpegs(tmp_path, 8)
    serial, _ = decode_images(names, [0] * 8, _options(tmp_path))
    threads, real_decode = set(), decode_mod.decode_fetched

    def recording_decode(data, where, opts):
        threads.add(threading.get_ident())
        time.sleep(0.01)  # long enough that both workers take images
        return real_decode(data, where, opts)

    monkeypatch.setattr(decode_mod, "decode_fetched", recording_decode)
    parallel, errors = decode_images(names + ["missing.jpg"], [0] * 9, _options(tmp_path, decode_threads=2))
    assert parallel[:8] == serial and errors[8].startswith("image.missing_file")
    assert len(threads) == 2 and threading.get_ident() not in threads


def test_error_causes_come_from_the_exception_not_its_message(tmp_path, monkeypatch):
    """A cause is what the decoder says it is (``ImageDecodeError.cause``, ``TextTooLongError``),
    whatever words its message happens to use."""
    import clip_core.preprocess as preprocess
    from clip_core.preprocess import ImageDecodeError
    from pipelines.etl.decode import tokenize_texts

    names = _write_jpegs(tmp_path, 1)

    def misleading(*args, **kwargs):
        raise ImageDecodeError("this message says truncated and not an image", "too_large")

    monkeypatch.setattr(preprocess, "load_image", misleading)
    _, errors = decode_images(names, [0], _options(tmp_path))
    assert errors[0].startswith("image.too_large: this message says truncated")

    long_text = "word " * 200
    _, errors = tokenize_texts([long_text, "fine"], _options(tmp_path, truncate_text=False))
    assert errors[0].startswith("text.too_long:") and errors[1] is None


def test_image_decode_errors_carry_their_cause():
    import io

    from PIL import Image

    from clip_core.preprocess import ImageDecodeError

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    for source, cause in ((b"", "empty_file"), (b"<html>404</html>", "not_an_image"),
                          (data[: len(data) // 2], "truncated")):
        try:
            load_image(source)
        except ImageDecodeError as e:
            assert e.cause == cause, (cause, e)
        else:
            raise AssertionError(f"{cause}: no error")
    try:
        load_image(data, max_pixels=100)
    except ImageDecodeError as e:
        assert e.cause == "too_large"

"""The Encoder interface: the model's numbers, exact text trimming, threads, fingerprints, fast-path accuracy."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_core
from clip_core import CLIPConfig, create_model, save_model
from clip_core.checkpoints import load_model
from clip_core.encoders import (
    EncoderError,
    cpu_has_native_bf16,
    cpu_prefers_int8_images,
    load_encoder,
    resolve_backend,
    resolve_num_threads,
    resolve_precision,
)
from clip_core.int8 import int8_matmul_is_exact

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(clip_core.__file__).parent / "assets" / "demo-model.safetensors"
TEXTS = ["a photo of a cat", "a red square on a dark background, slightly rotated", "x", "two dogs on a beach"]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model("tiny-test").eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(tiny_model, path)
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Exports made on the fly go to a per-session cache, never the user's home."""
    monkeypatch.setenv("CLIP_ETL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pixels(n: int, r: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, r, r, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- numbers
def test_torch_backend_matches_the_model(tiny_model, tiny_ckpt):
    enc = load_encoder(tiny_ckpt, "torch", "fp32")
    px = pixels(3)
    tokens = enc.tokenize(TEXTS)
    img, txt = enc.encode_images(px), enc.encode_texts(tokens)
    assert img.dtype == np.float32 and img.shape == (3, 32) and txt.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-6)
    with torch.no_grad():
        want_img = F.normalize(tiny_model.encode_image(px), dim=-1).numpy()
        want_txt = F.normalize(tiny_model.encode_text(tokens), dim=-1).numpy()  # full 77 tokens
    assert np.abs(img - want_img).max() <= 1e-6
    assert np.abs(txt - want_txt).max() <= 1e-6


def test_text_trimming_is_exact(tiny_model):
    enc = load_encoder(tiny_model, "torch", "fp32")
    texts = [" ".join(["word"] * k) for k in range(1, 40)]  # 39 rows, lengths 3..41: several buckets
    tokens = enc.tokenize(texts)
    trimmed = enc.encode_texts(tokens)
    enc.trim_text = False
    full = enc.encode_texts(tokens)
    assert np.abs(trimmed - full).max() <= 1e-6


def test_strings_and_tokens_give_identical_results(tiny_model):
    enc = load_encoder(tiny_model, "torch", "fp32")
    from_strings = enc.encode_texts(TEXTS)
    np.testing.assert_array_equal(from_strings, enc.encode_texts(enc.tokenize(TEXTS)))
    np.testing.assert_array_equal(from_strings, enc.encode_texts(enc.tokenize(TEXTS).numpy()))
    assert np.abs(from_strings[:1] - enc.encode_texts(TEXTS[0])).max() <= 1e-6  # alone: trimmed shorter
    long = "word " * 200  # strings are tokenized with truncation
    assert enc.encode_texts([long]).shape == (1, 32)
    assert enc.tokenize([long]).shape == (1, enc.context_length)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_empty_inputs(tiny_model, backend):
    enc = load_encoder(tiny_model, backend)
    for out in (enc.encode_images(torch.zeros(0, 3, 32, 32)), enc.encode_images(np.zeros((0, 3, 32, 32), np.float32)),
                enc.encode_texts([]), enc.encode_texts(torch.zeros(0, 77, dtype=torch.long))):
        assert out.shape == (0, 32) and out.dtype == np.float32


def test_bad_inputs_are_clear_errors(tiny_model):
    enc = load_encoder(tiny_model, "torch", "fp32")
    with pytest.raises(EncoderError, match=r"pixels must be \[N, 3, 32, 32\]"):
        enc.encode_images(torch.zeros(2, 3, 64, 64))
    with pytest.raises(EncoderError, match="floating point"):
        enc.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(EncoderError, match="integers"):
        enc.encode_texts(torch.zeros(1, 5))
    with pytest.raises(EncoderError, match="context_length"):
        enc.encode_texts(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(EncoderError, match=r"must lie in \[0, 49408\)"):
        enc.encode_texts(torch.tensor([[49406, 60000, 49407]]))


def test_bad_requests_fail_before_any_export(tiny_ckpt, monkeypatch):
    import clip_core.export as export_mod

    def must_not_export(*a, **k):
        raise AssertionError("exported before checking the request")

    monkeypatch.setattr(export_mod, "export_model", must_not_export)
    with pytest.raises(EncoderError, match="runs at fp32 only"):
        load_encoder(tiny_ckpt, "onnx", "bf16")
    with pytest.raises(EncoderError, match="runs at int8 only"):
        load_encoder(tiny_ckpt, "onnx-int8", "fp32")


def test_numpy_and_list_pixels(tiny_model):
    enc = load_encoder(tiny_model, "torch", "fp32")
    px = pixels(2)
    want = enc.encode_images(px)
    np.testing.assert_array_equal(want, enc.encode_images(px.numpy()))
    np.testing.assert_array_equal(want, enc.encode_images([px[0], px[1]]))


# ------------------------------------------------------------------------------------------- identity
def test_attributes_and_info(tiny_model):
    enc = load_encoder(tiny_model, "torch", "fp32")
    assert (enc.embed_dim, enc.image_size, enc.context_length) == (32, 32, 77)
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    info = enc.info()
    for key in ("name", "backend", "precision", "device", "fingerprint", "embed_dim", "image_size", "context_length"):
        assert key in info
    assert info["device"] == "cpu" and info["backend"] == "torch"


def test_preprocess_is_picklable_and_fits_the_model(tiny_model):
    from PIL import Image

    enc = load_encoder(tiny_model, "torch", "fp32")
    transform = pickle.loads(pickle.dumps(enc.preprocess))
    x = transform(Image.new("RGB", (50, 40), (200, 30, 30)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert enc.encode_images(x[None]).shape == (1, 32)


def test_fingerprint_stable_and_distinct(tiny_ckpt, tmp_path):
    a = load_encoder(tiny_ckpt, "torch", "fp32")
    assert a.fingerprint == load_encoder(tiny_ckpt, "torch", "fp32").fingerprint
    prints = {a.fingerprint, load_encoder(tiny_ckpt, "torch", "bf16").fingerprint,
              load_encoder(tiny_ckpt, "onnx").fingerprint, load_encoder(tiny_ckpt, "onnx-int8").fingerprint}
    assert len(prints) == 4
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_model(create_model("tiny-test"), other)
    assert load_encoder(other, "torch", "fp32").fingerprint not in prints
    assert load_encoder(tiny_ckpt, "onnx").fingerprint == load_encoder(tiny_ckpt, "onnx").fingerprint


def test_onnx_from_a_checkpoint_exports_once_into_the_cache(tiny_ckpt, monkeypatch, tmp_path):
    import clip_core.export as export_mod

    monkeypatch.setenv("CLIP_ETL_CACHE_DIR", str(tmp_path / "cache"))
    first = load_encoder(tiny_ckpt, "onnx")
    made = list((tmp_path / "cache" / "exports").iterdir())
    assert len(made) == 1

    def no_second_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(export_mod, "export_model", no_second_export)
    second = load_encoder(tiny_ckpt, "onnx")
    np.testing.assert_array_equal(first.encode_texts(TEXTS), second.encode_texts(TEXTS))


# ------------------------------------------------------------------------------------------- resolution
def test_precision_resolution():
    assert resolve_precision("auto", "torch", "cuda") == "fp16"
    assert resolve_precision("auto", "torch", "cpu") == (
        "int8" if cpu_prefers_int8_images() else "bf16" if cpu_has_native_bf16() else "fp32")
    if int8_matmul_is_exact():
        assert resolve_precision("int8", "torch", "cpu") == "int8"
    else:  # no VNNI/AMX: the int8 matmul saturates, int8 is refused
        with pytest.raises(EncoderError, match="not exact"):
            resolve_precision("int8", "torch", "cpu")
    assert resolve_precision("auto", "onnx", "cpu") == "fp32"
    assert resolve_precision("auto", "onnx-int8", "cpu") == "int8"
    assert resolve_precision("auto", "torchscript", "cpu") == "fp32"
    with pytest.raises(EncoderError, match="needs a CUDA device"):
        resolve_precision("fp16", "torch", "cpu")
    with pytest.raises(EncoderError, match="runs on CPUs"):
        resolve_precision("int8", "torch", "cuda")
    with pytest.raises(EncoderError, match="runs at fp32 only"):
        resolve_precision("bf16", "onnx", "cpu")
    with pytest.raises(EncoderError, match="precision must be one of"):
        resolve_precision("fp8", "torch", "cpu")


def test_auto_backend_is_torch_on_cuda_and_bf16_cpus_and_exact_onnx_elsewhere(tiny_model, monkeypatch):
    import clip_core.encoders as encoders

    assert resolve_backend("auto", "cuda") == "torch" and resolve_backend("onnx-int8", "cpu") == "onnx-int8"
    monkeypatch.setattr(encoders, "cpu_has_native_bf16", lambda: True)
    assert resolve_backend("auto", "cpu") == "torch" and resolve_backend("auto", "cpu", "bf16") == "torch"
    assert resolve_backend("auto", "cpu", "fp32") == "onnx"  # fp32 asked: the faster exact backend
    assert resolve_backend("auto", "cpu", "int8") == "torch"
    monkeypatch.setattr(encoders, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU
    assert resolve_backend("auto", "cpu") == "onnx"
    enc = load_encoder(tiny_model, "auto", device="cpu")
    assert enc.backend == "onnx" and enc.precision == "fp32" and enc.device == "cpu"
    exact = load_encoder(tiny_model, "torch", "fp32", device="cpu")
    px, tokens = pixels(3), exact.tokenize(TEXTS)
    assert np.abs(enc.encode_images(px) - exact.encode_images(px)).max() <= 1e-4
    assert np.abs(enc.encode_texts(tokens) - exact.encode_texts(tokens)).max() <= 1e-4
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: auto falls back to torch
    assert resolve_backend("auto", "cpu") == "torch"


def test_unknown_backend_and_device(tiny_model):
    with pytest.raises(EncoderError, match="backend must be one of"):
        load_encoder(tiny_model, "tensorrt")
    with pytest.raises(EncoderError, match="device must be"):
        load_encoder(tiny_model, "torch", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="no CUDA device"):
            load_encoder(tiny_model, "torch", device="cuda")


def test_threads_are_the_ones_given(tiny_model, keep_threads):
    torch.set_num_threads(2)
    enc = load_encoder(tiny_model, "torch", "fp32", num_threads=1)
    assert enc.num_threads == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)  # someone else changed it: the next call restores ours
    enc.encode_images(pixels(1))
    assert torch.get_num_threads() == 1
    onnx_enc = load_encoder(tiny_model, "onnx", num_threads=1)
    opts = onnx_enc.session("image").get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    with pytest.raises(EncoderError, match="num_threads"):
        resolve_num_threads(0)


def test_default_threads_follow_cpus_and_ray(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert 1 <= resolve_num_threads() <= min(len(os.sched_getaffinity(0)), 32)

    def fake_ray(assigned: dict) -> types.ModuleType:
        ray = types.ModuleType("ray")
        worker_mod = types.SimpleNamespace(WORKER_MODE=1)
        ray._private = types.SimpleNamespace(worker=worker_mod)
        ctx = types.SimpleNamespace(worker=types.SimpleNamespace(mode=1), get_assigned_resources=lambda: assigned)
        ray.is_initialized = lambda: True
        ray.get_runtime_context = lambda: ctx
        return ray

    monkeypatch.setitem(sys.modules, "ray", fake_ray({"CPU": 3.0}))
    assert resolve_num_threads() == 3
    monkeypatch.setitem(sys.modules, "ray", fake_ray({"CPU": 0.5}))
    assert resolve_num_threads() == 1
    monkeypatch.setitem(sys.modules, "ray", fake_ray({}))  # an actor that reserved no CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_num_threads() == 2
    assert resolve_num_threads(5) == 5  # explicit wins


# ------------------------------------------------------------------------------------------- accuracy
def _photo_like(n: int, size: int, seed: int = 0):
    """Smooth gradients + filled shapes + noise (image statistics rather than white noise)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        base = rng.uniform(0, 255, 3) * (1 - t[..., None]) + rng.uniform(0, 255, 3) * t[..., None]
        img = Image.fromarray(base.astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.uniform(0, size * 0.7, 2)
            w = rng.uniform(size * 0.15, size * 0.5)
            fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + w], fill=fill)
        noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (size, size, 3))
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def accuracy_case():
    """(model, pixels, prompts, which): the bundled demo model on the product's synthetic images when
    it exists, else a random ViT-ish model on photo-like images (only cosine is meaningful then)."""
    if DEMO.is_file():
        from pipelines.demo.sample_data import class_names, draw, sample_spec

        model = load_model("demo")
        rng = np.random.default_rng(123)
        names = class_names()
        images = []
        for i in range(4 * len(names)):
            color, shape = names[i % len(names)].split(" ")
            images.append(draw(sample_spec(rng, shape, color), 96, rng))
        prompts = [f"a photo of a {n}" for n in names]
        which = "demo"
    else:
        torch.manual_seed(0)
        model = create_model(CLIPConfig.from_dict({
            "embed_dim": 64, "vision": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "heads": 2},
            "text": {"context_length": 32, "width": 128, "layers": 3, "heads": 2}})).eval()
        images = _photo_like(120, 96)
        colors, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "star")
        prompts = [f"a photo of a {c} {s}" for c in colors for s in shapes]
        which = "random"
    ref = load_encoder(model, "torch", "fp32")
    px = torch.stack([ref.preprocess(im) for im in images])
    return {"model": model, "pixels": px, "prompts": prompts, "which": which,
            "img": ref.encode_images(px), "txt": ref.encode_texts(prompts)}


def _compare(case, enc) -> dict[str, float]:
    img, txt = enc.encode_images(case["pixels"]), enc.encode_texts(case["prompts"])
    want = (case["img"] @ case["txt"].T).argmax(1)
    got = (img @ txt.T).argmax(1)
    figures = {"cos_img": float((img * case["img"]).sum(1).mean()), "cos_txt": float((txt * case["txt"]).sum(1).mean()),
               "top1_agreement": float((got == want).mean())}
    print(f"\n[{case['which']} model] {enc.backend}/{enc.precision} vs torch fp32: "
          + ", ".join(f"{k} {v:.6f}" for k, v in figures.items()))
    return figures


@pytest.mark.parametrize("backend,precision", [
    ("torch", "bf16"),
    pytest.param("torch", "int8", marks=pytest.mark.skipif(
        not int8_matmul_is_exact(), reason="no exact int8 matmul here (no VNNI/AMX): refused, see test_int8.py")),
    ("onnx-int8", "auto"),
])
def test_fast_paths_keep_accuracy(accuracy_case, backend, precision):
    figures = _compare(accuracy_case, load_encoder(accuracy_case["model"], backend, precision))
    assert figures["cos_img"] >= 0.99 and figures["cos_txt"] >= 0.99
    if backend == "torch":  # precision=auto picks bf16 or int8 images per CPU, on this bound
        assert min(figures["cos_img"], figures["cos_txt"]) >= 0.9999, figures
    if accuracy_case["which"] != "demo":
        pytest.skip("zero-shot agreement needs a trained model (random weights give near-tied logits); "
                    f"mean cosine held: {figures}")
    # On the bundled demo model (54 classes): measured 0.995 for onnx-int8 and for bf16 (BENCHMARKS.md).
    assert figures["top1_agreement"] >= 0.95


def test_onnx_fp32_matches_torch_on_the_accuracy_model(accuracy_case):
    enc = load_encoder(accuracy_case["model"], "onnx")
    assert np.abs(enc.encode_images(accuracy_case["pixels"][:16]) - accuracy_case["img"][:16]).max() <= 1e-4
    assert np.abs(enc.encode_texts(accuracy_case["prompts"]) - accuracy_case["txt"]).max() <= 1e-4


def test_demo_by_name():
    assert DEMO.is_file(), "the bundled demo model is part of the package"
    enc = load_encoder("demo")
    assert enc.name == "demo" and enc.encode_texts(["a red star"]).shape == (1, enc.embed_dim)


# ------------------------------------------------------------------------------------------- benchmark
def test_benchmark_quick_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "encoders.py"), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(l.startswith("ratio images best:") for l in lines), proc.stdout
    assert any(l.startswith("ratio texts best:") for l in lines), proc.stdout
    assert any("baseline transformers fp32" in l for l in lines)


def test_auto_precision_per_cpu_flags(monkeypatch):
    """int8 images only with AVX512-VNNI and AVX512-BF16 and no AMX (where it was measured fastest
    at the bound); bf16 on AMX; fp32 (ONNX) on AVX2-only CPUs."""
    import clip_core.encoders as encoders
    import clip_core.int8 as int8

    def cpu(*flags, exact_int8=True):
        monkeypatch.setattr(encoders, "cpu_info", lambda: {"model": "x", "cpus": 2, "flags": list(flags)})
        monkeypatch.setattr(int8, "int8_matmul_is_exact", lambda: exact_int8)
        return resolve_precision("auto", "torch", "cpu"), resolve_backend("auto", "cpu")

    assert cpu("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni") == ("int8", "torch")  # Zen 4/5
    assert cpu("avx2", "avx512f", "avx512_bf16", "avx512_vnni", exact_int8=False) == ("bf16", "torch")
    assert cpu("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8") \
        == ("bf16", "torch")  # Sapphire Rapids
    assert cpu("avx2", "fma") == ("fp32", "onnx")  # Zen 3
    assert cpu("avx2", "avx512f", "avx512_vnni")[0] == "fp32"  # VNNI without bf16: the exact ONNX path


def test_retain_freed_memory_stops_refaulting_freed_blocks():
    """Blocks above glibc's largest adaptive threshold (32 MB) are mapped and unmapped on every
    allocation: each reuse faults every page back in. With the fixed thresholds the heap keeps them."""
    probe = (
        "import resource, sys, torch\n"
        "from clip_core.encoders import retain_freed_memory\n"
        "if sys.argv[1] == 'retain':\n"
        "    assert retain_freed_memory()\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for i in range(6):\n"
        "    if i == 1:\n"
        "        start = faults()\n"
        "    a = torch.ones(12 << 20); b = torch.ones(12 << 20)  # 48 MB each\n"
        "    del a, b\n"
        "print((faults() - start) // 5)\n"
    )
    per_round = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                          check=True).stdout) for mode in ("default", "retain")}
    pages = 2 * (48 << 20) // 4096
    # measured: every page (default) against 10-20% of them (retained)
    assert per_round["default"] > 0.9 * pages and per_round["retain"] < 0.3 * pages, per_round

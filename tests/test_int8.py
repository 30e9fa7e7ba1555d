"""The int8 image tower (clip_core.int8): close to fp32, independent of the batch, text tower untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import os
import subprocess
import sys

from clip_core import create_model
from clip_core.encoders import load_encoder
from clip_core.int8 import Int8Linear, int8_matmul_is_exact, quantize_image_tower, quantize_rows

# The int8 tower runs only where the int8 matmul is exact (AVX512-VNNI, AMX-INT8); elsewhere it is
# refused, which test_int8_refused_where_the_int8_matmul_saturates checks on every CPU.
needs_exact_int8 = pytest.mark.skipif(not int8_matmul_is_exact(),
                                      reason="no exact int8 matmul on this CPU (no VNNI/AMX): int8 is refused here")


def test_the_probe_agrees_with_a_full_range_product():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (300, 768), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (768, 200), dtype=torch.int8, generator=g)
    assert int8_matmul_is_exact() == torch.equal(torch._int_mm(a, b), a.int() @ b.int())


def test_int8_refused_where_the_int8_matmul_saturates():
    """oneDNN limited to AVX2 (as on a CPU without VNNI) sums int8 pairs in saturating int16: the
    probe sees it and int8 is refused with a clear error; auto falls back to bf16/fp32."""
    probe = (
        "from clip_core.encoders import EncoderError, cpu_prefers_int8_images, resolve_precision\n"
        "from clip_core.int8 import int8_matmul_is_exact\n"
        "try:\n"
        "    resolve_precision('int8', 'torch', 'cpu')\n"
        "    refused = ''\n"
        "except EncoderError as e:\n"
        "    refused = str(e)\n"
        "print(int8_matmul_is_exact(), cpu_prefers_int8_images(), resolve_precision('auto', 'torch', 'cpu'))\n"
        "print(refused)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    flags, refused = out.splitlines()
    exact, prefers, auto = flags.split()
    assert (exact, prefers) == ("False", "False") and auto in ("bf16", "fp32"), out
    assert "not exact" in refused and "'bf16'" in refused, out


def test_rows_quantize_on_their_own_scale():
    x = torch.tensor([[0.5, -1.0, 0.25], [100.0, 50.0, -25.0], [0.0, 0.0, 0.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().amax(1).tolist() == [127, 127, 0]
    # a row of large values leaves the small rows' resolution alone; zeros stay zeros
    assert torch.allclose(q.float() * scale, x, atol=float(scale.max()) / 2 + 1e-6)
    assert (q.float() * scale)[0].sub(x[0]).abs().max() <= 1.0 / 127 / 2 + 1e-7


@needs_exact_int8
def test_int8_linear_is_close_to_fp32_and_batch_independent():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    x = torch.randn(5, 7, 64, generator=g)  # [B, L, K]
    layer = Int8Linear(weight, bias)
    got, want = layer(x), F.linear(x, weight, bias)  # [B, L, N]
    assert got.shape == want.shape == (5, 7, 96) and got.dtype == torch.float32
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.01, rel  # quantized (not exact), within 1% of fp32
    # every row has its own activation scale: a row gives the same result alone as in any batch
    assert torch.equal(layer(x[2:3]), got[2:3])
    assert torch.equal(layer(torch.cat([x[:1] * 1000, x[1:]]))[1:], got[1:])
    assert Int8Linear(weight, None)(x).sub(got - bias).abs().max() < 1e-4


@needs_exact_int8
def test_quantized_image_tower_keeps_the_bound_and_leaves_text_alone():
    torch.manual_seed(0)
    model = create_model("tiny-test").eval()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(6, 3, model.image_size, model.image_size, generator=g)
    tokens = torch.randint(1, 400, (3, model.context_length), generator=g)
    with torch.no_grad():
        ref_img = F.normalize(model.encode_image(pixels), dim=-1)
        ref_txt = model.encode_text(tokens)
        quantize_image_tower(model)
        img = F.normalize(model.encode_image(pixels), dim=-1)
        assert torch.equal(model.encode_text(tokens), ref_txt)
    assert all(isinstance(b.mlp.c_fc, Int8Linear) and isinstance(b.attn.in_proj, Int8Linear)
               for b in model.visual.transformer.resblocks)
    cos = (img * ref_img).sum(-1)
    assert cos.min() > 0.999 and not torch.equal(img, ref_img), cos
    with pytest.raises(ValueError, match="float32"):
        quantize_image_tower(create_model("tiny-test").to(torch.bfloat16))


@needs_exact_int8
def test_torch_int8_encoder():
    """precision=int8 on the torch backend: int8 images near fp32, texts as the bf16/fp32 tower."""
    torch.manual_seed(0)
    tiny_model = create_model("tiny-test").eval()
    exact = load_encoder(tiny_model, "torch", "fp32", device="cpu")
    enc = load_encoder(tiny_model, "torch", "int8", device="cpu")
    assert (enc.backend, enc.precision) == ("torch", "int8") and enc.fingerprint != exact.fingerprint
    g = torch.Generator().manual_seed(2)
    px = torch.randn(4, 3, exact.image_size, exact.image_size, generator=g)
    img, ref = enc.encode_images(px), exact.encode_images(px)
    assert img.dtype == np.float32 and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    assert (img * ref).sum(1).min() > 0.999
    texts = ["a red square", "a blue circle"]
    assert (enc.encode_texts(texts) * exact.encode_texts(texts)).sum(1).min() > 0.999
    # the caller's model is left as it was (the encoder quantizes a copy)
    assert type(tiny_model.visual.transformer.resblocks[0].attn).__name__ == "MultiheadAttention"

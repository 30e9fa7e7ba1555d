"""int8 matmuls for the image tower on CPUs with int8 dot-product instructions (AVX512-VNNI).

W8A8: each weight matrix is quantized once, symmetric int8 per output channel; each activation
row (one token) is quantized on every call, symmetric int8 from that row's own largest value. The
product runs in int32 (``torch._int_mm``, oneDNN's VNNI kernels) and the two scales and the bias
are applied in float32. Per-row activation scales are what keep the accuracy: a token with large
values cannot coarsen the others, and a row's embedding never depends on the other rows of its
batch (unlike per-tensor dynamic quantization, as in the ``onnx-int8`` graphs).

Only the linear layers change: LayerNorm, GELU, softmax and attention itself stay in float32.
Measured on ViT-B/32 weights (BENCHMARKS.md): mean cosine to fp32 0.99993 for images, 1.4x the
bf16 tower on an AVX512-BF16 CPU without AMX; the text tower in int8 missed the 0.9999 bound
(0.99965), so it stays bf16 (:class:`clip_core.encoders.TorchEncoder`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .model import CLIP, MultiheadAttention, attention

INT8_MAX = 127


class Int8Unsupported(RuntimeError):
    """This CPU's int8 matmul is not exact, so the int8 tower would give wrong numbers."""


@functools.lru_cache(maxsize=None)
def int8_matmul_is_exact() -> bool:
    """Whether ``torch._int_mm`` gives the exact int32 product here, on a probe built to overflow.

    Without int8 dot-product instructions (AVX512-VNNI, AMX-INT8) oneDNN multiplies int8 pairs
    into saturating int16 sums (``vpmaddubsw``): measured on AVX2 and on AVX-512 without VNNI, a
    product of full-range int8 matrices came out 19% off. Asking the kernel itself, once per
    process, also covers CPUs and oneDNN builds no flag list knows.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-INT8_MAX, INT8_MAX + 1, (32, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-INT8_MAX, INT8_MAX + 1, (256, 32), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = INT8_MAX, INT8_MAX  # every pair at the top of the range: saturates any int16 sum
    try:
        return torch.equal(torch._int_mm(a, b), a.int() @ b.int())
    except RuntimeError:
        return False


def require_exact_int8() -> None:
    if not int8_matmul_is_exact():
        raise Int8Unsupported("this CPU's int8 matmul is not exact (no AVX512-VNNI or AMX-INT8: oneDNN sums "
                              "int8 pairs in saturating int16), so precision='int8' would give wrong "
                              "embeddings; use 'bf16' (CPUs with native bf16), 'fp32', or backend 'onnx-int8'")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` float -> (int8 ``[M, K]``, float32 scale ``[M, 1]``) with ``x ~= q * scale`` per row."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX  # [M, 1]
    return (x / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class Int8Linear(nn.Module):
    """``F.linear`` with int8 weights (per output channel) and int8 activations (per row)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        require_exact_int8()
        q, scale = quantize_rows(weight.detach())  # [N, K] int8, [N, 1]: one scale per output channel
        self.register_buffer("weight_t", q.t().contiguous())  # [K, N] int8, the layout _int_mm takes
        self.register_buffer("weight_scale", scale.view(1, -1))  # [1, N]
        self.register_buffer("bias", None if bias is None else bias.detach().float())  # [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        q, scale = quantize_rows(rows)  # [M, K] int8, [M, 1]
        y = torch._int_mm(q, self.weight_t).float().mul_(scale).mul_(self.weight_scale)  # [M, N] float32
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], -1)  # [..., N]


class Int8MultiheadAttention(nn.Module):
    """:class:`clip_core.model.MultiheadAttention` with both projections in int8."""

    def __init__(self, attn: MultiheadAttention):
        super().__init__()
        self.heads = attn.heads
        self.in_proj = Int8Linear(attn.in_proj_weight, attn.in_proj_bias)
        self.out_proj = Int8Linear(attn.out_proj.weight, attn.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        return self.out_proj(attention(self.in_proj(x), self.heads, causal))  # [B, L, W]


def quantize_image_tower(model: CLIP) -> CLIP:
    """Replace the image tower's linear layers by :class:`Int8Linear` (in place); the tower must be
    float32, since the layers between them run in its dtype."""
    dtype = model.visual.conv1.weight.dtype
    if dtype != torch.float32:
        raise ValueError(f"the int8 image tower runs in float32 around its matmuls, got {dtype}")
    for block in model.visual.transformer.resblocks:
        block.attn = Int8MultiheadAttention(block.attn)
        block.mlp.c_fc = Int8Linear(block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        block.mlp.c_proj = Int8Linear(block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    return model


__all__ = ["Int8Linear", "Int8MultiheadAttention", "Int8Unsupported", "int8_matmul_is_exact", "quantize_image_tower",
           "quantize_rows", "require_exact_int8"]

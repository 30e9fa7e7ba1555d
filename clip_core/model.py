"""CLIP, readable top to bottom: a ViT image tower, a causal text tower, two projections.

Parameter names are OpenAI's (``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``,
``text_projection``, ...), so OpenAI and open_clip state dicts load without renaming, and Hugging
Face checkpoints map through the one key table in ``checkpoints.py``.

Shapes: B batch, L tokens, W width, D embed_dim, R resolution, P patch size, G = R // P.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (fp16/bf16 safe), as OpenAI does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


def attention(qkv: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head attention over already projected queries, keys and values (SDPA's kernel)."""
    B, L, W = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    qkv = qkv.view(B, L, 3, heads, W // heads).permute(2, 0, 3, 1, 4)  # [3, B, H, L, W/H]
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # [B, H, L, W/H]
    return y.transpose(1, 2).reshape(B, L, W)  # [B, L, W]


class MultiheadAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter layout, computed by SDPA.

    Keeping ``in_proj_weight`` [3W, W] and ``out_proj`` means OpenAI weights load as they are,
    while ``scaled_dot_product_attention`` picks the fused kernel for the device.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3W]
        return self.out_proj(attention(qkv, self.heads, causal))  # [B, L, W]


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, activation, eps) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


def _building_on_meta() -> bool:
    """True inside ``with torch.device("meta")``: a checkpoint load, whose weights replace any init."""
    return torch.get_default_device().type == "meta"


def _scaled_randn(scale: float, *shape: int) -> torch.Tensor:
    """``scale * randn(shape)``, or an empty tensor on meta, where random init is wasted work."""
    if _building_on_meta():
        return torch.empty(*shape)
    return scale * torch.randn(*shape)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        v = cfg.vision
        self.image_size = v.image_size
        scale = v.width**-0.5
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(_scaled_randn(scale, v.width))
        self.positional_embedding = nn.Parameter(_scaled_randn(scale, v.grid_size**2 + 1, v.width))
        self.ln_pre = LayerNorm(v.width, eps=cfg.layer_norm_eps)
        self.transformer = Transformer(v.width, v.layers, v.heads, v.mlp_ratio, cfg.activation, cfg.layer_norm_eps)
        self.ln_post = LayerNorm(v.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(_scaled_randn(scale, v.width, cfg.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [B, W, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1)  # [B, G*G+1, W]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x)  # [B, G*G+1, W]
        x = self.ln_post(x[:, 0, :])  # [B, W] the class token
        return x @ self.proj  # [B, D]


def eot_positions(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """Index of the first EOT per row, by comparison with the EOT id; rows without one use OpenAI's argmax.

    Written without device or dtype constants (int32 argmax, a gather instead of ``any``) so the
    same traced graph runs on any device and exports to ONNX ops every runtime implements.
    """
    is_eot = (tokens == eot_token_id).to(torch.int32)  # [B, L]
    first = is_eot.argmax(dim=-1, keepdim=True)  # [B, 1]
    found = is_eot.gather(1, first)  # [B, 1] 1 where row has an EOT
    fallback = tokens.to(torch.int32).argmax(dim=-1, keepdim=True)  # [B, 1] ids < 2**31: exact in int32
    return torch.where(found > 0, first, fallback).squeeze(1)  # [B]


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.context_length = t.context_length
        self.eot_token_id = t.eot_token_id
        self.visual = VisionTransformer(cfg)
        on_meta = _building_on_meta()
        # On meta (a checkpoint load) every init is skipped: it costs time and imports torch._dynamo.
        self.token_embedding = nn.Embedding(
            t.vocab_size, t.width, _weight=torch.empty(t.vocab_size, t.width) if on_meta else None
        )
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.activation, cfg.layer_norm_eps)
        self.ln_final = LayerNorm(t.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))
        if not on_meta:
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation, so a fresh model trains as theirs did."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            width, layers = tower.width, tower.layers
            proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
            attn_std = width**-0.5
            fc_std = (2 * width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The image tower's dtype; the text tower follows its own (:meth:`text_to`)."""
        return self.visual.conv1.weight.dtype

    def text_to(self, dtype: torch.dtype) -> CLIP:
        """Convert only the text tower's weights (the int8 image tower keeps float32 around its matmuls)."""
        for module in (self.token_embedding, self.transformer, self.ln_final):
            module.to(dtype)
        for param in (self.positional_embedding, self.text_projection):
            param.data = param.data.to(dtype)
        return self

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] normalized pixels -> [B, D] image features (not L2-normalized)."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (L <= context_length) -> [B, D] text features (not L2-normalized).

        The mask is causal, so tokens after EOT never influence the EOT feature: a batch may be
        trimmed to its longest sequence and give exactly the same result.

        This is also the exported text graph (``export.TextTower``), so it is written to trace:
        pooling is a gather at :func:`eot_positions`, and ``ln_final`` runs on the pooled row
        only (LayerNorm is per token, so that equals OpenAI's normalising every token first).
        The projection follows the activations' dtype, which the weights' dtype (or autocast) decides.
        """
        L = text.shape[1]
        dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(text)  # [B, L, W]
        x = x + self.positional_embedding[:L].to(dtype)
        x = self.transformer(x, causal=True)  # [B, L, W]
        index = eot_positions(text, self.eot_token_id).to(torch.int64)  # [B]
        x = x.gather(1, index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)  # [B, W]
        x = self.ln_final(x)  # [B, W]
        return x @ self.text_projection.to(x.dtype)  # [B, D]

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities, as OpenAI's: (logits_per_image [Bi, Bt], logits_per_text [Bt, Bi])."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def create_model(name_or_config: str | CLIPConfig) -> CLIP:
    """A CLIP with fresh (OpenAI-initialised) weights from a preset name or a config."""
    from .config import get_model_config

    cfg = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return CLIP(cfg)

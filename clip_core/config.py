"""Model hyperparameters as dataclasses; presets live in ``model_configs/*.json``.

The JSON keys equal the dataclass fields, so a preset file, the config stored inside a native
checkpoint and ``CLIPConfig.to_dict()`` are the same document.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class VisionConfig:
    image_size: int = 224  # input resolution R; images are R x R after preprocessing
    patch_size: int = 32  # side of a square patch (the conv1 kernel and stride)
    width: int = 768  # transformer hidden size
    layers: int = 12  # number of residual attention blocks
    heads: int = 12  # attention heads (OpenAI checkpoints use width // 64)
    mlp_ratio: float = 4.0  # MLP hidden size = width * mlp_ratio

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    context_length: int = 77  # maximum tokens, SOT and EOT included
    vocab_size: int = 49408  # BPE vocabulary size (OpenAI's 49408)
    width: int = 512  # transformer hidden size
    layers: int = 12  # number of residual attention blocks
    heads: int = 8  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden size = width * mlp_ratio
    eot_token_id: int = 49407  # the token whose position gives the pooled text feature


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # size of the joint image-text embedding space
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI) or "gelu" (most open_clip / LAION models)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _from_dict(TextConfig, self.text, "text")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for part, cfg in (("vision", self.vision), ("text", self.text)):
            if cfg.width % cfg.heads:
                raise ValueError(f"{part}.width={cfg.width} is not divisible by {part}.heads={cfg.heads}")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"vision.image_size={self.vision.image_size} is not a multiple of "
                f"vision.patch_size={self.vision.patch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CLIPConfig":
        return _from_dict(cls, data, "config")

    @classmethod
    def from_json(cls, text: str) -> "CLIPConfig":
        return cls.from_dict(json.loads(text))


def _from_dict(cls, data: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    return cls(**data)


def list_models() -> list[str]:
    """Names of the bundled presets (``model_configs/*.json``)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> CLIPConfig:
    """The preset called ``name``; OpenAI's spelling ``ViT-B/32`` is accepted too."""
    path = MODEL_CONFIG_DIR / f"{name.replace('/', '-')}.json"
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return CLIPConfig.from_dict(json.loads(path.read_text()))

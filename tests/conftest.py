"""Shared fixtures: small random CLIP checkpoints written by the reference library (transformers)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Exports made by the tests (backend auto -> onnx on CPU) go to a throwaway cache, never the
# user's ~/.cache; set before any Ray worker starts, so the workers inherit it.
os.environ.setdefault("CLIP_ETL_CACHE_DIR", tempfile.mkdtemp(prefix="clip-etl-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def hf_features(out) -> torch.Tensor:
    """transformers returns a tensor (v4) or an output object whose pooler_output is projected (v5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def make_hf_clip(seed: int = 0, *, vision=None, text=None, projection_dim=512, hidden_act="quick_gelu"):
    """A randomly initialised transformers.CLIPModel (ViT-B/32 shape unless told otherwise)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = dict(vision or {})
    text = dict(text or {})
    vision.setdefault("hidden_act", hidden_act)
    text.setdefault("hidden_act", hidden_act)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = CLIPModel(cfg).eval()
    # HF's init leaves LayerNorms at 1/0 and biases at 0: perturb everything so a wrong mapping shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "embedding" not in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="session")
def hf_b32_dir(tmp_path_factory):
    """A ViT-B/32-shaped random CLIPModel saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("hf-b32")
    model = make_hf_clip(0)
    model.save_pretrained(folder)
    return folder

"""The Encoder interface over a plain torch CLIP, for tests that must not depend on the backends.

``text_batches`` records the size of every ``encode_texts`` call, so tests can check batching.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clip_core import image_transform, tokenize


class TorchTestEncoder:
    """Normalised float32 numpy outputs, ``logit_scale`` as the multiplier, OpenAI preprocessing."""

    def __init__(self, model):
        self.model = model.eval()
        self.embed_dim = model.config.embed_dim
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.preprocess = image_transform(model.image_size)
        self.text_batches: list[int] = []

    @torch.no_grad()
    def encode_images(self, pixels) -> np.ndarray:
        x = torch.as_tensor(pixels, dtype=torch.float32)
        return F.normalize(self.model.encode_image(x), dim=-1).numpy()

    @torch.no_grad()
    def encode_texts(self, texts) -> np.ndarray:
        tokens = tokenize(list(texts)) if isinstance(texts[0], str) else torch.as_tensor(texts)
        self.text_batches.append(len(tokens))
        return F.normalize(self.model.encode_text(tokens), dim=-1).numpy()

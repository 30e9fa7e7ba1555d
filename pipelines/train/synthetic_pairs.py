"""Freshly generated (image, caption) pairs for training, instead of a fixed set of files.

A small ViT trained from scratch memorises a few tens of thousands of fixed images long before it
has learned what a shape is: in a supervised probe on the demo's shapes, 4,000 fixed images gave
27% held-out shape accuracy after 800 steps, and a new image per example gave 67%. The generator
is cheap (about 2 ms per 96 px image) and seeded per item, so a dataset of ``length`` virtual
items is reproducible and never repeats an image within a run.

``group_size`` > 1 makes consecutive items come in groups that share a color and a background
lightness (each item still has its own shape, size, place and caption). Read in order (the
trainer does not shuffle this dataset: its items are random already), a batch then holds several
same-colored shapes on the same kind of background, which can be told apart only by shape, size
or place: hard negatives that make a contrastive model learn shape instead of stopping at color.

Items follow the sample set's rules: only the *seen* shape-color pairs of ``split_rules`` (the
held-out pairs of ``test_unseen`` never appear), the same drawing, JPEG round trip and captions,
so a model trained here is evaluated fairly on a manifest written by
``pipelines.demo.sample_data`` with the same rules.

``variety`` is the share of items drawn as another renderer might (``_other_rendering``): other
sizes, edges, outlines, blur, tone and JPEG quality, so the model does not learn one renderer.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import Dataset

from pipelines.demo.sample_data import BACKGROUNDS, COLORS, DEFAULT_PARTIAL_CAPTIONS, SplitRules, caption, draw, sample_spec

STREAM_KEY = 0x57E4  # keeps item seeds apart from ``generate_sample_set``'s (seed, index) seeds


def _other_rendering(spec, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """``spec`` drawn the way other software might: (image, JPEG quality).

    A model trained on one renderer learns its edges and sizes along with the shapes: the demo
    model scored 97-99% on the generator's images but 81% on an independent renderer's (aliased or
    box-filtered edges, blur, outlines, 96-224 px). These draws vary what a renderer chooses and a
    caption does not name; color hue, shape, size class and background lightness stay as specified.
    """
    size = int(rng.integers(48, 225))
    outline = float(rng.uniform(0.1, 0.3)) if rng.random() < 0.3 else 0.0
    img = draw(spec, size, rng, supersample=int(rng.choice([1, 2, 4])), outline=outline)
    if rng.random() < 0.5:  # blur in proportion to the image, as a resize or a soft lens would
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 2.5)) * size / 128))
    if rng.random() < 0.5:
        img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.8, 1.2)))
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))
    return img, int(rng.integers(60, 96))


class SyntheticPairs(Dataset):
    """``length`` virtual (pixels, tokens) items; item ``i`` is drawn from seed (seed, STREAM_KEY, i)."""

    def __init__(
        self,
        length: int,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        seed: int = 0,
        context_length: int = 77,
        image_size: int = 96,
        split_rules: SplitRules = SplitRules(),
        colors: Sequence[str] = COLORS,
        max_rotation: float = 25.0,
        partial_captions: float = DEFAULT_PARTIAL_CAPTIONS,
        jpeg: bool = True,
        group_size: int = 1,
        variety: float = 0.0,
    ):
        if length < 2:
            raise ValueError(f"need at least 2 items, got {length}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0.0 <= variety <= 1.0:
            raise ValueError(f"variety must be in [0, 1], got {variety}")
        split_rules.validate(colors)
        self.length = length
        self.transform = transform
        self.seed = seed
        self.context_length = context_length
        self.image_size = image_size
        self.pairs = split_rules.seen_pairs(colors)
        self.max_rotation = max_rotation
        self.partial_captions = partial_captions
        self.jpeg = jpeg
        self.group_size = group_size
        self.variety = variety
        self.colors = sorted({c for _, c in self.pairs}, key=list(COLORS).index)

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> tuple[Image.Image, str, tuple[str, str]]:
        """The PIL image, caption and (shape, color) of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, STREAM_KEY, index])
        background = None
        if self.group_size > 1:  # the group's color and background, then this item's shape
            group = np.random.default_rng([self.seed, STREAM_KEY, 1, index // self.group_size])
            color = self.colors[int(group.integers(len(self.colors)))]
            background = BACKGROUNDS[int(group.integers(len(BACKGROUNDS)))]
            shapes = [s for s, c in self.pairs if c == color]
            shape = shapes[int(rng.integers(len(shapes)))]
        else:
            shape, color = self.pairs[int(rng.integers(len(self.pairs)))]
        spec = sample_spec(rng, shape, color, self.max_rotation)
        if background is not None:
            spec = dataclasses.replace(spec, background=background)
        if self.variety and rng.random() < self.variety:  # variety 0 draws exactly what it always drew
            img, quality = _other_rendering(spec, rng)
        else:
            img, quality = draw(spec, self.image_size, rng), int(rng.integers(80, 96))
        if self.jpeg:  # the sample set's files are JPEGs: train on the same artefacts
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return img, caption(rng, spec, self.partial_captions), (shape, color)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from clip_core.tokenizer import tokenize

        img, text, _ = self.example(index)
        return self.transform(img), tokenize([text], context_length=self.context_length, truncate=True)[0]

"""A shape renderer written apart from ``pipelines.demo.sample_data``, to test the demo model on it.

A model that scores well only on its own generator's images has learned that generator. This one
shares no drawing code or constants with it: shapes are filled (or, one in four, outlined) by point-in-shape tests on a pixel
grid (no PIL polygons, no 2x LANCZOS downsampling), supersampled 1x (hard, aliased edges), 3x or
5x with a box filter, then optionally blurred; colors are fixed RGB values with a little jitter
(no HSV ranges); backgrounds are flat; sizes are 96-224 px; JPEG quality 70-95.

The 12 classes are the primary colors red, green, blue, yellow times circle, square, triangle.
"green triangle" is one of the demo model's never-trained pairs, so one class in twelve also
tests composition.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

SHAPES = ("circle", "square", "triangle")
RGB = {"red": (215, 35, 30), "green": (35, 160, 55), "blue": (30, 70, 210), "yellow": (235, 205, 25)}
CLASSES = [f"{color} {shape}" for shape in SHAPES for color in RGB]
FLAT_BACKGROUNDS = ((255, 255, 255), (236, 232, 224), (200, 200, 200), (128, 128, 128), (40, 40, 40),
                    (10, 10, 30), (250, 245, 230), (210, 225, 240), (60, 45, 40))


def _inside(shape: str, x: np.ndarray, y: np.ndarray, radius: float, angle: float, line: float = 0.0) -> np.ndarray:
    """Boolean mask of grid points (x, y relative to the centre) inside the shape.

    ``line`` > 0 keeps only a band of that width inside the edge: an outlined shape.
    """
    if line > 0:
        inner = _inside(shape, x, y, radius - line * (2.0 if shape == "triangle" else 1.0), angle)
        return _inside(shape, x, y, radius, angle) & ~inner
    c, s = np.cos(angle), np.sin(angle)
    u, v = x * c + y * s, -x * s + y * c  # rotate the grid, not the shape
    if shape == "circle":
        return u * u + v * v <= radius * radius
    if shape == "square":
        half = radius * 0.75
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # An equilateral triangle, apex up: inside all three edge half-planes.
    mask = np.ones_like(u, dtype=bool)
    for k in range(3):
        t = np.pi / 2 + 2 * np.pi * k / 3  # outward normal of edge k (y points down: pi/2 = bottom)
        mask &= u * np.cos(t) + v * np.sin(t) <= radius * 0.5
    return mask


def render(shape: str, color: str, rng: np.random.Generator) -> Image.Image:
    """One JPEG-decoded RGB image of a ``color`` ``shape``."""
    size = int(rng.integers(96, 225))
    factor = int(rng.choice([1, 3, 5]))
    radius = rng.uniform(0.15, 0.42) * size
    cx, cy = rng.uniform(radius * 1.05, size - radius * 1.05, size=2)
    angle = rng.uniform(-0.5, 0.5)
    line = rng.uniform(0.12, 0.25) * radius if rng.random() < 0.25 else 0.0
    grid = (np.arange(size * factor) + 0.5) / factor  # sample points in pixel units
    x, y = np.meshgrid(grid - cx, grid - cy)
    coverage = _inside(shape, x, y, radius, angle, line).astype(np.float32)
    coverage = coverage.reshape(size, factor, size, factor).mean(axis=(1, 3))[..., None]  # [size, size, 1]
    background = np.array(FLAT_BACKGROUNDS[int(rng.integers(len(FLAT_BACKGROUNDS)))], dtype=np.float32)
    fill = np.clip(np.array(RGB[color], dtype=np.float32) + rng.normal(0, 8, 3), 0, 255)
    pixels = background * (1 - coverage) + fill * coverage  # [size, size, 3]
    img = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3.0))))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def labelled_images(n_per_class: int, seed: int) -> list[tuple[Image.Image, str]]:
    """``n_per_class`` images of each of the 12 classes, in class order."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in SHAPES:
        for color in RGB:
            out += [(render(shape, color, rng), f"{color} {shape}") for _ in range(n_per_class)]
    return out

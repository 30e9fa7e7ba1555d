"""Captioned synthetic images: the bundled sample data of the demo and of the demo model's training.

Each image holds one colored shape on a light or dark background, with a caption in one of many
natural phrasings. The generator is seeded per image (``seed``, index), so the same arguments give
the same bytes on every run and machine, and any image can be regenerated alone.

Splits test what a CLIP model actually learned: ``test_unseen`` holds shape-color combinations that
never occur in ``train`` (every shape and every color still does), so zero-shot accuracy there
measures composition of words, not memorised classes.

Run ``python -m pipelines.demo.sample_data --out DIR --n 400`` to write ``DIR/manifest.parquet`` and
``DIR/images/``.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
# Hue centre (degrees) and half-width of the hue jitter per color word: the jitter teaches a
# category, not one RGB value, while the gaps keep neighbours (red/orange/yellow) apart.
COLOR_HUES: dict[str, tuple[float, float]] = {
    "red": (0.0, 6.0),
    "orange": (28.0, 4.0),
    "yellow": (54.0, 4.0),
    "green": (125.0, 15.0),
    "blue": (222.0, 12.0),
    "purple": (280.0, 10.0),
    # Three more colors, each seen with every shape. Besides being classes of their own, they
    # make a model's shape features color-invariant: with only six colors, one of them held out
    # per shape, a small ViT learns "triangle" from the edge colors it saw and misses a green one.
    "gray": (0.0, 180.0),
    "pink": (330.0, 8.0),
    "cyan": (185.0, 6.0),
}
# (saturation range, value range) where a color differs from the saturated default.
_COLOR_SV: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "gray": ((0.0, 0.06), (0.42, 0.62)),
    "pink": ((0.38, 0.58), (0.92, 1.0)),
}
COLORS: tuple[str, ...] = tuple(COLOR_HUES)
BACKGROUNDS: tuple[str, ...] = ("light", "dark")
TEXTURES: tuple[str, ...] = ("plain", "gradient", "noisy")
SIZES: tuple[str, ...] = ("small", "large")

# One held-out color per shape and one shape per color (a Latin-square diagonal) among the six
# primary colors, so each word is still seen in training with other partners (every shape in
# eight colors, every held-out color with five shapes) and each held-out pair is a new composition.
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("circle", "orange"),
    ("square", "purple"),
    ("triangle", "green"),
    ("star", "blue"),
    ("hexagon", "red"),
    ("cross", "yellow"),
)

MANIFEST_COLUMNS = (
    "id", "image", "text", "shape", "color", "background", "true_label", "split", "size", "position", "texture",
)


@dataclass(frozen=True)
class SplitRules:
    """How images are assigned to train / val / test_unseen."""

    held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT  # (shape, color) pairs that appear only in test_unseen
    val_fraction: float = 0.1  # share of seen-combination images kept out of train for validation
    unseen_fraction: float | None = None  # share of all images from held-out pairs; None = their natural share

    def validate(self, colors: Sequence[str] = COLORS) -> None:
        unknown = [c for c in colors if c not in COLORS]
        if unknown or not colors:
            raise ValueError(f"unknown color(s) {unknown or '(none given)'}; known: {', '.join(COLORS)}")
        for shape, color in self.held_out:
            if shape not in SHAPES or color not in colors:
                raise ValueError(f"held-out pair ({shape!r}, {color!r}) is not a known shape and color")
        seen = self.seen_pairs(colors)
        missing = [w for w in SHAPES + tuple(colors) if not any(w in pair for pair in seen)]
        if missing:
            raise ValueError(f"held-out pairs leave no training image for: {', '.join(missing)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.unseen_fraction is not None and not 0.0 <= self.unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1), got {self.unseen_fraction}")

    def seen_pairs(self, colors: Sequence[str] = COLORS) -> list[tuple[str, str]]:
        held = set(self.held_out)
        return [(s, c) for s in SHAPES for c in colors if (s, c) not in held]


@dataclass
class ShapeSpec:
    """Everything drawn in one image; also the source of its caption and manifest row."""

    shape: str  # one of SHAPES
    color: str  # one of COLORS
    background: str  # "light" or "dark"
    texture: str  # "plain", "gradient" or "noisy"
    size: str  # "small" or "large"
    position: str  # "top left" ... "center" ... "bottom right"
    center: tuple[float, float] = field(default=(0.5, 0.5))  # shape centre as a fraction of the image side
    radius: float = 0.25  # circumradius as a fraction of the image side
    rotation: float = 0.0  # degrees


def class_name(shape: str, color: str) -> str:
    """The zero-shot class name of a pair, e.g. ``"red star"``."""
    return f"{color} {shape}"


def class_names() -> list[str]:
    """All shape x color class names, in a fixed order."""
    return [class_name(s, c) for s in SHAPES for c in COLORS]


# ----------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, rot_deg: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` (pixels) centred at (cx, cy), rotated."""
    if shape == "square":
        angles, radii = [45 + 90 * k for k in range(4)], [r * 0.92] * 4
    elif shape == "triangle":
        angles, radii = [-90 + 120 * k for k in range(3)], [r] * 3
    elif shape == "hexagon":
        angles, radii = [60 * k for k in range(6)], [r * 0.95] * 6
    elif shape == "star":
        angles = [-90 + 36 * k for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.42 for k in range(10)]
    elif shape == "cross":
        a = 0.34 * r  # arm half-width; arm reach r * 0.95
        reach = 0.95 * r
        pts = [(a, reach), (a, a), (reach, a), (reach, -a), (a, -a), (a, -reach),
               (-a, -reach), (-a, -a), (-reach, -a), (-reach, a), (-a, a), (-a, reach)]
        t = math.radians(rot_deg)
        c, s = math.cos(t), math.sin(t)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [
        (cx + rr * math.cos(math.radians(ang + rot_deg)), cy + rr * math.sin(math.radians(ang + rot_deg)))
        for ang, rr in zip(angles, radii)
    ]


def _hsv_rgb(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)) * 255.0


def _shape_rgb(rng: np.random.Generator, color: str, background: str) -> tuple[int, int, int]:
    hue, jitter = COLOR_HUES[color]
    h = hue + rng.uniform(-jitter, jitter)
    if color in _COLOR_SV:
        (s_lo, s_hi), (v_lo, v_hi) = _COLOR_SV[color]
        s, v = rng.uniform(s_lo, s_hi), rng.uniform(v_lo, v_hi)
        return tuple(int(round(x)) for x in _hsv_rgb(h, s, v))  # type: ignore[return-value]
    s = rng.uniform(0.75, 1.0)
    # Yellow, orange and cyan stay bright (a dark yellow reads as olive/brown); on dark
    # backgrounds every color stays bright enough to stand out.
    v_low = 0.85 if color in ("yellow", "orange", "cyan") else (0.7 if background == "dark" else 0.55)
    v = rng.uniform(v_low, 1.0)
    return tuple(int(round(x)) for x in _hsv_rgb(h, s, v))  # type: ignore[return-value]


def _background(rng: np.random.Generator, size: int, lightness: str, texture: str) -> np.ndarray:
    """[size, size, 3] float background: low-saturation light or dark, plain / gradient / noisy."""

    def tone() -> np.ndarray:
        h = rng.uniform(0, 360)
        if lightness == "light":
            return _hsv_rgb(h, rng.uniform(0.0, 0.15), rng.uniform(0.8, 0.98))
        return _hsv_rgb(h, rng.uniform(0.0, 0.3), rng.uniform(0.04, 0.3))

    a = tone()
    img = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    if texture == "gradient":
        b = tone()
        t = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        w = (xx - 0.5) * math.cos(t) + (yy - 0.5) * math.sin(t) + 0.5
        w = np.clip(w, 0, 1)[..., None]
        img = a * (1 - w) + b * w
    elif texture == "noisy":
        img = img + rng.normal(0, rng.uniform(8, 20), (size, size, 1)).astype(np.float32)
    return img


def draw(spec: ShapeSpec, image_size: int, rng: np.random.Generator, *, supersample: int = 2,
         outline: float = 0.0) -> Image.Image:
    """Render ``spec``: background, shape, light pixel noise.

    The shape is drawn at ``supersample`` x the size and downsampled (1 = hard, aliased edges);
    ``outline`` > 0 draws only its edge, that fraction of the radius wide. The sample set uses the
    defaults; the demo model's training also varies both, so it learns shapes, not one renderer.
    """
    bg = _background(rng, image_size, spec.background, spec.texture)
    rgb = _shape_rgb(rng, spec.color, spec.background)
    big = image_size * supersample
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = spec.center[0] * big, spec.center[1] * big, spec.radius * big
    line = {"fill": None, "outline": 255, "width": max(1, round(outline * r))} if outline > 0 else {"fill": 255}
    if spec.shape == "circle":
        rr = r * 0.9
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], **line)
    else:
        d.polygon(_polygon(spec.shape, cx, cy, r, spec.rotation), **line)
    if supersample > 1:
        mask = mask.resize((image_size, image_size), Image.LANCZOS)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    img = bg * (1 - alpha) + np.array(rgb, dtype=np.float32) * alpha
    img = img + rng.normal(0, rng.uniform(0.0, 6.0), img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- sampling


def _position_word(x: float, y: float) -> str:
    col = "left" if x < 0.4 else ("right" if x > 0.6 else "")
    row = "top" if y < 0.4 else ("bottom" if y > 0.6 else "")
    return " ".join(w for w in (row, col) if w) or "center"


def sample_spec(rng: np.random.Generator, shape: str, color: str, max_rotation: float = 25.0) -> ShapeSpec:
    """Random background, texture, size, placement and rotation (within +-max_rotation degrees)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    size = SIZES[rng.integers(len(SIZES))]
    radius = rng.uniform(0.14, 0.21) if size == "small" else rng.uniform(0.29, 0.39)
    margin = radius + 0.02
    x, y = rng.uniform(margin, 1 - margin, size=2)
    rotation = rng.uniform(-max_rotation, max_rotation)
    return ShapeSpec(shape, color, background, texture, size, _position_word(x, y), (float(x), float(y)),
                     float(radius), float(rotation))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if " " in position:
        return f"near the {position}"
    return f"at the {position}" if position in ("top", "bottom") else f"on the {position}"


DEFAULT_PARTIAL_CAPTIONS = 0.35  # share of captions naming one attribute only (see ``caption``)
# Share of the other captions that also name size, background or position. Kept low on purpose:
# those are easier to see than shape, and when most captions carry them a contrastive model can
# tell a batch's pairs apart without ever learning shapes.
DETAIL_SHARE = 0.3


def caption(rng: np.random.Generator, spec: ShapeSpec, partial: float = DEFAULT_PARTIAL_CAPTIONS) -> str:
    """One natural caption of ``spec``; most name color and shape, some only one attribute.

    The phrasings vary word order and context (article, size, background, position), so the
    text tower learns the attribute words rather than a fixed sentence per class. Single-attribute
    captions ("a blue shape", "a star"), a share ``partial`` of all, teach those words alone: the
    captioner relies on them, and they push a model to represent color and shape separately, which
    is what lets it name shape-color pairs it never saw.
    """
    s, c, bg, sz, pos = spec.shape, spec.color, spec.background, spec.size, spec.position
    u = rng.random()
    if u < partial:  # one attribute only
        phrasings = [
            f"{_article(c)} {c} shape",
            f"something {c}",
            f"{_article(s)} {s}",
            f"{_article(s)} {s} shape",
            f"{_article(sz)} {sz} {s}",
            f"{_article(c)} {c} shape on a {bg} background",
            f"{_article(s)} {s} on a {bg} background",
            f"the {s}",
            f"{_article(sz)} {sz} shape",
            f"a shape on a {bg} background",
            f"something on a {bg} background",
        ]
        return phrasings[rng.integers(len(phrasings))]
    detailed = rng.random() < DETAIL_SHARE
    np_ = f"{sz} {c} {s}" if detailed and rng.random() < 0.4 else f"{c} {s}"
    a = _article(np_)
    plain = [
        f"{a} {np_}",
        f"{np_}",
        f"the {np_}",
        f"a photo of {a} {np_}",
        f"a photo of the {np_}.",
        f"a drawing of {a} {np_}",
        f"a picture of the {np_}",
        f"{_article(s)} {s} in {c}",
        f"{_article(s)} {s} colored {c}",
        f"the {s} is {c}",
        f"{_article(c)} {c}-colored {s}",
    ]
    if not detailed:
        return plain[rng.integers(len(plain))]
    full = [
        f"{a} {np_} on a {bg} background",
        f"the {np_} on a {bg} background",
        f"the {np_} on a {bg} background.",
        f"{a} {np_} against a {bg} background",
        f"{np_} on {bg}",
        f"{a} {np_} {_where(pos)}",
        f"the {np_} {_where(pos)}",
        f"{a} {np_} {_where(pos)} of a {bg} background",
        f"{_article(sz)} {sz} {s} in {c} on a {bg} background",
        f"there is {a} {np_} on a {bg} background",
    ]
    return full[rng.integers(len(full))]


def _assign(n: int, rules: SplitRules, seed: int, colors: Sequence[str] = COLORS) -> list[tuple[str, str, str]]:
    """(split, shape, color) per image: exact split counts, classes balanced round-robin, shuffled."""
    rules.validate(colors)
    held = list(rules.held_out)
    seen = rules.seen_pairs(colors)
    frac = rules.unseen_fraction if rules.unseen_fraction is not None else len(held) / (len(held) + len(seen))
    n_unseen = int(round(n * frac)) if held else 0
    n_val = int(round((n - n_unseen) * rules.val_fraction))
    n_train = n - n_unseen - n_val
    rng = np.random.default_rng([seed, 0x5EED])

    def cycle(pairs: list[tuple[str, str]], k: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while len(out) < k:
            out.extend(pairs[i] for i in rng.permutation(len(pairs)))
        return out[:k]

    rows = [("train", *p) for p in cycle(seen, n_train)]
    rows += [("val", *p) for p in cycle(seen, n_val)]
    rows += [("test_unseen", *p) for p in cycle(held, n_unseen)]
    return [rows[i] for i in rng.permutation(len(rows))]


def _encode(img: Image.Image, fmt: str, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False)
        return buf.getvalue(), "png"
    img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue(), "jpg"


def generate_sample_set(
    out_dir: str | os.PathLike,
    n_images: int,
    *,
    seed: int = 0,
    image_size: int = 96,
    split_rules: SplitRules = SplitRules(),
    fmt: str = "jpeg",
    max_rotation: float = 25.0,
    partial_captions: float = DEFAULT_PARTIAL_CAPTIONS,
    colors: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Write ``n_images`` captioned images under ``out_dir/images/`` and ``out_dir/manifest.parquet``.

    Returns the manifest path. ``fmt`` is "jpeg", "png" or "mixed" (a seeded per-image choice).
    Shapes turn by up to +-``max_rotation`` degrees; ``partial_captions`` is the share of captions
    naming a single attribute; ``colors`` restricts the palette (default: all of ``COLORS``).
    Image paths in the manifest are relative to it, so the folder can be moved as a whole.
    """
    if fmt not in ("jpeg", "png", "mixed"):
        raise ValueError(f"fmt must be 'jpeg', 'png' or 'mixed', got {fmt!r}")
    if n_images < 1:
        raise ValueError("n_images must be >= 1")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plan = _assign(n_images, split_rules, seed, tuple(colors) if colors is not None else COLORS)
    cols: dict[str, list] = {k: [] for k in MANIFEST_COLUMNS}
    t0 = time.time()
    for i, (split, shape, color) in enumerate(plan):
        rng = np.random.default_rng([seed, i])
        spec = sample_spec(rng, shape, color, max_rotation)
        img = draw(spec, image_size, rng)
        text = caption(rng, spec, partial_captions)
        img_fmt = fmt if fmt != "mixed" else ("png" if rng.random() < 0.5 else "jpeg")
        data, ext = _encode(img, img_fmt, rng)
        image_id = f"s{seed}-{i:06d}"
        rel = f"images/{image_id}.{ext}"
        (out / rel).write_bytes(data)
        for k, v in (("id", image_id), ("image", rel), ("text", text), ("shape", shape), ("color", color),
                     ("background", spec.background), ("true_label", class_name(shape, color)), ("split", split),
                     ("size", spec.size), ("position", spec.position), ("texture", spec.texture)):
            cols[k].append(v)
        if progress and ((i + 1) % 500 == 0 or i + 1 == n_images):
            print(f"  generated {i + 1}/{n_images} images ({time.time() - t0:.1f}s)", flush=True)
    manifest = out / "manifest.parquet"
    pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()}), manifest)
    return manifest


# ----------------------------------------------------------------------------- CLI


def _parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """``"blue star,red hexagon"`` -> (("star", "blue"), ("hexagon", "red"))."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        color, _, shape = item.partition(" ")
        pairs.append((shape.strip(), color.strip()))
    return tuple(pairs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo.sample_data", description="Generate captioned shape images.")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet + images/)")
    p.add_argument("--n", type=int, default=400, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    p.add_argument("--format", dest="fmt", choices=("jpeg", "png", "mixed"), default="jpeg")
    p.add_argument("--partial-captions", type=float, default=DEFAULT_PARTIAL_CAPTIONS,
                   help="share of captions that name a single attribute")
    p.add_argument("--colors", default=None, help=f"comma-separated palette (default: all of {', '.join(COLORS)})")
    p.add_argument("--max-rotation", type=float, default=25.0, help="shapes turn by up to +- this many degrees")
    p.add_argument("--val-fraction", type=float, default=SplitRules.val_fraction)
    p.add_argument("--unseen-fraction", type=float, default=None,
                   help="share of images from held-out pairs (default: their natural share, 1/6)")
    p.add_argument("--held-out", default=None,
                   help='comma-separated "color shape" pairs kept out of train (default: six, one per shape and color)')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rules = SplitRules(
        held_out=_parse_pairs(args.held_out) if args.held_out is not None else DEFAULT_HELD_OUT,
        val_fraction=args.val_fraction,
        unseen_fraction=args.unseen_fraction,
    )
    t0 = time.time()
    try:
        manifest = generate_sample_set(args.out, args.n, seed=args.seed, image_size=args.image_size,
                                       split_rules=rules, fmt=args.fmt,
                                       max_rotation=args.max_rotation, partial_captions=args.partial_captions,
                                       colors=[c.strip() for c in args.colors.split(",")] if args.colors else None,
                                       progress=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} images and {manifest} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Photo-like JPEGs for the end-to-end benchmark, generated (no downloads) and cached on disk.

Why not noise: white noise does not compress, so its files are several times the size of a real
photo of the same pixel count and JPEG decode time (which scales with the entropy-coded bytes)
would be wrong. Real photos are mostly smooth regions, some edges and a little sensor noise and
texture; each image here is a low-frequency gradient, several soft-edged shapes, texture (three
octaves of smooth noise) and mild per-pixel noise, which JPEG at quality 85-92 compresses to about
0.18-0.28 bytes per pixel (0.2-3.4 MB for 1-12 MP), like camera photos.

Speed: the structure is drawn at 1/8 of the final size and resized up with PIL (bicubic, which
also blurs the shapes' edges); only the texture and noise are full size, and both come from
tiles made once and sampled at random offsets, so a 12 MP image takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

# (long side, short side) ratios of common camera and phone formats; each is used as landscape or portrait.
ASPECTS = ((4, 3), (3, 2), (16, 9), (1, 1), (5, 4))
VERSION = 1  # bump when the generator changes what it writes: cached folders are keyed by it
TILE = 1024
DONE = "_complete.json"


def _size(rng: np.random.Generator, mp_range: tuple[float, float]) -> tuple[int, int]:
    """(width, height) of one image: megapixels uniform in the range, a random aspect and orientation."""
    mp = rng.uniform(*mp_range) * 1e6
    a, b = ASPECTS[int(rng.integers(len(ASPECTS)))]
    long_side = int(round((mp * a / b) ** 0.5))
    short_side = int(round(long_side * b / a))
    return (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)


def _structure(rng: np.random.Generator, w: int, h: int):
    """The low-frequency part at 1/8 size: a two-color gradient and several shapes, blurred."""
    from PIL import Image, ImageDraw, ImageFilter

    sw, sh = max(8, w // 8), max(8, h // 8)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx / sw + np.sin(angle) * yy / sh
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-0.1, 0.9) * sw, rng.uniform(-0.1, 0.9) * sh
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * sw, y0 + rng.uniform(0.05, 0.5) * sh
        fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            pts = [(float(x), float(y)) for x, y in zip(rng.uniform(x0, x1, 3), rng.uniform(y0, y1, 3))]
            draw.polygon(pts, fill=fill)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.0))))


class _Tiles:
    """Full-size detail, sampled from tiles made once: a smooth mid-frequency texture (noise
    at 1/4 resolution, resized up) and fine sensor-like noise, both signed int16."""

    def __init__(self, seed: int):
        from PIL import Image

        rng = np.random.default_rng(seed + 7919)
        tex = np.zeros((TILE, TILE, 3), np.float32)
        for div, amp in ((32, 10.0), (8, 6.0), (2, 6.0)):  # octaves: blotches, grain, fine texture
            coarse = rng.normal(128, 40, (TILE // div, TILE // div, 3)).clip(0, 255).astype(np.uint8)
            up = np.asarray(Image.fromarray(coarse).resize((TILE, TILE), Image.BICUBIC), np.float32) - 128
            tex += up * (amp / 40)
        noise = rng.normal(0, 4.5, (TILE, TILE, 3))
        # stored doubled, so any TILE x TILE window at an offset below TILE is one slice (no copy)
        self.texture = np.tile(tex.round().astype(np.int16), (2, 2, 1))
        self.noise = np.tile(noise.round().astype(np.int16), (2, 2, 1))

    def sample(self, rng: np.random.Generator, tile: np.ndarray, w: int, h: int) -> np.ndarray:
        """A [h, w, 3] int16 array: the tile's window at a random offset, repeated to cover w x h."""
        oy, ox = (int(v) for v in rng.integers(0, TILE, 2))
        window = tile[oy:oy + TILE, ox:ox + TILE]
        return np.tile(window, (-(-h // TILE), -(-w // TILE), 1))[:h, :w]


def photo(rng: np.random.Generator, tiles: _Tiles, w: int, h: int):
    """One photo-like RGB image of ``w`` x ``h`` pixels."""
    from PIL import Image

    out = np.asarray(_structure(rng, w, h).resize((w, h), Image.BICUBIC), dtype=np.int16)
    out += tiles.sample(rng, tiles.texture, w, h)  # int16 in place: no float copy of 12 MP
    out += tiles.sample(rng, tiles.noise, w, h)
    return Image.fromarray(np.clip(out, 0, 255, out=out).astype(np.uint8))


def cache_key(n: int, mp_range: tuple[float, float], quality: tuple[int, int], seed: int) -> str:
    """Folder name of one set: every parameter that changes the files, so reruns reuse them."""
    doc = {"n": n, "mp": list(mp_range), "quality": list(quality), "seed": seed, "v": VERSION}
    return f"photos-n{n}-mp{mp_range[0]:g}-{mp_range[1]:g}-" + hashlib.sha256(
        json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]


def make_photos(folder: Path, n: int, mp_range: tuple[float, float] = (1.0, 12.0),
                quality: tuple[int, int] = (85, 92), seed: int = 0, log=print) -> list[dict]:
    """``n`` JPEGs in ``folder`` (reused when a complete set is already there); returns one
    record per file: path, width, height, bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / DONE
    if done.exists():
        return json.loads(done.read_text())["files"]
    rng = np.random.default_rng(seed)
    tiles = _Tiles(seed)
    files = []
    for i in range(n):
        w, h = _size(rng, mp_range)
        path = folder / f"photo_{i:05d}.jpg"
        q = int(rng.integers(quality[0], quality[1] + 1))
        photo(rng, tiles, w, h).save(path, format="JPEG", quality=q)
        files.append({"path": str(path), "width": w, "height": h, "bytes": path.stat().st_size, "quality": q})
        if log and (i + 1) % 32 == 0:
            log(f"  generated {i + 1}/{n} photos")
    done.write_text(json.dumps({"files": files}))
    return files


__all__ = ["make_photos", "cache_key", "photo"]

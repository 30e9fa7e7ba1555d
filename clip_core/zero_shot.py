"""Zero-shot classification: class embeddings from prompt templates, labels from image embeddings.

Each class is represented by the mean of its L2-normalised prompt embeddings (one prompt per
template, and per synonym where a class has several names), re-normalised: OpenAI's prompt
ensembling. Classification is then a cosine similarity, scaled by the model's logit scale and
soft-maxed over *all* classes, so a probability means the same thing whatever ``top_k`` is.

The classifier only needs an encoder with ``encode_texts`` / ``encode_images`` returning
L2-normalised float32 arrays, a ``logit_scale`` multiplier and a ``preprocess`` transform, so it
works with every backend. The batch pipeline never hands it pixels: it calls :meth:`predict` on
embeddings it already has, which is why that is the core method and the others wrap it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, Union

import numpy as np

from .prompts import ClassSpec, PromptError, TemplateSpec, resolve_classes, resolve_templates

TEXT_BATCH_SIZE = 256
# Rows scored at once in predict(): bounds the [rows, classes] logits matrix (4096 x 1000 = 16 MB).
PREDICT_CHUNK = 4096

ImageSource = Union[str, os.PathLike, bytes, Any]  # a path, encoded bytes or a PIL image


# --------------------------------------------------------------------------------------------
# Small numeric helpers shared by the encoders, the captioner, VQA and the index
# --------------------------------------------------------------------------------------------
def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Row-normalise to unit length (float32): the project's one numpy L2 normalisation.

    Encoders, the classifier, the captioner and the index all normalise through this, so an
    embedding is the same vector whichever of them produced it. The norm is floored at 1e-12
    (as ``torch.nn.functional.normalize``), so a zero row stays zero instead of becoming NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)  # [..., 1]
    return x / np.maximum(norm, 1e-12)


def softmax(logits: np.ndarray, axis: int = -1, dtype: type = np.float32) -> np.ndarray:
    """Numerically stable softmax computed in float64, returned as ``dtype``."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(dtype, copy=False)


def as_embedding_matrix(x: Any, dim: int | None = None, what: str = "image_embeddings") -> np.ndarray:
    """Accept [D] or [N, D] (numpy or torch); return [N, D] float32, L2-normalised.

    Inputs are re-normalised because a caller may hand in raw ``encode_image`` output; for
    already-normalised embeddings this is a no-op up to rounding.
    """
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected shape [N, D] or [D], got {tuple(arr.shape)}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what}: embedding dimension {arr.shape[1]} does not match the model's {dim}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return l2_normalize(arr)


def encode_texts_batched(encoder: Any, texts: Sequence[str], batch_size: int = TEXT_BATCH_SIZE) -> np.ndarray:
    """Encode many prompts in fixed-size batches (one call per batch, not per class)."""
    if not texts:
        raise ValueError("no texts to encode")
    out = [np.asarray(encoder.encode_texts(list(texts[i : i + batch_size])), dtype=np.float32)
           for i in range(0, len(texts), batch_size)]
    return l2_normalize(np.concatenate(out, axis=0))


# --------------------------------------------------------------------------------------------
# Image loading for the convenience entry points
# --------------------------------------------------------------------------------------------
class ImageLoadError(ValueError):
    """An image that could not be read or decoded; the message names the source."""


def open_image(source: ImageSource):
    """A decoded PIL image from a PIL image, a path or encoded bytes.

    Decoding goes through :func:`clip_core.preprocess.load_image`, which keeps ordinary modes
    as they are (the transform converts to RGB after cropping, as OpenAI's does) and turns
    every failure into one exception type; here that becomes :class:`ImageLoadError` naming
    the source.
    """
    from PIL import Image

    from .preprocess import load_image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = f"<{len(source)} bytes>"
    else:
        raise TypeError(f"expected a PIL image, a path or bytes, got {type(source).__name__}")
    try:
        return load_image(source)
    except Exception as e:  # ImageDecodeError, plus anything unexpected from PIL
        raise ImageLoadError(f"cannot load image {name}: {e}") from e


def images_to_pixels(encoder: Any, images: Sequence[ImageSource]):
    """Load and preprocess images into one [N, 3, R, R] tensor (raises on the first bad one)."""
    import torch

    return torch.stack([encoder.preprocess(open_image(img)) for img in images])


# --------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------
@dataclass
class ZeroShotPrediction:
    """Top-k predictions for N images. ``probs`` are softmax probabilities over all classes, so
    each row sums to at most 1 (exactly 1 when k equals the number of classes)."""

    indices: np.ndarray  # [N, k] int64, best first
    probs: np.ndarray  # [N, k] float32
    labels: list[list[str]] = field(default_factory=list)  # [N][k]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def top1_labels(self) -> list[str]:
        return [row[0] for row in self.labels]

    @property
    def top1_probs(self) -> np.ndarray:
        return self.probs[:, 0].copy()

    def to_dicts(self) -> list[list[dict]]:
        """The original classifier's output form, one list per image."""
        return [[{"class": lab, "confidence": float(p)} for lab, p in zip(labs, probs)]
                for labs, probs in zip(self.labels, self.probs)]


def _class_groups(classes: Any) -> tuple[list[str], list[list[str]]]:
    """(labels, name groups). A class is a name or a list of synonyms whose first is the label."""
    if isinstance(classes, (str, os.PathLike)):
        names = resolve_classes(classes)
        return names, [[n] for n in names]
    if not isinstance(classes, Iterable):
        raise PromptError(f"classes: expected a list, got {type(classes).__name__}")
    labels, groups = [], []
    for i, c in enumerate(classes):
        group = [c] if isinstance(c, str) else list(c) if isinstance(c, (list, tuple)) else None
        if not group or not all(isinstance(n, str) and n.strip() for n in group):
            raise PromptError(f"classes: entry {i} ({c!r}) must be a non-empty name or list of names")
        labels.append(group[0])
        groups.append(group)
    if not labels:
        raise PromptError("classes: no classes")
    return labels, groups


class ZeroShotClassifier:
    """Classify images against a fixed set of classes.

    ``classes``: a list of names (or of synonym lists, label = first name), or any spec
    :func:`~clip_core.prompts.resolve_classes` accepts (``"imagenet"``, a dataset name, a file).
    ``templates``: any spec :func:`~clip_core.prompts.resolve_templates` accepts; default the
    seed's nine. ``logit_scale`` defaults to the encoder's.
    """

    def __init__(
        self,
        encoder: Any,
        classes: ClassSpec | Sequence[str | Sequence[str]],
        templates: TemplateSpec = None,
        *,
        logit_scale: float | None = None,
        batch_size: int = TEXT_BATCH_SIZE,
    ) -> None:
        self.encoder = encoder
        self.classes, groups = _class_groups(classes)
        self.templates = resolve_templates(templates)
        self.logit_scale = float(encoder.logit_scale if logit_scale is None else logit_scale)

        prompts: list[str] = []
        counts: list[int] = []
        for group in groups:
            for name in group:
                prompts.extend(t.format(name) for t in self.templates)
            counts.append(len(group) * len(self.templates))
        text = encode_texts_batched(encoder, prompts, batch_size)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.add.reduceat(text.astype(np.float64), starts, axis=0)
        means = sums / np.asarray(counts, dtype=np.float64)[:, None]
        self.class_embeddings: np.ndarray = l2_normalize(means)  # [C, D] float32

    @classmethod
    def from_class_embeddings(
        cls, class_embeddings: np.ndarray, classes: Sequence[str], logit_scale: float, encoder: Any = None
    ) -> "ZeroShotClassifier":
        """Rebuild from stored class embeddings (no text encoding), e.g. in a worker process."""
        emb = as_embedding_matrix(class_embeddings, what="class_embeddings")
        if len(classes) != emb.shape[0]:
            raise ValueError(f"{len(classes)} class names for {emb.shape[0]} class embeddings")
        self = cls.__new__(cls)
        self.encoder, self.classes, self.templates = encoder, list(classes), []
        self.logit_scale, self.class_embeddings = float(logit_scale), emb
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def embed_dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    def logits(self, image_embeddings: np.ndarray) -> np.ndarray:
        """[N, C] float32: logit_scale * cosine(image, class)."""
        img = as_embedding_matrix(image_embeddings, self.embed_dim)
        return (self.logit_scale * (img @ self.class_embeddings.T)).astype(np.float32)

    def predict(self, image_embeddings: np.ndarray, top_k: int = 5) -> ZeroShotPrediction:
        """Top-k classes for each embedding; ``top_k`` is clipped to the number of classes."""
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(int(top_k), self.num_classes)
        img = as_embedding_matrix(image_embeddings, self.embed_dim)
        idx_parts, prob_parts = [], []
        for i in range(0, img.shape[0], PREDICT_CHUNK):
            probs = softmax(self.logit_scale * (img[i : i + PREDICT_CHUNK] @ self.class_embeddings.T))
            if k < probs.shape[1]:
                part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
            else:
                part = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
            part_probs = np.take_along_axis(probs, part, axis=1)
            order = np.argsort(-part_probs, axis=1, kind="stable")
            idx_parts.append(np.take_along_axis(part, order, axis=1).astype(np.int64))
            prob_parts.append(np.take_along_axis(part_probs, order, axis=1))
        indices = np.concatenate(idx_parts) if idx_parts else np.zeros((0, k), np.int64)
        probs = np.concatenate(prob_parts) if prob_parts else np.zeros((0, k), np.float32)
        labels = [[self.classes[j] for j in row] for row in indices]
        return ZeroShotPrediction(indices=indices, probs=probs.astype(np.float32), labels=labels)

    def classify_images(self, pixels: Any, top_k: int = 5) -> list[list[dict]]:
        """Classify preprocessed pixels [N, 3, R, R]; one ``[{'class', 'confidence'}, ...]`` per image."""
        return self.predict(self.encoder.encode_images(pixels), top_k).to_dicts()

    def classify(self, images: ImageSource | Sequence[ImageSource], top_k: int = 5, *, batch_size: int = 32):
        """Classify PIL images or image paths.

        A single image gives one prediction list (the original API); a list gives one per image.
        An unreadable image raises :class:`ImageLoadError` naming it.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[list[dict]] = []
        for i in range(0, len(items), batch_size):
            out.extend(self.classify_images(images_to_pixels(self.encoder, items[i : i + batch_size]), top_k))
        return out[0] if single else out

"""Stage 3b: zero-shot labels and captions, computed from image embeddings the actor already has.

Why here and not as separate Ray stages: both are a matrix product of the image embeddings with
text embeddings that are fixed for the whole job (class prompts, caption sentences). Running them
inside the model actor means the class and caption embeddings are computed once per actor, and
the image embeddings never travel through the object store a second time.

The functions take the embeddings of a batch plus a mask of the rows that have one and return
Arrow columns with nulls elsewhere, so the caller can append them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa


@dataclass
class LabelSpec:
    """The resolved label stage settings shipped to the actors (names, not files)."""

    classes: list[str]  # class names, resolved on the driver
    templates: list[str]  # prompt templates with one {}, resolved on the driver
    top_k: int  # classes kept in labels_topk / scores_topk


def build_classifier(encoder: Any, spec: LabelSpec):
    """The zero-shot classifier: one text-encoder pass over every class prompt."""
    from clip_core.zero_shot import ZeroShotClassifier

    return ZeroShotClassifier(encoder, spec.classes, spec.templates)


def build_captioner(encoder: Any, vocabulary: dict | None):
    """The captioner: one text-encoder pass over every candidate sentence."""
    from clip_core.captions import Captioner, CaptionSpec

    spec = CaptionSpec.default() if vocabulary is None else CaptionSpec.from_dict(vocabulary)
    return Captioner(encoder, spec)


def label_columns(classifier: Any, embeddings: np.ndarray, valid: np.ndarray, top_k: int) -> dict[str, pa.Array]:
    """Pure batch function: ``label``, ``label_score``, ``labels_topk``, ``scores_topk`` for the
    rows where ``valid`` is true (``embeddings`` rows elsewhere are ignored)."""
    n = len(valid)
    labels: list[str | None] = [None] * n
    scores: list[float | None] = [None] * n
    topk_labels: list[list[str] | None] = [None] * n
    topk_scores: list[list[float] | None] = [None] * n
    idx = np.flatnonzero(valid)
    if len(idx):
        pred = classifier.predict(embeddings[idx], top_k)
        for j, i in enumerate(idx):
            labels[i] = pred.labels[j][0]
            scores[i] = float(pred.probs[j, 0])
            topk_labels[i] = list(pred.labels[j])
            topk_scores[i] = [float(p) for p in pred.probs[j]]
    return {
        "label": pa.array(labels, pa.string()),
        "label_score": pa.array(scores, pa.float32()),
        "labels_topk": pa.array(topk_labels, pa.list_(pa.string())),
        "scores_topk": pa.array(topk_scores, pa.list_(pa.float32())),
    }


def caption_column(captioner: Any, embeddings: np.ndarray, valid: np.ndarray) -> pa.Array:
    """Pure batch function: one caption per row with a valid image embedding, null elsewhere."""
    out: list[str | None] = [None] * len(valid)
    idx = np.flatnonzero(valid)
    if len(idx):
        for i, text in zip(idx, captioner.caption_embeddings(embeddings[idx])):
            out[i] = text
    return pa.array(out, pa.string())


LABEL_FIELDS = [
    pa.field("label", pa.string()),
    pa.field("label_score", pa.float32()),
    pa.field("labels_topk", pa.list_(pa.string())),
    pa.field("scores_topk", pa.list_(pa.float32())),
]
CAPTION_FIELDS = [pa.field("caption", pa.string())]

__all__ = [
    "CAPTION_FIELDS",
    "LABEL_FIELDS",
    "LabelSpec",
    "build_captioner",
    "build_classifier",
    "caption_column",
    "label_columns",
]

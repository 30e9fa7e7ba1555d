"""The template/vocabulary captioner and multiple-choice visual question answering.

CLIP cannot generate text, but it can rank sentences. The captioner fills a few templates per
category (object, scene, action, attribute) with a small vocabulary, keeps each category's best
sentence when CLIP is confident enough, and joins them. VQA ranks ``"{question} {answer}"``
sentences. Both therefore reduce to "softmax over candidate text embeddings", which is why the
candidate embeddings are computed once and cached, and why everything runs on image embeddings
the pipeline already has.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from .prompts import validate_templates
from .zero_shot import (
    ImageSource,
    as_embedding_matrix,
    encode_texts_batched,
    images_to_pixels,
    l2_normalize,
    softmax,
)

# The original captioner's templates and vocabularies, in its category order.
SEED_CAPTION_TEMPLATES: dict[str, list[str]] = {
    "object": ["a {} in the image", "there is a {}", "a photo of a {}"],
    "scene": ["the scene shows {}", "this is a {}", "a {} environment"],
    "action": ["someone is {}", "the person is {}", "{} is happening"],
    "attribute": ["the image is {}", "this looks {}", "a {} photo"],
}
SEED_CAPTION_WORDS: dict[str, list[str]] = {
    "object": ["person", "car", "dog", "cat", "building", "tree", "flower"],
    "scene": ["indoor", "outdoor", "street", "nature", "city", "beach", "mountain"],
    "action": ["walking", "running", "sitting", "standing", "playing", "working"],
    "attribute": ["bright", "dark", "colorful", "monochrome", "clear", "blurry"],
}


class CaptionSpecError(ValueError):
    """A caption spec that is malformed; the message names the category or key."""


@dataclass(frozen=True)
class CaptionCategory:
    """One slot of a caption: templates with one ``{}`` each, filled with every word."""

    templates: tuple[str, ...]
    words: tuple[str, ...]

    def sentences(self) -> list[str]:
        """Candidates in the original order: for each word, every template."""
        return [t.format(w) for w in self.words for t in self.templates]


@dataclass
class CaptionSpec:
    """What the captioner may say. ``categories`` is ordered: the caption lists kept parts in it.

    A category's best sentence is kept when its probability (softmax over that category's
    candidates of logit_scale * cosine) is strictly greater than ``threshold``; the kept parts
    are joined with ``joiner`` and end with a period; with none kept the caption is ``fallback``.
    """

    categories: "OrderedDict[str, CaptionCategory]" = field(default_factory=OrderedDict)
    threshold: float = 0.2
    joiner: str = ". "
    fallback: str = "An image."

    def __post_init__(self) -> None:
        cats = OrderedDict()
        for name, cat in dict(self.categories).items():
            cats[str(name)] = _as_category(str(name), cat)
        if not cats:
            raise CaptionSpecError("caption spec: no categories")
        self.categories = cats
        try:
            self.threshold = float(self.threshold)
        except (TypeError, ValueError) as e:
            raise CaptionSpecError(f"caption spec: threshold {self.threshold!r} is not a number") from e
        if not 0.0 <= self.threshold < 1.0:
            raise CaptionSpecError(f"caption spec: threshold must be in [0, 1), got {self.threshold}")
        if not isinstance(self.joiner, str) or not isinstance(self.fallback, str):
            raise CaptionSpecError("caption spec: joiner and fallback must be strings")

    @classmethod
    def default(cls) -> "CaptionSpec":
        """The original captioner: object, scene, action, attribute; threshold 0.2."""
        return cls(OrderedDict((c, {"templates": SEED_CAPTION_TEMPLATES[c], "words": SEED_CAPTION_WORDS[c]})
                               for c in SEED_CAPTION_TEMPLATES))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CaptionSpec":
        """From ``{"categories": {name: {"templates": [...], "words": [...]}}, "threshold": ...,
        "joiner": ..., "fallback": ...}``. Unknown keys are errors, so typos do not pass silently."""
        if not isinstance(data, Mapping):
            raise CaptionSpecError(f"caption spec: expected a mapping, got {type(data).__name__}")
        allowed = {"categories", "threshold", "joiner", "fallback"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise CaptionSpecError(f"caption spec: unknown keys {unknown}; allowed: {sorted(allowed)}")
        if "categories" not in data or not isinstance(data["categories"], Mapping):
            raise CaptionSpecError("caption spec: 'categories' must map category names to templates/words")
        kwargs = {k: data[k] for k in ("threshold", "joiner", "fallback") if k in data}
        return cls(OrderedDict(data["categories"]), **kwargs)

    @classmethod
    def named(cls, name: str) -> "CaptionSpec":
        """A bundled vocabulary: ``"seed"`` (the default) or ``"demo"`` (the demo model's words)."""
        key = name.strip().lower()
        if key in ("seed", "default"):
            return cls.default()
        if key == "demo":
            from .prompts import demo_prompts

            data = demo_prompts()["caption"]
            if "categories" not in data:  # the asset lists categories directly: {name: {templates, vocabulary}}
                data = {"categories": {name: {"templates": c["templates"], "words": c.get("words", c.get("vocabulary"))}
                                       for name, c in data.items()}}
            return cls.from_dict(data)
        raise CaptionSpecError(f"unknown caption vocabulary {name!r}; use 'seed', 'demo', a mapping or a YAML file")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "CaptionSpec":
        """Read a YAML file holding the :meth:`from_dict` mapping."""
        import yaml  # optional dependency, only needed here

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise CaptionSpecError(f"cannot read caption spec {os.fspath(path)}: {e}") from e
        except yaml.YAMLError as e:
            raise CaptionSpecError(f"invalid YAML in caption spec {os.fspath(path)}: {e}") from e
        try:
            return cls.from_dict(data)
        except CaptionSpecError as e:
            raise CaptionSpecError(f"{os.fspath(path)}: {e}") from e

    def to_dict(self) -> dict:
        return {
            "categories": {n: {"templates": list(c.templates), "words": list(c.words)}
                           for n, c in self.categories.items()},
            "threshold": self.threshold,
            "joiner": self.joiner,
            "fallback": self.fallback,
        }


def _as_category(name: str, cat: Any) -> CaptionCategory:
    if isinstance(cat, CaptionCategory):
        return cat
    if not isinstance(cat, Mapping):
        raise CaptionSpecError(f"caption category {name!r}: expected {{templates, words}}, got {type(cat).__name__}")
    unknown = sorted(set(cat) - {"templates", "words"})
    if unknown:
        raise CaptionSpecError(f"caption category {name!r}: unknown keys {unknown}")
    try:
        templates = validate_templates(cat.get("templates") or [], source=f"caption category {name!r}")
    except ValueError as e:
        raise CaptionSpecError(str(e)) from e
    words = cat.get("words")
    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise CaptionSpecError(f"caption category {name!r}: 'words' must be a non-empty list")
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise CaptionSpecError(f"caption category {name!r}: every word must be a non-empty string")
    return CaptionCategory(tuple(templates), tuple(words))


class CaptionPart(NamedTuple):
    """A category's best sentence and its probability among that category's candidates."""

    sentence: str
    prob: float


class Captioner:
    """Caption images by ranking template sentences; see :class:`CaptionSpec`.

    All candidate sentences are encoded once, at construction, in batches.
    """

    def __init__(self, encoder: Any, spec: CaptionSpec | Mapping | str | os.PathLike | None = None,
                 *, logit_scale: float | None = None) -> None:
        if spec is None:
            spec = CaptionSpec.default()
        elif isinstance(spec, Mapping):
            spec = CaptionSpec.from_dict(spec)
        elif isinstance(spec, (str, os.PathLike)):
            spec = CaptionSpec.from_yaml(spec)
        self.encoder = encoder
        self.spec: CaptionSpec = spec
        self.logit_scale = float(encoder.logit_scale if logit_scale is None else logit_scale)
        self._sentences: dict[str, list[str]] = {n: c.sentences() for n, c in spec.categories.items()}
        flat = [s for sents in self._sentences.values() for s in sents]
        emb = encode_texts_batched(encoder, flat)
        self._embeddings: dict[str, np.ndarray] = {}
        start = 0
        for name, sents in self._sentences.items():
            self._embeddings[name] = emb[start : start + len(sents)]
            start += len(sents)
        self.embed_dim = int(emb.shape[1])

    def caption_details(self, image_embeddings: np.ndarray) -> list["OrderedDict[str, CaptionPart]"]:
        """Per image, every category's best sentence and its probability (kept or not)."""
        img = as_embedding_matrix(image_embeddings, self.embed_dim)
        per_cat = {}
        for name, emb in self._embeddings.items():
            # float64, so a probability compared with the threshold is not shifted by rounding
            probs = softmax(self.logit_scale * (img @ emb.T), dtype=np.float64)
            best = probs.argmax(axis=1)
            per_cat[name] = (best, probs[np.arange(len(best)), best])
        out = []
        for i in range(img.shape[0]):
            out.append(OrderedDict(
                (name, CaptionPart(self._sentences[name][int(best[i])], float(p[i])))
                for name, (best, p) in per_cat.items()
            ))
        return out

    def compose(self, parts: Mapping[str, CaptionPart]) -> str:
        """Join the parts above the threshold, in category order; the fallback if none is."""
        kept = [p.sentence.rstrip(".") for p in parts.values() if p.prob > self.spec.threshold]
        if not kept:
            return self.spec.fallback
        return self.spec.joiner.join(kept) + "."

    def caption_embeddings(self, image_embeddings: np.ndarray) -> list[str]:
        """One caption per image embedding ([N, D] or [D])."""
        return [self.compose(d) for d in self.caption_details(image_embeddings)]

    def caption_images(self, pixels: Any) -> list[str]:
        """Captions for preprocessed pixels [N, 3, R, R]."""
        return self.caption_embeddings(self.encoder.encode_images(pixels))

    def caption(self, images: ImageSource | Sequence[ImageSource]) -> str | list[str]:
        """Captions for a PIL image or path (one string) or a list of them (a list)."""
        single = not isinstance(images, (list, tuple))
        caps = self.caption_images(images_to_pixels(self.encoder, [images] if single else list(images)))
        return caps[0] if single else caps


class VisualQA:
    """Multiple-choice VQA: rank ``f"{question} {answer}"`` sentences against the image.

    Text embeddings of a question and its answer set are cached (LRU, ``cache_size`` sets),
    since batch jobs ask the same question of many images.
    """

    def __init__(self, encoder: Any, *, logit_scale: float | None = None, cache_size: int = 256) -> None:
        self.encoder = encoder
        self.logit_scale = float(encoder.logit_scale if logit_scale is None else logit_scale)
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[tuple[str, tuple[str, ...]], np.ndarray]" = OrderedDict()

    def answer_embeddings(self, question: str, candidate_answers: Sequence[str]) -> np.ndarray:
        """[A, D] normalised embeddings of the question/answer sentences (cached)."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        if isinstance(candidate_answers, str) or not candidate_answers:
            raise ValueError("candidate_answers must be a non-empty list of strings")
        answers = tuple(candidate_answers)
        if not all(isinstance(a, str) for a in answers):
            raise TypeError("candidate_answers must all be strings")
        if len(set(answers)) != len(answers):
            raise ValueError(f"duplicate candidate answers in {list(answers)}")
        key = (question, answers)
        emb = self._cache.get(key)
        if emb is None:
            emb = encode_texts_batched(self.encoder, [f"{question} {a}" for a in answers])
            self._cache[key] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return emb

    def _image_embeddings(self, image: Any) -> np.ndarray:
        """Embeddings ([D] / [N, D]) pass through; pixels ([3,R,R] / [N,3,R,R]) are encoded."""
        ndim = len(getattr(image, "shape", np.shape(image)))
        if ndim in (3, 4):
            pixels = image[None] if ndim == 3 else image
            return l2_normalize(np.asarray(self.encoder.encode_images(pixels), dtype=np.float32))
        return as_embedding_matrix(image)

    def answer_batch(self, image_embeddings: Any, question: str, candidate_answers: Sequence[str]) -> list[dict]:
        """One ``{'answer', 'confidence', 'all_scores'}`` per image."""
        img = self._image_embeddings(image_embeddings)
        text = self.answer_embeddings(question, candidate_answers)
        if img.shape[1] != text.shape[1]:
            raise ValueError(f"image embedding dimension {img.shape[1]} does not match text's {text.shape[1]}")
        probs = softmax(self.logit_scale * (img @ text.T))
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append({
                "answer": candidate_answers[best],
                "confidence": float(row[best]),
                "all_scores": {a: float(p) for a, p in zip(candidate_answers, row)},
            })
        return out

    def answer(self, image: Any, question: str, candidate_answers: Sequence[str]) -> dict:
        """Answer for one image, given as an embedding [D] or preprocessed pixels [3, R, R]."""
        img = self._image_embeddings(image)
        if img.shape[0] != 1:
            raise ValueError(f"answer() takes one image, got {img.shape[0]}; use answer_batch()")
        return self.answer_batch(img, question, candidate_answers)[0]

    def multi_choice(self, image: Any, questions_and_options: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Several questions about one image: ``[{'question', 'answer', 'confidence', 'all_scores'}]``."""
        img = self._image_embeddings(image)
        if img.shape[0] != 1:
            raise ValueError(f"multi_choice() takes one image, got {img.shape[0]}")
        results = []
        for i, item in enumerate(questions_and_options):
            if not isinstance(item, Mapping) or "question" not in item or "options" not in item:
                raise ValueError(f"item {i} must be a mapping with 'question' and 'options'")
            res = self.answer_batch(img, item["question"], list(item["options"]))[0]
            results.append({"question": item["question"], **res})
        return results

"""Captioner and multiple-choice VQA: logic with a controlled encoder, numbers with a tiny model."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from clip_core import create_model
from clip_core.captions import (
    SEED_CAPTION_TEMPLATES,
    SEED_CAPTION_WORDS,
    CaptionSpec,
    CaptionSpecError,
    Captioner,
    VisualQA,
)
from torch_test_encoder import TorchTestEncoder

D = 12


def basis(i: int) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[i] = 1.0
    return v


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder:
    """Known sentences map to fixed vectors; any other text to a fixed pseudo-random unit vector
    in the last two axes (far from every known sentence's basis vector)."""

    def __init__(self, table: dict[str, np.ndarray], logit_scale: float = 100.0):
        self.table, self.logit_scale, self.embed_dim = table, logit_scale, D
        self.encoded: list[str] = []

    def encode_texts(self, texts):
        self.encoded.extend(texts)
        out = []
        for t in texts:
            if t in self.table:
                out.append(unit(self.table[t]))
            else:
                h = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
                out.append(unit([0] * (D - 2) + [1.0, (h % 1000) / 1000.0]))
        return np.stack(out).astype(np.float32)

    def encode_images(self, pixels):  # "pixels" here are already the wanted embeddings
        return np.asarray(pixels, np.float32).reshape(len(pixels), -1)


SPEC = {
    "categories": {
        "object": {"templates": ["a {}"], "words": ["dog", "cat", "car"]},
        "scene": {"templates": ["in the {}"], "words": ["park", "city", "sea", "snow", "sky"]},
    },
}
TABLE = {"a dog": basis(0), "a cat": basis(1), "a car": basis(2), "in the park": basis(3),
         "in the city": basis(4), "in the sea": basis(5), "in the snow": basis(6), "in the sky": basis(7)}


@pytest.fixture
def fake():
    return FakeEncoder(dict(TABLE))


# --------------------------------------------------------------------------------- captioner
def test_caption_keeps_confident_parts_in_category_order(fake):
    cap = Captioner(fake, SPEC)
    img = np.stack([unit(basis(0) + basis(4)), unit(basis(2) + basis(5))])
    assert cap.caption_embeddings(img) == ["a dog. in the city.", "a car. in the sea."]
    details = cap.caption_details(img)
    assert list(details[0]) == ["object", "scene"]
    assert details[0]["object"].sentence == "a dog" and details[0]["object"].prob > 0.99

    reordered = Captioner(fake, {"categories": OrderedDict(reversed(list(SPEC["categories"].items())))})
    assert reordered.caption_embeddings(img[:1]) == ["in the city. a dog."]


def test_threshold_is_strict_and_probabilities_are_per_category(fake):
    cap = Captioner(fake, SPEC)
    # The image only matches "a cat"; the 5 scene sentences tie at exactly 1/5 = the threshold.
    details = cap.caption_details(basis(1))[0]
    assert details["scene"].prob == pytest.approx(0.2, abs=1e-6)
    assert details["scene"].sentence == "in the park"  # ties: the first candidate wins
    assert cap.caption_embeddings(basis(1)) == ["a cat."]

    # Hand-computed softmax over the object candidates only (logit_scale * cosine).
    img = unit([0.6, 0.5, 0.0] + [0] * (D - 3))
    logits = 100.0 * np.array([img[0], img[1], img[2]], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert cap.caption_details(img)[0]["object"].prob == pytest.approx(p[0], rel=1e-5)

    lenient = Captioner(fake, {**SPEC, "threshold": 0.19})
    assert lenient.caption_embeddings(basis(1)) == ["a cat. in the park."]


def test_fallback_when_nothing_is_confident(fake):
    cap = Captioner(fake, {**SPEC, "threshold": 0.5, "fallback": "Nothing to say."})
    assert cap.caption_embeddings(basis(11)) == ["Nothing to say."]
    assert Captioner(fake, {**SPEC, "threshold": 0.5}).caption_embeddings(basis(11)) == ["An image."]


def test_candidates_encoded_once_in_one_batch(fake):
    cap = Captioner(fake, SPEC)
    assert len(fake.encoded) == 8
    cap.caption_embeddings(np.stack([basis(0)] * 3))
    cap.caption_images(np.stack([basis(1)]))
    assert len(fake.encoded) == 8


def test_joiner_and_sentence_periods(fake):
    spec = {"categories": {"object": {"templates": ["a {}."], "words": ["dog", "cat"]},
                           "scene": {"templates": ["in the {}"], "words": ["park", "city"]}},
            "joiner": "; "}
    table = {"a dog.": basis(0), "a cat.": basis(1), "in the park": basis(3), "in the city": basis(4)}
    cap = Captioner(FakeEncoder(table), spec)
    assert cap.caption_embeddings(unit(basis(0) + basis(3))) == ["a dog; in the park."]


def test_default_spec_is_the_seed():
    spec = CaptionSpec.default()
    assert list(spec.categories) == ["object", "scene", "action", "attribute"]
    assert spec.threshold == 0.2 and spec.joiner == ". " and spec.fallback == "An image."
    for name, cat in spec.categories.items():
        assert list(cat.templates) == SEED_CAPTION_TEMPLATES[name]
        assert list(cat.words) == SEED_CAPTION_WORDS[name]
    obj = spec.categories["object"].sentences()
    assert obj[:4] == ["a person in the image", "there is a person", "a photo of a person", "a car in the image"]
    assert len(obj) == 7 * 3


def test_spec_yaml_round_trip_and_validation(tmp_path):
    import yaml

    path = tmp_path / "caption.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "threshold": 0.3}, sort_keys=False))
    spec = CaptionSpec.from_yaml(path)
    assert list(spec.categories) == ["object", "scene"] and spec.threshold == 0.3
    assert CaptionSpec.from_dict(spec.to_dict()) == spec

    bad_cases = [
        ({"categories": {"o": {"templates": ["no slot"], "words": ["x"]}}}, "exactly one"),
        ({"categories": {"o": {"templates": ["a {}"], "words": []}}}, "words"),
        ({"categories": {"o": {"templates": ["a {}"], "words": ["x"], "extra": 1}}}, "unknown keys"),
        ({"categories": {}}, "no categories"),
        ({**SPEC, "treshold": 0.1}, "unknown keys"),
        ({**SPEC, "threshold": 1.5}, "threshold"),
    ]
    for data, msg in bad_cases:
        with pytest.raises(CaptionSpecError, match=msg):
            CaptionSpec.from_dict(data)
    (tmp_path / "bad.yaml").write_text("categories: [unclosed\n")
    with pytest.raises(CaptionSpecError, match="bad.yaml"):
        CaptionSpec.from_yaml(tmp_path / "bad.yaml")


# ----------------------------------------------------------------------------------------- VQA
QA_TABLE = {"What animal is this? dog": basis(0), "What animal is this? cat": basis(1),
            "What animal is this? bird": basis(2), "What color is it? red": basis(3),
            "What color is it? blue": basis(4)}


def test_vqa_picks_the_matching_answer_and_scores_sum_to_one():
    enc = FakeEncoder(dict(QA_TABLE), logit_scale=10.0)
    qa = VisualQA(enc)
    img = unit(basis(1) * 0.8 + basis(0) * 0.3 + basis(4))
    res = qa.answer(img, "What animal is this?", ["dog", "cat", "bird"])
    assert res["answer"] == "cat"
    assert list(res["all_scores"]) == ["dog", "cat", "bird"]
    assert sum(res["all_scores"].values()) == pytest.approx(1.0, abs=1e-6)
    logits = 10.0 * np.array([img[0], img[1], img[2]], np.float64)
    p = np.exp(logits) / np.exp(logits).sum()
    assert res["confidence"] == pytest.approx(p[1], rel=1e-5)
    assert res["all_scores"]["dog"] == pytest.approx(p[0], rel=1e-5)

    batch = qa.answer_batch(np.stack([basis(0), basis(2)]), "What animal is this?", ["dog", "cat", "bird"])
    assert [r["answer"] for r in batch] == ["dog", "bird"]

    mc = qa.multi_choice(img, [{"question": "What animal is this?", "options": ["dog", "cat", "bird"]},
                               {"question": "What color is it?", "options": ["red", "blue"]}])
    assert [(r["question"], r["answer"]) for r in mc] == [("What animal is this?", "cat"),
                                                           ("What color is it?", "blue")]
    assert all(set(r) >= {"question", "answer", "confidence"} for r in mc)


def test_vqa_caches_repeated_question_sets_and_validates():
    enc = FakeEncoder(dict(QA_TABLE))
    qa = VisualQA(enc, cache_size=1)
    for _ in range(3):
        qa.answer(basis(0), "What animal is this?", ["dog", "cat"])
    assert len(enc.encoded) == 2
    qa.answer(basis(0), "What color is it?", ["red", "blue"])  # evicts the first set
    qa.answer(basis(0), "What animal is this?", ["dog", "cat"])
    assert len(enc.encoded) == 6
    with pytest.raises(ValueError, match="duplicate"):
        qa.answer(basis(0), "q", ["a", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        qa.answer(basis(0), "q", [])
    with pytest.raises(ValueError, match="one image"):
        qa.answer(np.stack([basis(0), basis(1)]), "q", ["a", "b"])
    with pytest.raises(ValueError, match="options"):
        qa.multi_choice(basis(0), [{"question": "q"}])


# --------------------------------------------------------------------- with a real tiny model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TorchTestEncoder(create_model("tiny-test"))


def test_default_captioner_and_vqa_with_tiny_model(tiny):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    img = tiny.encode_images(pixels)
    cap = Captioner(tiny)
    details = cap.caption_details(img)
    cands = {name: cat.sentences() for name, cat in cap.spec.categories.items()}
    text = {name: tiny.encode_texts(c).astype(np.float64) for name, c in cands.items()}
    for i, d in enumerate(details):
        for name, part in d.items():
            logits = tiny.logit_scale * img[i].astype(np.float64) @ text[name].T
            p = np.exp(logits - logits.max())
            p /= p.sum()
            assert part.sentence == cands[name][int(p.argmax())]
            assert part.prob == pytest.approx(p.max(), abs=1e-5)
        kept = [p.sentence for p in d.values() if p.prob > 0.2]
        assert cap.caption_embeddings(img[i])[0] == (". ".join(kept) + "." if kept else "An image.")
    assert cap.caption_images(pixels) == cap.caption_embeddings(img)

    qa = VisualQA(tiny)
    from_pixels = qa.answer(pixels[0], "What is in the picture?", ["a dog", "a cat", "a car"])
    from_emb = qa.answer(img[0], "What is in the picture?", ["a dog", "a cat", "a car"])
    assert from_pixels["answer"] == from_emb["answer"]
    assert sum(from_emb["all_scores"].values()) == pytest.approx(1.0, abs=1e-5)

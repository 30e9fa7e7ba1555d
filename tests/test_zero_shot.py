"""Zero-shot classifier and prompt sets, checked against hand computations with a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip_core import create_model
from clip_core.prompts import (
    SEED_TEMPLATES,
    PromptError,
    imagenet_classes,
    imagenet_templates,
    openai_dataset_names,
    openai_dataset_prompts,
    resolve_classes,
    resolve_templates,
    validate_templates,
)
from clip_core.zero_shot import ImageLoadError, ZeroShotClassifier, ZeroShotPrediction
from torch_test_encoder import TorchTestEncoder




@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TorchTestEncoder(create_model("tiny-test"))


@pytest.fixture(scope="module")
def pixels(encoder):
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g)


CLASSES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{}"]


def hand_class_embeddings(encoder, classes, templates):
    rows = []
    for c in classes:
        names = [c] if isinstance(c, str) else c
        e = encoder.encode_texts([t.format(n) for n in names for t in templates]).astype(np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(axis=0)
        rows.append(m / np.linalg.norm(m))
    return np.stack(rows)


def hand_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------- classifier
def test_class_embeddings_are_renormalised_template_means(encoder):
    clf = ZeroShotClassifier(encoder, CLASSES, TEMPLATES)
    assert clf.class_embeddings.shape == (len(CLASSES), encoder.embed_dim)
    assert clf.class_embeddings.dtype == np.float32
    np.testing.assert_allclose(clf.class_embeddings, hand_class_embeddings(encoder, CLASSES, TEMPLATES), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(clf.class_embeddings, axis=1), 1.0, atol=1e-5)


def test_text_encoding_is_batched_across_classes(encoder):
    encoder.text_batches.clear()
    ZeroShotClassifier(encoder, CLASSES, TEMPLATES, batch_size=4)
    assert sum(encoder.text_batches) == len(CLASSES) * len(TEMPLATES)  # 15 prompts
    assert encoder.text_batches == [4, 4, 4, 3]  # fixed batches spanning classes, not per class


def test_default_templates_are_the_seed_nine(encoder):
    clf = ZeroShotClassifier(encoder, ["cat", "dog"])
    assert clf.templates == list(SEED_TEMPLATES) and len(SEED_TEMPLATES) == 9
    assert clf.logit_scale == pytest.approx(encoder.logit_scale)


def test_predict_matches_hand_computed_logits(encoder, pixels):
    clf = ZeroShotClassifier(encoder, CLASSES, TEMPLATES)
    img = encoder.encode_images(pixels)
    logits = encoder.logit_scale * img.astype(np.float64) @ hand_class_embeddings(encoder, CLASSES, TEMPLATES).T
    probs = hand_softmax(logits)

    pred = clf.predict(img, top_k=3)
    assert isinstance(pred, ZeroShotPrediction)
    assert pred.indices.shape == (6, 3) and pred.probs.shape == (6, 3) and pred.probs.dtype == np.float32
    np.testing.assert_array_equal(pred.indices[:, 0], logits.argmax(axis=1))
    np.testing.assert_allclose(pred.probs, np.take_along_axis(probs, pred.indices, axis=1), atol=1e-5)
    assert np.all(np.diff(pred.probs, axis=1) <= 0)  # best first
    assert np.all(pred.probs.sum(axis=1) <= 1 + 1e-6)
    assert pred.labels == [[CLASSES[j] for j in row] for row in pred.indices]
    assert pred.top1_labels == [CLASSES[j] for j in logits.argmax(axis=1)]
    np.testing.assert_allclose(pred.top1_probs, probs.max(axis=1), atol=1e-5)

    full = clf.predict(img, top_k=len(CLASSES))
    np.testing.assert_allclose(full.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(clf.logits(img), logits, rtol=1e-4, atol=1e-4)


def test_top_k_is_clipped_and_validated(encoder, pixels):
    clf = ZeroShotClassifier(encoder, CLASSES[:2], TEMPLATES)
    pred = clf.predict(encoder.encode_images(pixels), top_k=10)
    assert pred.indices.shape == (6, 2)
    assert sorted(pred.indices[0].tolist()) == [0, 1]
    with pytest.raises(ValueError, match="top_k"):
        clf.predict(encoder.encode_images(pixels), top_k=0)


def test_predict_accepts_single_vector_and_checks_dimension(encoder, pixels):
    clf = ZeroShotClassifier(encoder, CLASSES, TEMPLATES)
    img = encoder.encode_images(pixels)
    one = clf.predict(img[2], top_k=2)
    np.testing.assert_array_equal(one.indices[0], clf.predict(img, top_k=2).indices[2])
    # un-normalised input gives the same answer (it is normalised first)
    np.testing.assert_allclose(clf.predict(img * 7.0, 2).probs, clf.predict(img, 2).probs, atol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        clf.predict(np.ones((2, encoder.embed_dim + 1), np.float32))


def assert_same_predictions(a, b):
    assert [[d["class"] for d in r] for r in a] == [[d["class"] for d in r] for r in b]
    np.testing.assert_allclose([[d["confidence"] for d in r] for r in a],
                               [[d["confidence"] for d in r] for r in b], atol=1e-5)


def test_embeddings_path_equals_pixels_and_images_paths(encoder, pixels, tmp_path):
    clf = ZeroShotClassifier(encoder, CLASSES, TEMPLATES)
    from_emb = clf.predict(encoder.encode_images(pixels), top_k=3).to_dicts()
    from_pix = clf.classify_images(pixels, top_k=3)
    assert_same_predictions(from_emb, from_pix)
    assert set(from_pix[0][0]) == {"class", "confidence"}

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    by_pil = clf.classify(images, top_k=2, batch_size=2)
    by_path = clf.classify([str(p) for p in paths], top_k=2)
    expected = clf.classify_images(torch.stack([encoder.preprocess(im) for im in images]), top_k=2)
    assert_same_predictions(by_pil, by_path)  # batches of 2 vs 3: equal up to rounding
    assert_same_predictions(by_pil, expected)
    single = clf.classify(paths[0], top_k=2)  # one image -> one list, as the original API
    assert_same_predictions([single], by_path[:1])

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        clf.classify([paths[0], bad])


def test_synonym_classes_average_all_names(encoder):
    classes = [["happy", "smiling"], "sad"]
    clf = ZeroShotClassifier(encoder, classes, TEMPLATES)
    assert clf.classes == ["happy", "sad"]
    np.testing.assert_allclose(clf.class_embeddings, hand_class_embeddings(encoder, classes, TEMPLATES), atol=1e-5)


def test_from_class_embeddings_round_trip(encoder, pixels):
    clf = ZeroShotClassifier(encoder, CLASSES, TEMPLATES)
    again = ZeroShotClassifier.from_class_embeddings(clf.class_embeddings, clf.classes, clf.logit_scale)
    img = encoder.encode_images(pixels)
    np.testing.assert_array_equal(again.predict(img).indices, clf.predict(img).indices)
    with pytest.raises(ValueError, match="class names"):
        ZeroShotClassifier.from_class_embeddings(clf.class_embeddings, CLASSES[:2], 100.0)


class OneHotEncoder:
    """Texts mentioning a known word map to that word's basis vector: a 'perfect' model."""

    def __init__(self, words, logit_scale=100.0):
        self.words, self.embed_dim, self.logit_scale = list(words), len(words), logit_scale

    def encode_texts(self, texts):
        out = np.zeros((len(texts), self.embed_dim), np.float32)
        for i, t in enumerate(texts):
            out[i, [j for j, w in enumerate(self.words) if w in t.replace(".", " ").split()][0]] = 1.0
        return out


def test_meaningful_model_picks_the_matching_class():
    enc = OneHotEncoder(["cat", "dog", "car"])
    clf = ZeroShotClassifier(enc, ["cat", "dog", "car"])
    np.testing.assert_allclose(clf.class_embeddings, np.eye(3), atol=1e-6)
    img = np.array([[0, 1, 0], [0.1, 0, 0.9]], np.float32)
    pred = clf.predict(img, top_k=2)
    assert pred.top1_labels == ["dog", "car"]
    assert pred.top1_probs[0] == pytest.approx(1 / (1 + 2 * np.exp(-100)), rel=1e-6)


# ---------------------------------------------------------------------------------- prompts
def test_template_validation():
    assert validate_templates(["a {}"]) == ["a {}"]
    for bad, msg in [(["no placeholder"], "exactly one"), (["{} and {}"], "exactly one"),
                     ([], "no templates"), ("a {}", "list"), ([3], "not a string"),
                     (["a {} {0}"], "valid format")]:
        with pytest.raises(PromptError, match=msg):
            resolve_templates(bad)
    with pytest.raises(PromptError, match="exactly one"):
        ZeroShotClassifier(OneHotEncoder(["cat"]), ["cat"], ["a photo"])


def test_bundled_imagenet_prompts():
    assert len(imagenet_classes()) == 1000 and len(imagenet_templates()) == 80
    assert imagenet_classes()[:2] == ["tench", "goldfish"]
    assert resolve_templates("imagenet") == resolve_templates("openai-imagenet") == imagenet_templates()
    assert resolve_classes("ImageNet") == imagenet_classes()
    assert resolve_templates(None) == resolve_templates("seed") == list(SEED_TEMPLATES)


def test_openai_dataset_prompts_parse():
    # Counts read off the markdown file by hand.
    classes, templates = openai_dataset_prompts("cifar10")
    assert len(classes) == 10 and len(templates) == 18
    assert classes[0] == "airplane" and templates[-1] == "a photo of the big {}."
    assert len(openai_dataset_prompts("Food101")[0]) == 101
    assert len(openai_dataset_names()) == 26
    fer, _ = openai_dataset_prompts("FacialEmotionRecognition2013", synonyms=True)
    assert fer[3] == ["happy", "smiling"]
    assert openai_dataset_prompts("FacialEmotionRecognition2013")[0][3] == "happy"
    assert resolve_templates("CIFAR10") == templates and resolve_classes("cifar10") == classes
    with pytest.raises(PromptError, match="available: .*CIFAR10"):
        openai_dataset_prompts("nope")


def test_resolve_from_files(tmp_path):
    (tmp_path / "classes.txt").write_text("# my classes\ncat\n\n  dog  \n# end\n")
    assert resolve_classes(tmp_path / "classes.txt") == ["cat", "dog"]
    assert resolve_classes(str(tmp_path / "classes.txt")) == ["cat", "dog"]
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["a {}.", "the {}."]}))
    assert resolve_templates(str(tmp_path / "t.json")) == ["a {}.", "the {}."]
    (tmp_path / "t.txt").write_text("a {}.\nan image of {}\n")
    assert resolve_templates(tmp_path / "t.txt") == ["a {}.", "an image of {}"]
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(PromptError, match="bad.txt"):
        resolve_templates(tmp_path / "bad.txt")
    (tmp_path / "dupes.txt").write_text("cat\ncat\n")
    with pytest.raises(PromptError, match="duplicate"):
        resolve_classes(tmp_path / "dupes.txt")
    with pytest.raises(PromptError, match="not found"):
        resolve_classes(str(tmp_path / "missing.txt"))
    with pytest.raises(PromptError, match="unknown class set"):
        resolve_classes("no-such-set")


def test_real_encoder_if_available(tmp_path, encoder, pixels):
    """Extra: the project's encoder gives the same classifier as the test encoder."""
    from clip_core import encoders
    from clip_core.checkpoints import save_model

    path = tmp_path / "tiny.safetensors"
    save_model(encoder.model, path)
    real = encoders.load_encoder(str(path), backend="torch", precision="fp32")
    ours = ZeroShotClassifier(encoder, CLASSES, TEMPLATES)
    theirs = ZeroShotClassifier(real, CLASSES, TEMPLATES)
    np.testing.assert_allclose(theirs.class_embeddings, ours.class_embeddings, atol=1e-4)
    assert theirs.logit_scale == pytest.approx(ours.logit_scale, rel=1e-5)
    np.testing.assert_allclose(theirs.predict(real.encode_images(pixels)).probs,
                               ours.predict(encoder.encode_images(pixels)).probs, atol=1e-4)

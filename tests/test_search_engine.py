"""The small in-memory image search engine over generated images and a tiny model."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from clip_core import create_model
from pipelines.index.search_engine import IDS_FILE, INDEX_FILE, ImageSearchEngine
from torch_test_encoder import TorchTestEncoder




@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TorchTestEncoder(create_model("tiny-test"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Five distinct noise/gradient images of different sizes and modes, one corrupt file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        h, w = 36 + 4 * i, 48 - 2 * i
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[..., i % 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
        img = Image.fromarray(arr)
        if i == 4:
            img = img.convert("L")
        p = folder / f"img{i}.png"
        img.save(p)
        paths.append(str(p))
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return folder, paths, str(corrupt)


@pytest.fixture(scope="module")
def built(encoder, image_dir):
    _, paths, corrupt = image_dir
    engine = ImageSearchEngine(encoder)
    report = engine.build_index(paths[:2] + [corrupt] + paths[2:], batch_size=2, progress=False)
    return engine, report


def test_build_reports_bad_images_and_indexes_the_rest(encoder, image_dir, caplog, capsys):
    _, paths, corrupt = image_dir
    engine = ImageSearchEngine(encoder)
    with caplog.at_level(logging.WARNING, logger="pipelines.index.search_engine"):
        report = engine.build_index(paths[:2] + [corrupt] + paths[2:], batch_size=2, progress=True)
    assert report.added == paths
    assert [p for p, _ in report.failed] == [corrupt]
    assert "corrupt.png" in report.failed[0][1]
    assert len(engine) == 5 and engine.ids == paths
    assert "corrupt.png" in caplog.text
    err = capsys.readouterr().err
    assert "indexed 6/6 images (1 failed)" in err


def test_search_by_image_finds_itself_first(built, image_dir):
    engine, _ = built
    _, paths, _ = image_dir
    for p in paths:
        hits = engine.search_by_image(p, k=3)
        assert len(hits) == 3
        assert hits[0][0] == p
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)
        assert hits[0][1] >= hits[1][1] >= hits[2][1]
    # a PIL image works too
    assert engine.search_by_image(Image.open(paths[1]), k=1)[0][0] == paths[1]


def test_search_by_text_scores_are_cosines(built, encoder, image_dir):
    engine, _ = built
    _, paths, _ = image_dir
    hits = engine.search_by_text("a photo of a dog", k=10)  # k is clipped to the index size
    assert len(hits) == 5 and sorted(h[0] for h in hits) == sorted(paths)
    text = encoder.encode_texts(["a photo of a dog"])[0]
    imgs = encoder.encode_images(torch.stack([encoder.preprocess(Image.open(p)) for p in paths]))
    expected = {p: float(imgs[i] @ text) for i, p in enumerate(paths)}
    for pid, score in hits:
        assert score == pytest.approx(expected[pid], abs=1e-4)
    assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)


def test_save_load_round_trip(built, encoder, image_dir, tmp_path):
    engine, _ = built
    _, paths, _ = image_dir
    out = tmp_path / "idx"
    engine.save(out)
    assert sorted(f.name for f in out.iterdir()) == sorted([INDEX_FILE, IDS_FILE])  # no temp files left
    assert json.loads((out / IDS_FILE).read_text())["ids"] == paths

    loaded = ImageSearchEngine(encoder).load(out)
    assert loaded.ids == engine.ids and len(loaded) == 5
    for q in ("a photo of a cat", "red"):
        assert loaded.search_by_text(q, 4) == engine.search_by_text(q, 4)
    assert loaded.search_by_image(paths[3], 5) == engine.search_by_image(paths[3], 5)

    offline = ImageSearchEngine.from_directory(out)  # no encoder: embedding queries only
    vec = encoder.encode_images(encoder.preprocess(Image.open(paths[0]))[None])[0]
    assert offline.search_by_embedding(vec, 2) == engine.search_by_embedding(vec, 2)
    with pytest.raises(ValueError, match="needs an encoder"):
        offline.search_by_text("x")


def test_add_embeddings_and_embedding_search():
    engine = ImageSearchEngine(dim=4)
    with pytest.raises(ValueError, match="empty"):
        engine.search_by_embedding(np.ones(4, np.float32))
    engine.add_embeddings(["a", "b"], np.eye(4, dtype=np.float32)[:2] * 3.0)  # normalised on add
    engine.add_embeddings([7], np.array([[1, 1, 0, 0]], np.float32))
    hits = engine.search_by_embedding(np.array([1, 0, 0, 0], np.float32), k=3)
    assert [h[0] for h in hits] == ["a", 7, "b"]
    np.testing.assert_allclose([h[1] for h in hits], [1.0, 2 ** -0.5, 0.0], atol=1e-6)
    batch = engine.search_embeddings(np.eye(4, dtype=np.float32)[:2], k=1)
    assert [b[0][0] for b in batch] == ["a", "b"]
    with pytest.raises(ValueError, match="ids for"):
        engine.add_embeddings(["x"], np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="dimension"):
        engine.add_embeddings(["x"], np.ones((1, 5), np.float32))
    with pytest.raises(TypeError, match="JSON"):
        engine.add_embeddings([("tuple", "id")], np.ones((1, 4), np.float32))


def test_load_rejects_incomplete_or_mismatched_indexes(tmp_path):
    engine = ImageSearchEngine(dim=4)
    engine.add_embeddings(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    engine.save(tmp_path / "ok")
    with pytest.raises(ValueError, match="dimension"):
        ImageSearchEngine(dim=8).load(tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / IDS_FILE).read_text())
    meta["ids"] = ["a"]
    (tmp_path / "ok" / IDS_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds 2 vectors"):
        ImageSearchEngine(dim=4).load(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageSearchEngine(dim=4).load(tmp_path / "nowhere")

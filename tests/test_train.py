"""Sample-data generator, contrastive training, the ``clip-etl train`` job, and the shipped demo model."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from clip_core import CLIPConfig, create_model, load_model, tokenize
from clip_core.preprocess import image_transform, load_image
from clip_core.train import (
    MAX_LOGIT_SCALE,
    PairsDataset,
    TrainConfig,
    clamp_logit_scale,
    contrastive_loss,
    init_patch_embedding_pca,
    lr_factor,
    parameter_groups,
    train,
    trim_tokens,
)
from pipelines.demo.sample_data import (
    COLORS,
    DEFAULT_HELD_OUT,
    SHAPES,
    SplitRules,
    class_name,
    generate_sample_set,
)
from pipelines.demo.sample_data import main as sample_main
from pipelines.train.job import add_train_arguments, run_train

ASSETS = Path(__file__).resolve().parents[1] / "clip_core" / "assets"
INDEPENDENT_RENDERER_FLOOR = 0.90  # the product's target for a renderer the demo model never saw
DEMO_MODEL = ASSETS / "demo-model.safetensors"
DEMO_PROMPTS = ASSETS / "demo_prompts.json"

# A CLIP small enough to train for a few dozen steps in seconds (the real 49408-token vocabulary).
TINY = {
    "embed_dim": 32,
    "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2},
    "text": {"context_length": 32, "width": 32, "layers": 1, "heads": 2},
}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model(CLIPConfig.from_dict(TINY))


@pytest.fixture(scope="module")
def sample64(tmp_path_factory) -> Path:
    """64 generated images with the default splits."""
    return generate_sample_set(tmp_path_factory.mktemp("sample64"), 64, seed=3, image_size=48)


# ----------------------------------------------------------------------------- generator


def _rows(manifest: Path) -> list[dict]:
    return pq.read_table(manifest).to_pylist()


def test_generator_is_deterministic(tmp_path):
    a = generate_sample_set(tmp_path / "a", 24, seed=7, fmt="mixed")
    b = generate_sample_set(tmp_path / "b", 24, seed=7, fmt="mixed")
    c = generate_sample_set(tmp_path / "c", 24, seed=8, fmt="mixed")
    rows_a, rows_b, rows_c = _rows(a), _rows(b), _rows(c)
    assert rows_a == rows_b
    assert [(a.parent / r["image"]).read_bytes() for r in rows_a] == [(b.parent / r["image"]).read_bytes() for r in rows_b]
    assert rows_a != rows_c
    exts = {Path(r["image"]).suffix for r in rows_a}
    assert exts == {".png", ".jpg"}  # "mixed" really mixes


def test_manifest_columns_and_content(tmp_path):
    manifest = generate_sample_set(tmp_path, 36, seed=1, image_size=64)
    table = pq.read_table(manifest)
    for col in ("id", "image", "text", "shape", "color", "background", "true_label", "split"):
        assert col in table.column_names
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == 36
    for r in rows:
        assert r["true_label"] == class_name(r["shape"], r["color"])
        assert r["background"] in ("light", "dark")
        img = load_image(str(manifest.parent / r["image"]))  # relative to the manifest
        assert img.size == (64, 64)
        assert r["text"].strip()


def test_splits_hold_out_the_promised_combinations(tmp_path):
    rows = _rows(generate_sample_set(tmp_path, 240, seed=0, image_size=32))
    held = {class_name(s, c) for s, c in DEFAULT_HELD_OUT}
    by_split = {s: {r["true_label"] for r in rows if r["split"] == s} for s in ("train", "val", "test_unseen")}
    assert by_split["test_unseen"] == held  # all six held-out pairs are tested ...
    assert not (by_split["train"] | by_split["val"]) & held  # ... and never trained or validated on
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {r["shape"] for r in train_rows} == set(SHAPES)  # every word is still learnable
    assert {r["color"] for r in train_rows} == set(COLORS)
    assert len(SHAPES) >= 6 and len(COLORS) >= 6
    assert by_split["val"] <= by_split["train"]


def test_split_rules_reject_unlearnable_hold_outs():
    all_reds = tuple((s, "red") for s in SHAPES)
    with pytest.raises(ValueError, match="red"):
        SplitRules(held_out=all_reds).validate()


def test_sample_data_cli(tmp_path, capsys):
    assert sample_main(["--out", str(tmp_path), "--n", "12", "--format", "png", "--image-size", "32"]) == 0
    rows = _rows(tmp_path / "manifest.parquet")
    assert len(rows) == 12 and all(r["image"].endswith(".png") for r in rows)


# ----------------------------------------------------------------------------- training pieces


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_gains_biases_embeddings_and_scale():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "visual.proj" in decayed and "text_projection" in decayed
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decayed
    for n in decayed:
        assert "embedding" not in n and "ln_" not in n and not n.endswith("bias") and n != "logit_scale"
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_contrastive_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    logits = 10.0 * img @ txt.t()
    labels = torch.arange(8)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert contrastive_loss(logits, logits.t()).item() == pytest.approx(expected.item())
    assert contrastive_loss(100 * torch.eye(8), 100 * torch.eye(8)).item() < 1e-6


def test_logit_scale_is_clamped_to_ln100(sample64):
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    # and the training loop applies it after every step, even when the optimizer pushes it up
    with torch.no_grad():
        model.logit_scale.fill_(MAX_LOGIT_SCALE)
    rows = _rows(sample64)
    ds = PairsDataset([str(sample64.parent / r["image"]) for r in rows], [r["text"] for r in rows],
                      image_transform(32), context_length=32)
    history = train(model, ds, TrainConfig(steps=2, batch_size=8, lr=0.5, warmup_steps=0, log_every=1), log_fn=None)
    assert max(history["logit_scale"]) <= 100.0 + 1e-3


def test_trim_tokens_keeps_the_text_features():
    model = tiny_model().eval()
    tokens = tokenize(["a red star", "a small blue circle on a dark background"], context_length=32)
    trimmed = trim_tokens(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_pairs_dataset_items(sample64):
    rows = _rows(sample64)[:4]
    images = [str(sample64.parent / rows[0]["image"]), (sample64.parent / rows[1]["image"]).read_bytes()]
    ds = PairsDataset(images, [rows[0]["text"], rows[1]["text"]], image_transform(32), context_length=32, augment=True)
    pixels, tokens = ds[1]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert tokens.shape == (32,) and tokens.dtype == torch.long
    with pytest.raises(ValueError):
        PairsDataset(images, ["one caption"], image_transform(32))


def test_synthetic_pairs_are_reproducible_fresh_and_never_held_out():
    from pipelines.train.synthetic_pairs import SyntheticPairs

    ds = SyntheticPairs(400, image_transform(32), seed=5, context_length=32)
    again = SyntheticPairs(400, image_transform(32), seed=5, context_length=32)
    pixels, tokens = ds[7]
    assert pixels.shape == (3, 32, 32) and tokens.shape == (32,) and tokens.dtype == torch.long
    assert torch.equal(pixels, again[7][0]) and torch.equal(tokens, again[7][1])  # item i is a pure function of i
    assert not torch.equal(pixels, ds[8][0])
    examples = [ds.example(i) for i in range(len(ds))]
    pairs = {pair for _, _, pair in examples}
    assert not pairs & set(DEFAULT_HELD_OUT)  # the test_unseen combinations never appear
    assert len(pairs) > 0.8 * len(SplitRules().seen_pairs())  # and the seen ones all do, about
    for img, text, (shape, color) in examples:  # captions name no other shape or color than their own
        words = set(text.replace(".", " ").replace(",", " ").split())
        assert img.size == (96, 96) and not (words & (set(SHAPES) | set(COLORS))) - {shape, color}, text
    other = SyntheticPairs(400, image_transform(32), seed=6, context_length=32)
    assert not torch.equal(other[7][0], pixels)
    with pytest.raises(IndexError):
        ds.example(400)


def test_synthetic_groups_share_color_and_background_but_not_shape():
    from pipelines.train.synthetic_pairs import SyntheticPairs

    ds = SyntheticPairs(64, image_transform(32), seed=1, context_length=32, group_size=8)
    groups = [[ds.example(i) for i in range(g, g + 8)] for g in range(0, 64, 8)]
    for group in groups:
        assert len({color for _, _, (_, color) in group}) == 1
        assert len({shape for _, _, (shape, _) in group}) >= 2
        assert not {pair for _, _, pair in group} & set(DEFAULT_HELD_OUT)
        corner = {tuple(img.getpixel((1, 1))) for img, _, _ in group}
        assert len({sum(px) > 3 * 127 for px in corner}) == 1  # one background lightness per group
    assert len({group[0][2][1] for group in groups}) >= 3  # groups differ in color
    with pytest.raises(ValueError):
        SyntheticPairs(64, image_transform(32), group_size=0)


def test_synthetic_variety_draws_other_renderings_of_the_same_shape():
    from pipelines.train.synthetic_pairs import SyntheticPairs

    plain = SyntheticPairs(60, image_transform(32), seed=2, context_length=32)
    varied = SyntheticPairs(60, image_transform(32), seed=2, context_length=32, variety=1.0)
    again = SyntheticPairs(60, image_transform(32), seed=2, context_length=32, variety=1.0)
    sizes = {varied.example(i)[0].size for i in range(60)}
    assert {plain.example(i)[0].size for i in range(60)} == {(96, 96)}
    assert len(sizes) > 20 and min(sizes)[0] >= 48 and max(sizes)[0] <= 224  # other image sizes
    assert torch.equal(varied[3][0], again[3][0])  # still a pure function of the index
    for i in range(60):  # the caption and the class stay the item's own
        assert varied.example(i)[2] == plain.example(i)[2]
    with pytest.raises(ValueError):
        SyntheticPairs(60, image_transform(32), variety=1.5)


def test_draw_outline_and_aliased_edges():
    from pipelines.demo.sample_data import ShapeSpec, draw

    spec = ShapeSpec("circle", "red", "light", "plain", "large", "center", (0.5, 0.5), 0.35, 0.0)

    def red_share(img) -> float:
        a = np.asarray(img, dtype=np.int16)
        return float(((a[..., 0] - a[..., 1]) > 100).mean())

    filled = draw(spec, 96, np.random.default_rng(0))
    outline = draw(spec, 96, np.random.default_rng(0), outline=0.15)
    assert 0.05 < red_share(outline) < 0.5 * red_share(filled)
    aliased = np.asarray(draw(spec, 96, np.random.default_rng(0), supersample=1), dtype=np.int16)
    smooth = np.asarray(filled, dtype=np.int16)
    # edge pixels between the two colors: a few where each is covered or not, many where anti-aliased
    partial = lambda a: int((((a[..., 0] - a[..., 1]) > 40) & ((a[..., 0] - a[..., 1]) < 160)).sum())
    assert partial(aliased) < partial(smooth)


def test_demo_model_labels_shapes_from_an_independent_renderer():
    """The bundled model on a renderer that shares no code with its training data (tests/independent_shapes.py).

    12 classes (red, green, blue, yellow x circle, square, triangle; "green triangle" is a pair
    never trained on), 12-way zero-shot: the shipped model measures 97.2% here (83.3% before it
    was trained on varied renderings); see the model card.
    """
    from independent_shapes import CLASSES, labelled_images

    model = load_model(DEMO_MODEL).eval()
    transform = image_transform(model.image_size)
    templates = json.loads(DEMO_PROMPTS.read_text())["templates"]
    items = labelled_images(15, seed=2026)
    with torch.no_grad():
        tokens = tokenize([t.format(c) for c in CLASSES for t in templates], context_length=model.context_length)
        text = F.normalize(model.encode_text(tokens), dim=-1).view(len(CLASSES), len(templates), -1)
        class_emb = F.normalize(text.mean(dim=1), dim=-1)
        pixels = torch.stack([transform(img) for img, _ in items])
        pred = (F.normalize(model.encode_image(pixels), dim=-1) @ class_emb.t()).argmax(dim=-1)
    accuracy = sum(CLASSES[int(p)] == label for p, (_, label) in zip(pred, items)) / len(items)
    assert accuracy >= INDEPENDENT_RENDERER_FLOOR, accuracy


def test_pca_patch_init_whitens_the_patch_embedding(sample64):
    rows = _rows(sample64)
    pixels = torch.stack([image_transform(32)(load_image(str(sample64.parent / r["image"]))) for r in rows])
    model = tiny_model()
    init_patch_embedding_pca(model, pixels)
    with torch.no_grad():
        feats = model.visual.conv1(pixels).flatten(2).transpose(1, 2).reshape(-1, 64)  # [N*G*G, W]
    feats = feats - feats.mean(dim=0)
    cov = feats.t() @ feats / feats.shape[0]
    top = cov.diagonal()[:8]  # leading components: unit variance (eps damps only the tiny ones)
    assert torch.allclose(top, torch.ones_like(top), atol=0.05), top
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.05  # decorrelated


def test_loss_decreases_on_a_tiny_model(sample64):
    rows = _rows(sample64)
    ds = PairsDataset([str(sample64.parent / r["image"]) for r in rows], [r["text"] for r in rows],
                      image_transform(32), context_length=32, augment=False)
    model = tiny_model()
    cfg = TrainConfig(steps=30, batch_size=16, lr=2e-3, warmup_steps=3, log_every=3, seed=0)
    history = train(model, ds, cfg, log_fn=None)
    losses = history["loss"]
    assert history["steps"] == 30 and len(losses) == 10
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    assert not model.training  # returned ready for inference


# ----------------------------------------------------------------------------- the train job


def _train_args(*argv: str) -> argparse.Namespace:
    return add_train_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_run_train_writes_a_loadable_checkpoint(sample64, tmp_path, capsys):
    base = tmp_path / "tiny.safetensors"
    from clip_core.checkpoints import save_model

    save_model(tiny_model(), base)  # fine-tune from a checkpoint, so the tiny shape is kept
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"classes": [class_name(s, c) for s in SHAPES for c in COLORS],
                                   "templates": ["the {}.", "a photo of the {}."]}))
    out, hist = tmp_path / "out" / "model.safetensors", tmp_path / "history.json"
    args = _train_args(str(sample64), "--model", str(base), "--out", str(out), "--steps", "6", "--batch-size", "16",
                       "--warmup-steps", "2", "--log-every", "2", "--eval-prompts", str(prompts),
                       "--history", str(hist), "--save-dtype", "float16", "--save-every", "3")
    assert run_train(args) == 0
    printed = capsys.readouterr().out
    assert "step 6/6 (100%)" in printed and "eta 0s" in printed and "img/s" in printed and "logit_scale" in printed
    assert f"step 3: saved {out}" in printed  # periodic checkpoint of a long run
    model = load_model(out)
    assert model.config == load_model(base).config
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), load_model(base).state_dict().values()))
    history = json.loads(hist.read_text())
    assert history["steps"] == 6
    assert {"zeroshot_top1/val", "zeroshot_top1/test_unseen"} <= set(history["eval"][-1])


def test_run_train_on_generated_pairs_evaluates_on_the_manifest(sample64, tmp_path, capsys):
    from clip_core.checkpoints import save_model

    base = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), base)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"classes": [class_name(s, c) for s in SHAPES for c in COLORS],
                                   "templates": ["the {}."]}))
    out, hist = tmp_path / "gen.safetensors", tmp_path / "history.json"
    args = _train_args(str(sample64), "--model", str(base), "--out", str(out), "--synthetic-pairs", "5000",
                       "--steps", "4", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "2",
                       "--eval-prompts", str(prompts), "--history", str(hist))
    assert run_train(args) == 0
    assert "5000 generated training pairs instead of its rows" in capsys.readouterr().out
    history = json.loads(hist.read_text())
    assert history["images_seen"] == 32 and {"zeroshot_top1/val", "zeroshot_top1/test_unseen"} <= set(history["eval"][-1])
    assert any(not torch.equal(a, b) for a, b in zip(load_model(out).state_dict().values(),
                                                     load_model(base).state_dict().values()))


def test_run_train_fails_cleanly_on_a_bad_manifest(tmp_path, capsys):
    args = _train_args(str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "m.safetensors"))
    assert run_train(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.parquet" in err[0]
    assert not (tmp_path / "m.safetensors").exists()


def test_pca_init_is_refused_for_a_checkpoint(sample64, tmp_path, capsys):
    from clip_core.checkpoints import save_model

    base = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), base)
    args = _train_args(str(sample64), "--model", str(base), "--out", str(tmp_path / "m.safetensors"),
                       "--pca-patch-init", "--steps", "1")
    assert run_train(args) != 0
    assert "pca-patch-init" in capsys.readouterr().err


@pytest.mark.e2e
def test_run_train_with_two_ray_train_workers(sample64, tmp_path):
    import ray
    from clip_core.checkpoints import save_model

    base = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), base)
    out = tmp_path / "ddp.safetensors"
    hist = tmp_path / "history.json"
    args = _train_args(str(sample64), "--model", str(base), "--out", str(out), "--steps", "4", "--batch-size", "8",
                       "--warmup-steps", "1", "--log-every", "2", "--workers", "2", "--history", str(hist))
    started_here = not ray.is_initialized()
    try:
        assert run_train(args) == 0
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    model = load_model(out)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), load_model(base).state_dict().values()))
    history = json.loads(hist.read_text())
    assert history["world_size"] == 2 and history["steps"] == 4
    assert history["images_seen"] == 4 * 8 * 2


# ----------------------------------------------------------------------------- the shipped demo model


def test_committed_demo_model_reaches_its_zero_shot_bound(tmp_path):
    """The bundled model, on images it never saw (a fresh seed), incl. shape-color pairs never trained on.

    The product's target is 90% on both splits; the shipped model measures 98.7% / 93.3% here
    (99.2% / 89.4% on 500 + 500 images of the same seed; see clip_core/assets/DEMO_MODEL_CARD.md).
    The floors sit a few images below the measured figures (75 images per split), far above the
    1.9% chance level: they catch a worse model as well as a broken loader, tokenizer or preprocessing.
    """
    assert DEMO_MODEL.is_file(), f"missing {DEMO_MODEL}"
    assert DEMO_MODEL.stat().st_size < 16e6
    prompts = json.loads(DEMO_PROMPTS.read_text())
    classes, templates = prompts["classes"], prompts["templates"]
    assert set(classes) == {class_name(s, c) for s in SHAPES for c in COLORS}
    manifest = generate_sample_set(tmp_path, 150, seed=20240611,
                                   split_rules=SplitRules(val_fraction=0.999, unseen_fraction=0.5))
    rows = _rows(manifest)
    model = load_model(DEMO_MODEL).eval()
    transform = image_transform(model.image_size)
    with torch.no_grad():
        tokens = tokenize([t.format(c) for c in classes for t in templates], context_length=model.context_length)
        text = F.normalize(model.encode_text(tokens), dim=-1).view(len(classes), len(templates), -1)
        class_emb = F.normalize(text.mean(dim=1), dim=-1)
        pixels = torch.stack([transform(load_image(str(manifest.parent / r["image"]))) for r in rows])
        pred = (F.normalize(model.encode_image(pixels), dim=-1) @ class_emb.t()).argmax(dim=-1)
    correct = [classes[int(p)] == r["true_label"] for p, r in zip(pred, rows)]
    acc = {split: sum(c for c, r in zip(correct, rows) if r["split"] == split)
           / sum(r["split"] == split for r in rows) for split in ("val", "test_unseen")}
    assert sum(r["split"] == "test_unseen" for r in rows) == 75
    assert acc["val"] >= 0.90, acc
    assert acc["test_unseen"] >= 0.80, acc

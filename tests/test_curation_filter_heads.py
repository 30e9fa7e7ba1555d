"""clip_score, CLIP-score filtering and heads on a real run of the demo model over demo data.

One module-scoped run embeds a demo set with three heads trained here on other demo images (a
linear shape classifier saved as .safetensors and as .npz, an "is red" MLP saved as .pt) and
``filter.top_fraction`` set; the tests check its columns against the written embeddings, the
heads' accuracy on these held-out images, and the filter's exact counts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline_fixtures import ray_local, s3_server  # noqa: F401 (fixtures)
from pipeline_fixtures import cosine_rows, embeddings, read_results
from pipelines import cli
from pipelines.curation.filter import FilterRule, decide, keep_count, run_filter
from pipelines.curation.heads import HeadError, layers_from_arrays
from pipelines.demo.sample_data import SHAPES, generate_sample_set

pytestmark = pytest.mark.e2e
TOP_FRACTION = 0.3
EXTRA_ROWS = 3  # no text, no image, an unreadable image: rows without a clip_score


def _encoder():
    from pipelines.etl.embed import ModelSpec, load_job_encoder

    return load_job_encoder(ModelSpec("demo", "torch", "fp32", "cpu", num_threads=2))


def _image_embeddings(encoder, manifest: Path) -> tuple[np.ndarray, pa.Table]:
    from clip_core.preprocess import load_image

    table = pq.read_table(manifest)
    pixels = torch.stack([encoder.preprocess(load_image(str(manifest.parent / p)))
                          for p in table.column("image").to_pylist()])
    return encoder.encode_images(pixels), table


def _train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, loss_fn, steps: int = 400) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Heads trained on 240 demo images' embeddings: shape (linear, 6 classes) and is-red (MLP)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("heads")
    encoder = _encoder()
    x, table = _image_embeddings(encoder, generate_sample_set(root / "train", 240, seed=11))
    shape = np.array([SHAPES.index(s) for s in table.column("shape").to_pylist()])
    red = np.array([c == "red" for c in table.column("color").to_pylist()], np.float32)
    linear = _train(torch.nn.Linear(x.shape[1], len(SHAPES)), x, shape, torch.nn.functional.cross_entropy)
    mlp = _train(torch.nn.Sequential(torch.nn.Linear(x.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)),
                 x, red[:, None], torch.nn.functional.binary_cross_entropy_with_logits)
    save_file({k: v.contiguous() for k, v in linear.state_dict().items()}, str(root / "shape.safetensors"))
    w, b = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    np.savez(root / "shape.npz", W0=w.T, b0=b)  # the numpy layout: x @ W + b
    torch.save(mlp.state_dict(), root / "red.pt")  # keys 0.weight, 0.bias, 2.weight, 2.bias
    bad = torch.nn.Linear(x.shape[1] + 1, 1)
    save_file({k: v.contiguous() for k, v in bad.state_dict().items()}, str(root / "wide.safetensors"))
    return {"root": root, "dim": x.shape[1], "linear": linear, "mlp": mlp,
            "specs": [{"name": "shape_probs", "path": str(root / "shape.safetensors"), "activation": "softmax"},
                      {"name": "shape_npz", "path": str(root / "shape.npz"), "activation": "softmax"},
                      {"name": "red_prob", "path": str(root / "red.pt"), "activation": "sigmoid"}]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """60 held-out demo images (another seed) plus rows without a clip_score."""
    root = tmp_path_factory.mktemp("data")
    manifest = generate_sample_set(root, 60, seed=23)
    table = pq.read_table(manifest)
    (root / "broken.jpg").write_bytes(b"not an image")
    extra = {name: [None] * EXTRA_ROWS for name in table.column_names}
    extra.update(id=["no-text", "no-image", "broken"], image=[table.column("image")[0].as_py(), None, "broken.jpg"],
                 text=[None, "a red circle", "a blue star"])
    pq.write_table(pa.concat_tables([table, pa.table(extra, schema=table.schema)]), manifest)
    return manifest


def _config(tmp: Path, manifest: Path, out: Path, head_specs: list[dict], **filter_keys) -> Path:
    cfg = {"input": {"path": str(manifest)}, "output": {"path": str(out), "shard_size": 20},
           "model": {"checkpoint": "demo", "precision": "fp32", "backend": "torch"},
           "embed": {"batch_size": 16}, "decode": {"batch_size": 16},
           "label": {"enabled": False}, "caption": {"enabled": False}, "index": {"enabled": False},
           "filter": filter_keys, "heads": head_specs}
    path = tmp / f"job-{len(list(tmp.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(ray_local, dataset, heads, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    out = tmp / "out"
    rc = cli.main(["run", "-c", str(_config(tmp, dataset, out, heads["specs"], top_fraction=TOP_FRACTION))])
    assert rc == 0
    return {"out": out, "tmp": tmp, "table": read_results(out),
            "record": json.loads((out / "_run.json").read_text())}


def _filter_table(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


# ---------------------------------------------------------------------------------- clip_score
def test_clip_score_is_the_cosine_of_the_written_embeddings(run):
    table = run["table"]
    assert table.schema.field("clip_score").type == pa.float32()
    both = (pc.is_valid(table.column("image_embedding")).to_numpy(zero_copy_only=False)
            & pc.is_valid(table.column("text_embedding")).to_numpy(zero_copy_only=False))
    score = table.column("clip_score")
    assert np.array_equal(score.is_valid().to_numpy(zero_copy_only=False), both)
    assert both.sum() == table.num_rows - EXTRA_ROWS
    rows = table.filter(pa.array(both))
    expected = cosine_rows(embeddings(rows, "image_embedding"), embeddings(rows, "text_embedding"))
    np.testing.assert_allclose(rows.column("clip_score").to_numpy(), expected, atol=1e-6)
    ids = table.column("id").to_pylist()
    assert [score[ids.index(i)].as_py() for i in ("no-text", "no-image", "broken")] == [None] * 3
    shuffled = cosine_rows(embeddings(rows, "image_embedding"), np.roll(embeddings(rows, "text_embedding"), 1, 0))
    assert rows.column("clip_score").to_numpy().mean() > shuffled.mean() + 0.1  # own caption beats another's


# ---------------------------------------------------------------------------------- filter
def test_top_fraction_keeps_exactly_the_best_rows(run):
    table, decisions = run["table"], _filter_table(run["out"] / "filter")
    assert decisions.column("id").to_pylist() == table.column("id").to_pylist()  # one row per result row, in order
    scored = table.num_rows - EXTRA_ROWS
    k = keep_count(TOP_FRACTION, scored)
    assert k == math.floor(TOP_FRACTION * scored + 0.5)
    keep = decisions.column("keep").to_numpy(zero_copy_only=False)
    assert keep.sum() == k
    scores = table.column("clip_score").to_numpy(zero_copy_only=False)
    valid = ~np.isnan(scores)
    kept, dropped = scores[keep], scores[valid & ~keep]
    assert kept.min() >= dropped.max()  # the kept rows are the best ones
    reasons = decisions.column("reason").to_pylist()
    assert {r for r, k_ in zip(reasons, keep) if k_} == {None}
    assert sorted(set(reasons) - {None}) == ["no_clip_score", "outside_top_fraction"]
    assert reasons.count("no_clip_score") == EXTRA_ROWS
    summary = run["record"]["filter"]
    assert summary["kept"] == k and summary["rows"] == table.num_rows and summary["top_fraction_scored"] == scored
    assert summary["threshold"] == pytest.approx(float(kept.min()))
    assert summary["reasons"] == {"no_clip_score": EXTRA_ROWS, "below_min_clip_score": 0,
                                  "outside_top_fraction": scored - k}


def test_min_clip_score_and_both_rules(run, ray_local):
    table = run["table"]
    scores = table.column("clip_score").to_numpy(zero_copy_only=False)
    threshold = float(np.nanmedian(scores))
    folder = run["tmp"] / "filter-min"
    summary = run_filter(str(run["out"] / "results"), str(folder), threshold, None, None, ".tmp-test-")
    keep = _filter_table(folder).column("keep").to_numpy(zero_copy_only=False)
    assert np.array_equal(keep, np.nan_to_num(scores, nan=-2) >= threshold)
    assert summary["reasons"]["below_min_clip_score"] == int((scores < threshold).sum())
    # both rules: the top fraction is taken over all scored rows, the minimum applies on top
    folder = run["tmp"] / "filter-both"
    run_filter(str(run["out"] / "results"), str(folder), threshold, 0.8, None, ".tmp-test-")
    both = _filter_table(folder)
    assert both.column("keep").to_numpy(zero_copy_only=False).sum() == int((scores >= threshold).sum())
    assert set(both.column("reason").to_pylist()) == {None, "no_clip_score", "below_min_clip_score"}


def test_ties_are_broken_by_output_order_so_the_count_is_exact(ray_local, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    parts = [[0.5, 0.2, 0.2, None], [0.2, 0.9, 0.2], [0.2, -0.1, float("nan")]]
    for i, scores in enumerate(parts):
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(len(scores))],
                                 "clip_score": pa.array(scores, pa.float32())}), results / f"part-{i:05d}.parquet")
    summary = run_filter(str(results), str(tmp_path / "filter"), None, 0.5, None, ".tmp-test-")
    table = _filter_table(tmp_path / "filter")
    # 8 finite scores -> k = 4: 0.9, 0.5 and the first two of the six rows tied at 0.2
    assert summary["top_fraction_scored"] == 8 and summary["kept"] == 4 and summary["ties_at_threshold"] == 5
    kept = [i for i, k in zip(table.column("id").to_pylist(), table.column("keep").to_pylist()) if k]
    assert kept == ["0-0", "0-1", "0-2", "1-1"]
    assert table.column("reason").to_pylist()[3] == "no_clip_score"  # null
    assert table.column("reason").to_pylist()[-1] == "no_clip_score"  # NaN


def test_decide_without_a_top_fraction_rule_and_none_kept():
    scores = pa.array([0.3, None, 0.1], pa.float32())
    keep, reasons = decide(scores, FilterRule(min_clip_score=0.2, top_fraction=None), 0)
    assert keep.tolist() == [True, False, False] and reasons == [None, "no_clip_score", "below_min_clip_score"]
    keep, reasons = decide(scores, FilterRule(None, 0.01, threshold_key=None, kept_target=0), 0)
    assert not keep.any() and reasons == ["outside_top_fraction", "no_clip_score", "outside_top_fraction"]


# ---------------------------------------------------------------------------------- heads
def test_head_columns_equal_the_heads_applied_to_the_written_embeddings(run, heads):
    table = run["table"]
    ok = pc.is_valid(table.column("image_embedding")).to_numpy(zero_copy_only=False)
    assert table.schema.field("shape_probs").type == pa.list_(pa.float32(), len(SHAPES))
    assert table.schema.field("red_prob").type == pa.float32()
    rows = table.filter(pa.array(ok))
    x = torch.from_numpy(embeddings(rows, "image_embedding"))
    with torch.no_grad():
        probs = torch.softmax(heads["linear"](x), dim=1).numpy()
        red = torch.sigmoid(heads["mlp"](x)).numpy()[:, 0]
    np.testing.assert_allclose(embeddings(rows, "shape_probs"), probs, atol=1e-5)
    np.testing.assert_allclose(embeddings(rows, "shape_npz"), probs, atol=1e-5)
    np.testing.assert_allclose(rows.column("red_prob").to_numpy(), red, atol=1e-5)
    for name in ("shape_probs", "red_prob"):  # null exactly where the image embedding is
        assert np.array_equal(table.column(name).is_valid().to_numpy(zero_copy_only=False), ok)


def test_heads_are_accurate_on_held_out_images(run):
    table = run["table"]
    rows = table.filter(pc.and_(pc.is_valid(table.column("shape_probs")), pc.is_valid(table.column("shape"))))
    assert rows.num_rows == 60
    truth = np.array([SHAPES.index(s) for s in rows.column("shape").to_pylist()])
    shape_acc = np.mean(embeddings(rows, "shape_probs").argmax(1) == truth)
    is_red = np.array([c == "red" for c in rows.column("color").to_pylist()])
    said_red = rows.column("red_prob").to_numpy() > 0.5
    balanced_acc = (np.mean(said_red[is_red]) + np.mean(~said_red[~is_red])) / 2  # 0.5 for a constant answer
    assert shape_acc >= 0.85, shape_acc
    assert balanced_acc >= 0.85, balanced_acc
    assert run["record"]["stages"]["heads"] == ["shape_probs", "shape_npz", "red_prob"]


def test_a_resume_with_other_heads_is_refused(run, dataset, heads, capsys):
    cfg = _config(run["tmp"], dataset, run["out"], heads["specs"][:2], top_fraction=TOP_FRACTION)
    assert cli.main(["run", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "different plan" in err and "heads" in err


def test_a_head_of_the_wrong_input_dimension_fails_before_work(ray_local, dataset, heads, tmp_path, capsys):
    out = tmp_path / "out"
    path = heads["root"] / "wide.safetensors"
    cfg = _config(tmp_path, dataset, out, [{"name": "wide", "path": str(path)}])
    assert cli.main(["run", "-c", str(cfg)]) == 1
    (msg,) = [ln for ln in capsys.readouterr().err.splitlines() if "-dim" in ln]
    assert str(path) in msg and f"{heads['dim'] + 1}-dim" in msg and f"{heads['dim']}-dim" in msg
    assert not (out / "results").exists() and not (out / "_plan.json").exists()


def test_a_head_name_that_is_a_result_column_is_refused(ray_local, dataset, heads, tmp_path, capsys):
    cfg = _config(tmp_path, dataset, tmp_path / "out", [{**heads["specs"][0], "name": "color"}])
    assert cli.main(["run", "-c", str(cfg)]) == 1
    assert "'color' is already a results column" in capsys.readouterr().err


def test_head_layouts():
    rng = np.random.default_rng(0)
    w0, b0, w1 = rng.normal(size=(8, 4)), rng.normal(size=8), rng.normal(size=(2, 8))
    layers = layers_from_arrays({"layers.0.weight": w0, "layers.0.bias": b0, "layers.2.weight": w1}, "h.pt")
    assert [w.shape for w, _ in layers] == [(8, 4), (2, 8)] and not layers[1][1].any()  # missing bias = 0
    assert layers_from_arrays({"W0": w0.T, "b0": b0}, "h.npz")[0][0].shape == (8, 4)
    with pytest.raises(HeadError, match="unexpected key 'norm.running_mean'"):
        layers_from_arrays({"0.weight": w0, "norm.running_mean": b0}, "h.pt")
    with pytest.raises(HeadError, match="layer 1 takes 4 inputs but layer 0 gives 8"):
        layers_from_arrays({"0.weight": w0, "1.weight": w0}, "h.pt")


def test_unreadable_head_files_fail_with_one_line_naming_them(tmp_path):
    from pipelines.config import HeadConfig
    from pipelines.curation.heads import load_head

    for name, data in (("h.safetensors", b"garbage"), ("h.npz", b"garbage"), ("h.pt", b"garbage")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(HeadError, match=str(tmp_path / name)) as e:
            load_head(HeadConfig(name="h", path=str(tmp_path / name)))
        assert "\n" not in str(e.value)
    torch.save(torch.nn.Linear(4, 1), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(HeadError, match="save the head's state_dict"):
        load_head(HeadConfig(name="h", path=str(tmp_path / "module.pt")))
    with pytest.raises(HeadError, match="file not found"):
        load_head(HeadConfig(name="h", path=str(tmp_path / "missing.npz")))


def test_a_head_from_s3(s3_server, tmp_path):
    from pipeline_fixtures import s3_client, s3_overrides
    from pipelines.config import HeadConfig, load_config
    from pipelines.curation.heads import load_head

    w, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.array([1.0, -1.0], np.float32)
    np.savez(tmp_path / "h.npz", weight=w, bias=b)  # torch layout in an npz
    client = s3_client(s3_server)
    client.create_bucket(Bucket="heads")
    client.upload_file(str(tmp_path / "h.npz"), "heads", "m/h.npz")
    s3 = load_config(None, s3_overrides(s3_server)).s3_options()
    head = load_head(HeadConfig(name="h", path="s3://heads/m/h.npz", activation="sigmoid"), s3)
    x = np.eye(4, dtype=np.float32)
    np.testing.assert_allclose(head.forward(x), 1 / (1 + np.exp(-(x @ w.T + b))), rtol=1e-6)
    assert (head.in_dim, head.out_dim) == (4, 2)


@pytest.mark.parametrize("overrides, message", [
    (["filter.top_fraction=0"], r"'filter\.top_fraction' must be in \(0, 1\]"),
    (["filter.min_clip_score=1.5"], r"'filter\.min_clip_score' must be in \[-1, 1\]"),
    (["heads=[{name: a, path: x.npz}, {name: a, path: y.npz}]"], r"'heads\[1\]\.name': 'a' names two heads"),
    (["heads=[{name: __a, path: x.npz}]"], r"'heads\[0\]\.name' must be a column name"),
    (["heads=[{name: a}]"], r"'heads\[0\]\.path' is required"),
    (["heads=[{name: a, path: x.npz, activation: tanh}]"], r"'heads\[0\]\.activation' must be one of none, sigmoid"),
    (["heads=[{name: a, path: x.npz, input: caption}]"], r"'heads\[0\]\.input' must be one of image_embedding"),
    (["heads=[{name: a, pth: x.npz}]"], r"unknown config key 'heads\[0\]\.pth' \(did you mean 'path'\?\)"),
    (["heads={name: a}"], r"'heads' must be a list of mappings"),
])
def test_filter_and_heads_config_errors_name_the_key(overrides, message):
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_filter_without_texts_fails_before_work(dataset, tmp_path, capsys):
    images_only = dataset.parent / "images-only.parquet"
    pq.write_table(pq.read_table(dataset, columns=["id", "image"]), images_only)
    out = tmp_path / "out"
    assert cli.main(["run", "-c", str(_config(tmp_path, images_only, out, [], min_clip_score=0.2))]) == 1
    assert "need clip_score, which needs both an image and a text column" in capsys.readouterr().err
    assert not (out / "results").exists()

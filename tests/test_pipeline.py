"""End to end on generated images with a tiny model: real Ray Data, real Parquet.

The job's numbers must be the encoder's numbers: every embedding is compared with calling the
encoder directly on the same files, labels with the classifier run directly, captions with the
captioner run directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline_fixtures import ray_local, tiny_checkpoint, tiny_encoder  # noqa: F401 (fixtures)
from pipeline_fixtures import (
    CLASSES,
    cosine_rows,
    embeddings,
    image_bytes,
    make_image,
    read_results,
    write_images,
    write_manifest,
)
from pipelines import cli

pytestmark = pytest.mark.e2e
N = 24


def _job_args(manifest: Path, out: Path, checkpoint: str, *extra: str) -> list[str]:
    return [
        f"input.path={manifest}",
        f"output.path={out}",
        f"model.checkpoint={checkpoint}",
        "model.precision=fp32",
        "output.shard_size=10",
        "embed.batch_size=8",
        "decode.batch_size=8",
        f"label.classes=[{', '.join(CLASSES)}]",
        "index.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 images (PNG/JPEG, odd sizes) referenced by relative and absolute paths, with texts."""
    root = tmp_path_factory.mktemp("data")
    paths = write_images(root / "images", N, size=(45, 37))
    images = [f"images/{p.name}" if i % 3 else str(p) for i, p in enumerate(paths)]  # relative and absolute
    texts = [f"a photo of thing number {i}" for i in range(N)]
    manifest = write_manifest(root / "manifest.parquet", {
        "id": [f"row-{i:03d}" for i in range(N)],
        "image": images,
        "text": texts,
        "source": [f"src{i % 4}" for i in range(N)],
        "weight": np.arange(N, dtype=np.float64) / 10,
    }, row_group_size=7)
    return {"root": root, "manifest": manifest, "paths": paths, "texts": texts}


@pytest.fixture(scope="module")
def full_run(ray_local, dataset, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "job"
    rc = cli.main(["run", *_job_args(dataset["manifest"], out, tiny_checkpoint)])
    return {"rc": rc, "out": out}


def _direct_image_embeddings(encoder, paths) -> np.ndarray:
    from clip_core.preprocess import load_image

    pixels = torch.stack([encoder.preprocess(load_image(str(p))) for p in paths])
    return encoder.encode_images(pixels)


def test_run_finishes_and_marks_success(full_run):
    assert full_run["rc"] == 0
    out = full_run["out"]
    assert (out / "_SUCCESS").exists()
    names = sorted(os.listdir(out / "results"))
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not [n for n in os.listdir(out / "results") if n.startswith(".tmp")]


def test_results_schema_and_counts(full_run, tiny_encoder):
    table = read_results(full_run["out"])
    assert table.num_rows == N
    ids = table.column("id").to_pylist()
    assert sorted(ids) == [f"row-{i:03d}" for i in range(N)] and len(set(ids)) == N
    schema = table.schema
    d = tiny_encoder.embed_dim
    assert schema.field("image_embedding").type == pa.list_(pa.float32(), d)
    assert schema.field("text_embedding").type == pa.list_(pa.float32(), d)
    assert schema.field("labels_topk").type == pa.list_(pa.string())
    assert schema.field("scores_topk").type == pa.list_(pa.float32())
    for name in ("label", "caption", "status", "error", "image", "text", "source", "weight"):
        assert name in schema.names
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("error").null_count == N
    emb = embeddings(table, "image_embedding")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert table.column("weight").to_pylist() == [i / 10 for i in range(N)]  # manifest order kept


def test_embeddings_equal_the_encoder(full_run, dataset, tiny_encoder):
    table = read_results(full_run["out"])
    order = [int(i.split("-")[1]) for i in table.column("id").to_pylist()]
    paths = [dataset["paths"][i] for i in order]
    cos = cosine_rows(embeddings(table, "image_embedding"), _direct_image_embeddings(tiny_encoder, paths))
    assert cos.min() >= 0.9999, cos
    texts = [dataset["texts"][i] for i in order]
    cos_t = cosine_rows(embeddings(table, "text_embedding"), tiny_encoder.encode_texts(texts))
    assert cos_t.min() >= 0.9999, cos_t


def test_labels_and_captions_equal_direct_calls(full_run, dataset, tiny_encoder):
    from clip_core.captions import Captioner
    from clip_core.zero_shot import ZeroShotClassifier

    table = read_results(full_run["out"])
    order = [int(i.split("-")[1]) for i in table.column("id").to_pylist()]
    direct = _direct_image_embeddings(tiny_encoder, [dataset["paths"][i] for i in order])
    pred = ZeroShotClassifier(tiny_encoder, CLASSES, None).predict(direct, 5)
    assert table.column("label").to_pylist() == pred.top1_labels
    assert table.column("labels_topk").to_pylist() == pred.labels
    np.testing.assert_allclose(np.array(table.column("scores_topk").to_pylist()), pred.probs, atol=1e-4)
    np.testing.assert_allclose(table.column("label_score").to_numpy(), pred.top1_probs, atol=1e-4)
    assert len(pred.labels[0]) == min(5, len(CLASSES))
    assert table.column("caption").to_pylist() == Captioner(tiny_encoder).caption_embeddings(direct)


def test_run_record(full_run, tiny_checkpoint):
    from clip_core.encoders import load_encoder

    record = json.loads((full_run["out"] / "_run.json").read_text())
    assert record["status"] == "succeeded" and record["job"] == "run"
    assert record["counts"]["rows_in"] == N and record["counts"]["rows_out"] == N
    assert record["counts"]["ok"] == N and record["counts"]["error"] == 0
    # model.backend=auto on CPU actors: the ONNX export of the checkpoint, exported once and cached
    assert record["model"]["backend"] == "onnx" and record["config"]["model"]["backend"] == "auto"
    assert record["model"]["fingerprint"] == load_encoder(tiny_checkpoint, "onnx").fingerprint
    assert record["config"]["label"]["classes"] == CLASSES
    assert {"ray", "torch", "pyarrow"} <= set(record["versions"])
    for key in ("manifest_s", "model_check_s", "process_s", "total_s"):
        assert record["timings"][key] >= 0
    assert {"read", "decode", "embed", "write"} <= set(record["timings"]["stage_busy_s"])
    plan = json.loads((full_run["out"] / "_plan.json").read_text())
    assert [tuple(s) for s in plan["shards"]] == [(0, 0, 10), (0, 10, 20), (0, 20, 24)]
    # CPU actors decode their own batches, with as many model threads as they reserve CPUs (ceil)
    ray_info, model = record["ray"], record["model"]
    assert ray_info["decode"] == "actors" and ray_info["cpus_per_decode_task"] is None
    assert model["num_threads"] == math.ceil(ray_info["cpus_per_actor"])
    assert isinstance(model["actor_cpu"]["flags"], list)  # the CPU flags `auto` was decided on


def test_decode_tasks_give_the_same_results_as_decoding_in_the_actors(full_run, dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "tasks"
    assert cli.main(["run", *_job_args(dataset["manifest"], out, tiny_checkpoint, "decode.placement=tasks",
                                       "embed.num_cpus=1", "decode.num_cpus=0.5")]) == 0
    record = json.loads((out / "_run.json").read_text())
    assert record["ray"]["decode"] == "tasks" and record["ray"]["cpus_per_decode_task"] == 0.5
    assert record["model"]["num_threads"] == 1
    a, b = read_results(full_run["out"]), read_results(out)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    # same pixels either way; only the model's thread count differs (1 vs 2: float sums may reorder)
    np.testing.assert_allclose(embeddings(a, "image_embedding"), embeddings(b, "image_embedding"), atol=1e-6)
    assert a.column("label").to_pylist() == b.column("label").to_pylist()


def test_rerun_of_a_finished_output_rewrites_nothing(full_run, dataset, tiny_checkpoint, capsys):
    out = full_run["out"]
    before = {n: os.stat(out / "results" / n) for n in os.listdir(out / "results")}
    assert cli.main(["run", *_job_args(dataset["manifest"], out, tiny_checkpoint)]) == 0
    assert "nothing to process" in capsys.readouterr().err
    after = {n: os.stat(out / "results" / n) for n in os.listdir(out / "results")}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()}
    assert (out / "_SUCCESS").exists()


def test_different_settings_refuse_the_same_output(full_run, dataset, tiny_checkpoint, capsys):
    out = full_run["out"]
    rc = cli.main(["run", *_job_args(dataset["manifest"], out, tiny_checkpoint), "label.classes=[cat, dog]"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "different plan" in err and "label" in err
    rc = cli.main(["run", *_job_args(dataset["manifest"], out, tiny_checkpoint), "output.shard_size=5"])
    assert rc == 1 and "output.shard_size" in capsys.readouterr().err
    assert (out / "_SUCCESS").exists()  # the finished output is untouched


def test_overwrite_redoes_a_finished_output_with_new_settings(full_run, dataset, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(full_run["out"], out)
    # a mistyped run with overwrite fails its checks before anything is discarded
    assert cli.main(["run", *_job_args(dataset["manifest"], out, "/nonexistent.pt"), "output.overwrite=true"]) == 1
    assert (out / "_SUCCESS").exists() and (out / "_plan.json").exists()
    # settings a plain re-run refuses (another shard size, other classes) are taken with overwrite
    extra = ("output.shard_size=5", "label.classes=[cat, dog]", "output.overwrite=true")
    assert cli.main(["run", *_job_args(dataset["manifest"], out, tiny_checkpoint), *extra]) == 0
    assert "discarded the earlier results" in capsys.readouterr().err
    names = sorted(os.listdir(out / "results"))
    assert names == [f"part-{i:05d}.parquet" for i in range(5)]  # 24 rows in shards of 5
    record = json.loads((out / "_run.json").read_text())
    assert record["counts"]["shards_resumed"] == 0 and record["counts"]["rows_this_run"] == N
    table = read_results(out)
    assert sorted(table.column("id").to_pylist()) == [f"row-{i:03d}" for i in range(N)]
    assert set(table.column("label").to_pylist()) <= {"cat", "dog"}


def test_bytes_images_derived_ids_and_text_only_rows(ray_local, tiny_checkpoint, tiny_encoder, tmp_path):
    """No id column: ids follow the documented rule; a bytes image column is not copied."""
    from clip_core.preprocess import load_image

    blobs = [image_bytes(make_image(100 + i), "PNG") for i in range(6)]
    images = blobs[:4] + [None, None]
    texts = [None, "two", None, "four", "five", "six"]
    folder = tmp_path / "in" / "2024"
    write_manifest(folder / "a.parquet", {"image": images[:3], "text": texts[:3]})
    write_manifest(folder / "b.parquet", {"image": images[3:], "text": texts[3:]})
    out = tmp_path / "out"
    rc = cli.main(["embed", f"input.path={tmp_path / 'in'}", f"output.path={out}", f"model.checkpoint={tiny_checkpoint}",
                   "model.precision=fp32", "output.shard_size=2", "input.max_rows=5"])
    assert rc == 0
    table = read_results(out)
    assert table.column("id").to_pylist() == ["a.parquet:0", "a.parquet:1", "a.parquet:2", "b.parquet:0", "b.parquet:1"]
    assert "image" not in table.column_names  # bytes are not passed through
    assert "label" not in table.column_names and "caption" not in table.column_names  # embed job
    assert table.column("status").to_pylist() == ["ok"] * 5
    img = table.column("image_embedding").to_pylist()
    assert [v is None for v in img] == [False, False, False, False, True]
    txt = table.column("text_embedding").to_pylist()
    assert [v is None for v in txt] == [True, False, True, False, False]
    direct = tiny_encoder.encode_images(torch.stack([tiny_encoder.preprocess(load_image(b)) for b in blobs[:4]]))
    assert cosine_rows(np.array(img[:4], np.float32), direct).min() >= 0.9999
    record = json.loads((out / "_run.json").read_text())
    assert record["counts"]["rows_in"] == 5 and record["stages"]["label"] is False
    assert record["ray"]["embed_batch_size"] == 32  # embed.batch_size=auto with images on CPU actors
    plan = json.loads((out / "_plan.json").read_text())
    assert [i["rel"] for i in plan["inputs"]] == ["a.parquet", "b.parquet"]


def test_index_stage_builds_an_index(full_run, dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["run", *_job_args(dataset["manifest"], out, tiny_checkpoint), "index.enabled=true",
                   "caption.enabled=false"])
    assert rc == 0
    assert (out / "index" / "index.json").exists()
    record = json.loads((out / "_run.json").read_text())
    assert record["index"] and "index_s" in record["timings"]
    # `clip-etl index` rebuilds it from the results alone
    os.remove(out / "index" / "index.json")
    assert cli.main(["index", f"output.path={out}"]) == 0
    assert (out / "index" / "index.json").exists()

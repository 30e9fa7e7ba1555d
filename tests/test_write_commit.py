"""Workers write, the driver commits: pieces, compaction, counts from footers, one encoder per run.

Unit tests of the batch functions (no Ray needed), then the driver-side committer on a local
Ray, then the job: a re-run counts from the footers without reading a row, and a resume whose
resolved model differs is refused.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import ray_local, tiny_checkpoint  # noqa: F401 (fixtures)
from pipeline_fixtures import write_images, write_manifest
from pipelines import cli
from pipelines import storage as pio
from pipelines.etl.commit import ModelMismatchError, ShardCommitter, encoder_identity
from pipelines.etl.embed import ACTOR_INFO_COL
from pipelines.etl.read import ROW_COL, SHARD_COL, Shard
from pipelines.etl.write import (
    FOOTER_KEY,
    PieceWriter,
    assemble_part,
    committed_parts,
    compact_shard,
    contiguous_runs,
    part_name,
)

SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("status", pa.string(), nullable=False),
                    pa.field("error", pa.string())])
ENCODER = {"fingerprint": "abc", "backend": "onnx", "precision": "fp32", "device": "cpu"}


def _rows(shard: int, rows: list[int], *, error_every: int = 0) -> pa.Table:
    status = ["error" if error_every and r % error_every == 0 else "ok" for r in rows]
    return pa.table({
        "id": [f"id{r}" for r in rows], "status": status,
        "error": ["image.corrupt: bad" if s == "error" else None for s in status],
        SHARD_COL: pa.array([shard] * len(rows), pa.int32()), ROW_COL: pa.array(rows, pa.int64()),
        "__t_embed": [0.5] + [0.0] * (len(rows) - 1),
        ACTOR_INFO_COL: [json.dumps(ENCODER)] + [None] * (len(rows) - 1),
    })


def test_contiguous_runs():
    assert contiguous_runs(np.array([3, 4, 5, 9, 10, 12])) == [(0, 3), (3, 5), (5, 6)]
    assert contiguous_runs(np.array([], dtype=np.int64)) == []


def test_piece_names_depend_only_on_rows(tmp_path):
    """A retried task (same rows, any batch order) rewrites the same files, never adds copies."""
    writer = PieceWriter(str(tmp_path / "_pieces"), SCHEMA, ".tmp-run1-")
    batch = pa.concat_tables([_rows(0, [4, 5, 6]), _rows(1, [10, 11]), _rows(0, [8, 9])])
    meta = writer(batch)
    assert sorted(zip(meta.column("shard").to_pylist(), meta.column("start").to_pylist(),
                      meta.column("stop").to_pylist())) == [(0, 4, 7), (0, 8, 10), (1, 10, 12)]
    first = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
    again = writer(batch.take(np.random.default_rng(0).permutation(batch.num_rows)))
    assert sorted(again.column("path").to_pylist()) == sorted(meta.column("path").to_pylist())
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet")) == first
    assert json.loads(meta.column("stage_seconds")[0].as_py())["embed"] == pytest.approx(1.5)
    assert encoder_identity(json.loads(meta.column("encoder")[0].as_py())) == ENCODER
    piece = pq.read_table(meta.column("path")[0].as_py())
    assert piece.column_names == [*SCHEMA.names, ROW_COL]  # no stage-time or actor columns


def test_assemble_part_keeps_one_copy_of_overlapping_pieces_and_refuses_gaps():
    shard = Shard(index=3, file=0, start=10, stop=16)
    pieces = [_rows(3, [12, 13, 14, 15]), _rows(3, [10, 11, 12]), _rows(3, [13])]  # overlaps
    part = assemble_part(pieces, shard, SCHEMA)
    assert part.column("id").to_pylist() == [f"id{r}" for r in range(10, 16)]
    assert part.schema.names == SCHEMA.names
    with pytest.raises(RuntimeError, match="expected rows 10..15"):
        assemble_part([_rows(3, [10, 11]), _rows(3, [13, 14, 15])], shard, SCHEMA)


def test_compaction_writes_counts_into_the_footer(tmp_path):
    pieces_dir = str(tmp_path / "_pieces")
    meta = PieceWriter(pieces_dir, SCHEMA, ".tmp-r-")(_rows(0, list(range(6)), error_every=3))
    part = str(tmp_path / "results" / part_name(0))
    stats = compact_shard(Shard(0, 0, 0, 6), meta.column("path").to_pylist(), part, SCHEMA, pieces_dir,
                          {"encoders": [json.dumps(ENCODER)], "writer_nodes": ["n1"]}, ".tmp-r-")
    assert (stats["rows"], stats["ok"], stats["error"]) == (6, 4, 2)
    assert stats["errors_by_cause"] == {"image.corrupt": 2}
    footer = json.loads(pq.ParquetFile(part).metadata.metadata[FOOTER_KEY])
    assert footer["writer_nodes"] == ["n1"] and footer["error"] == 2
    assert not os.path.exists(os.path.join(pieces_dir, "00000"))  # pieces removed once committed
    assert committed_parts(str(tmp_path / "results"), [Shard(0, 0, 0, 6)])[0]["ok"] == 4
    assert committed_parts(str(tmp_path / "results"), [Shard(0, 0, 0, 7)]) == {}  # wrong row count


def test_committer_commits_covered_shards_and_refuses_a_second_encoder(ray_local, tmp_path):
    results, pieces_dir = str(tmp_path / "results"), str(tmp_path / "_pieces")
    shards = [Shard(0, 0, 0, 4), Shard(1, 0, 4, 8)]
    writer = PieceWriter(pieces_dir, SCHEMA, ".tmp-r-")
    committer = ShardCommitter(results, pieces_dir, shards, SCHEMA, expected_encoder=ENCODER,
                               tmp_prefix=".tmp-r-", log=lambda _: None)
    committer.add(writer(_rows(0, [0, 1])))
    committer.add(writer(pa.concat_tables([_rows(0, [2, 3]), _rows(1, [4, 5, 6])])))
    assert 1 in committer.pending and 0 not in committer.pending  # shard 0 covered, shard 1 not yet
    with pytest.raises(RuntimeError, match="incomplete"):
        committer.finish()
    committer.add(writer(_rows(1, [7])))
    committer.finish()
    assert sorted(committer.committed) == [0, 1] and committer.rows_written == 8
    assert sorted(os.listdir(results)) == [part_name(0), part_name(1)]

    other = ShardCommitter(results, pieces_dir, [Shard(2, 0, 8, 10)], SCHEMA, tmp_prefix=".tmp-r-",
                           expected_encoder={**ENCODER, "precision": "bf16"}, log=lambda _: None)
    with pytest.raises(ModelMismatchError, match="bf16"):
        other.add(writer(_rows(2, [8, 9])))
    assert not os.path.exists(os.path.join(results, part_name(2)))


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_output(ray_local, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("wc")
    paths = write_images(root / "images", 12)
    manifest = write_manifest(root / "manifest.parquet", {"id": [f"r{i}" for i in range(12)],
                                                          "image": [str(p) for p in paths]})
    args = ["run", f"input.path={manifest}", f"output.path={root / 'out'}", f"model.checkpoint={tiny_checkpoint}",
            "model.backend=torch", "model.precision=fp32", "output.shard_size=5", "embed.batch_size=4",
            "label.classes=[red, blue]", "caption.enabled=false", "index.enabled=false"]
    assert cli.main(args) == 0
    return {"args": args, "out": root / "out"}


def test_part_footers_name_the_encoder_and_the_record_the_resolved_model(finished_output):
    record = json.loads((finished_output["out"] / "_run.json").read_text())
    assert {k: record["model"][k] for k in ("backend", "precision", "device")} == \
        {"backend": "torch", "precision": "fp32", "device": "cpu"}
    plan = json.loads((finished_output["out"] / "_plan.json").read_text())
    assert plan["settings"]["model"] == {k: record["model"][k] for k in ("backend", "precision", "device", "fingerprint")}
    for name in sorted(os.listdir(finished_output["out"] / "results")):
        footer = json.loads(pq.ParquetFile(finished_output["out"] / "results" / name).metadata.metadata[FOOTER_KEY])
        assert [json.loads(e)["fingerprint"] for e in footer["encoders"]] == [record["model"]["fingerprint"]]
        assert footer["writer_nodes"]
    assert not (finished_output["out"] / "_pieces").exists()


def test_rerun_counts_from_footers_without_reading_rows(finished_output, monkeypatch, capsys):
    """The driver of a no-op re-run reads footers only: every row-reading helper is disabled."""
    def refuse(*args, **kwargs):
        raise AssertionError("the driver read result rows")

    for name in ("read_parquet", "read_parquet_rows"):
        monkeypatch.setattr(pio, name, refuse)
    assert cli.main(finished_output["args"]) == 0
    record = json.loads((finished_output["out"] / "_run.json").read_text())
    assert record["counts"]["rows_out"] == 12 and record["counts"]["ok"] == 12
    assert record["counts"]["shards_resumed"] == 3 and record["counts"]["rows_this_run"] == 0


def test_resume_with_another_resolved_model_is_refused(finished_output, capsys):
    args = [a for a in finished_output["args"] if not a.startswith("model.backend=")] + ["model.backend=onnx"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "holds results of model" in err and '"backend": "torch"' in err and '"backend": "onnx"' in err

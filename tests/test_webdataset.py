"""WebDataset input: img2dataset-style tar shards, local and on S3, whole, cut short and damaged.

The tars are written here with ``tarfile``; the job's rows are compared with what the tars hold
(ids = keys, texts from txt or json, the chosen image's embedding computed directly), and the
plan's counts with the read's for every way of cutting a tar short.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pipeline_fixtures import ray_local, s3_server, tiny_checkpoint, tiny_encoder  # noqa: F401 (fixtures)
from pipeline_fixtures import cosine_rows, embeddings, image_bytes, make_image, read_results, s3_client, s3_overrides
from pipelines import cli
from pipelines import storage as pio
from pipelines.etl.read import ManifestError, ManifestFile, Shard
from pipelines.etl.webdataset import (
    TAIL_SUFFIX,
    expand_braces,
    find_tars,
    index_tar,
    read_tar,
    split_name,
)

COLUMNS = ["id", "image", "text", "json"]


# --------------------------------------------------------------------------------------------
# Writing tars
# --------------------------------------------------------------------------------------------
def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offsets(data: bytes) -> dict[str, tuple[int, int, int]]:
    """{member name: (offset of its header, offset of its data, offset after its padded data)}."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()}


def img(seed: int, fmt: str = "JPEG") -> bytes:
    return image_bytes(make_image(seed, (45, 37)), fmt)


def meta(key: str, **extra) -> bytes:
    return json.dumps({"key": key, "url": f"http://example.com/{key}.jpg", "status": "success", **extra}).encode()


def plain_samples(prefix: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` img2dataset samples: jpg + txt + json."""
    members = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        members += [(f"{key}.jpg", img(seed + i)), (f"{key}.txt", f"caption {key}".encode()), (f"{key}.json", meta(key))]
    return members


# The dataset: per tar, its members and what each sample's row must be.
#   image: (seed, format) of the image the row must embed, or None; text: the row's text or None;
#   error: the cause the row's error must name, or None for an ok row.
SAMPLES = {
    "00000.tar": [
        ("000000000", [("jpg", 1), ("txt", "a red thing"), ("json", {"caption": "ignored: txt wins"})],
         {"image": (1, "JPEG"), "text": "a red thing", "error": None}),
        ("000000001", [("png", 2), ("txt", "a png thing"), ("json", {})],
         {"image": (2, "PNG"), "text": "a png thing", "error": None}),
        ("000000002", [("webp", 3), ("json", {"caption": "a webp caption"})],
         {"image": (3, "WEBP"), "text": "a webp caption", "error": None}),
        ("000000003", [("png", 4), ("jpg", 5), ("txt", "two images")],  # jpg beats png
         {"image": (5, "JPEG"), "text": "two images", "error": None}),
    ],
    "00001.tar": [
        ("000010000", [("txt", "only a text")], {"image": None, "text": "only a text", "error": None}),
        ("000010001", [("json", {"text": "text from json"})], {"image": None, "text": "text from json", "error": None}),
        ("000010002", [("json", {"width": 3})], {"image": None, "text": None, "error": "row.no_input"}),
        ("000010003", [("jpeg", 6), ("cls", b"7")], {"image": (6, "JPEG"), "text": None, "error": None}),
    ],
    "00002.tar": [
        (f"part/00002{i:04d}", [("jpg", 20 + i), ("txt", f"folder sample {i}"), ("json", {})],
         {"image": (20 + i, "JPEG"), "text": f"folder sample {i}", "error": None}) for i in range(3)
    ],
}
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def sample_members(key: str, parts) -> list[tuple[str, bytes]]:
    out = []
    for ext, value in parts:
        if ext in FORMATS:
            data = img(value, FORMATS[ext])
        elif ext == "json":
            data = meta(key.rsplit("/", 1)[-1], **value)
        else:
            data = value if isinstance(value, bytes) else value.encode()
        out.append((f"{key}.{ext}", data))
    return out


def write_dataset(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    tars = {name: tar_bytes([m for key, parts, _ in samples for m in sample_members(key, parts)])
            for name, samples in SAMPLES.items()}
    tars["00003.tar"] = tar_bytes(plain_samples("00003", 2, 40))  # not in the first pattern
    for name, data in tars.items():
        (folder / name).write_bytes(data)
    return tars


def expected_rows() -> dict[str, dict]:
    return {key: want for samples in SAMPLES.values() for key, _, want in samples}


# --------------------------------------------------------------------------------------------
# Unit tests: names, patterns, and plan == read for every cut
# --------------------------------------------------------------------------------------------
def test_brace_patterns_expand_like_bash():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{8..11}.tar") == ["8.tar", "9.tar", "10.tar", "11.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]
    assert expand_braces("{only}.tar") == ["{only}.tar"] and expand_braces("plain.tar") == ["plain.tar"]


def test_member_names_split_into_key_and_extension_as_webdataset_does():
    assert split_name("dir/000001.jpg") == ("dir/000001", "jpg")
    assert split_name("000001.seg.PNG") == ("000001", "seg.png")  # the key ends at the first dot
    assert split_name("a/b.c/d.txt") == ("a/b.c/d", "txt")
    assert split_name("noext") is None and split_name("dir/.hidden.jpg") is None


def test_find_tars_reads_patterns_globs_and_folders(tmp_path):
    write_dataset(tmp_path / "shards")
    names = [f"{tmp_path}/shards/0000{i}.tar" for i in range(4)]
    assert find_tars(f"{tmp_path}/shards/{{00000..00002}}.tar") == names[:3]
    assert find_tars(f"{tmp_path}/shards/*.tar") == names
    assert find_tars(str(tmp_path / "shards")) == names
    assert find_tars(f"{tmp_path}/shards/{{00003,00001}}.tar") == [names[3], names[1]]
    with pytest.raises(ManifestError, match="no .tar files found"):
        find_tars(f"{tmp_path}/shards/{{00010..00012}}.tar")
    with pytest.raises(ManifestError, match=r"1 tar\(s\) named by .* do not exist, e.g. .*00004.tar"):
        find_tars(f"{tmp_path}/shards/{{00002..00004}}.tar")


def _plan_and_read(path: Path, rel: str = "t.tar"):
    summary, *buckets = index_tar(str(path), rel, True)
    file = ManifestFile(str(path), rel, summary["num_rows"], summary["size"], summary["etag"],
                        fingerprint=summary["fingerprint"])
    rows = pa.concat_tables(list(read_tar(Shard(0, 0, 0, file.num_rows), file, COLUMNS)))
    planned_ids = sorted(v for b in buckets for v in b.to_pylist())
    return summary, planned_ids, rows


def test_plan_and_read_count_the_same_rows_wherever_a_tar_is_cut(tmp_path):
    """Every cut of a tar (inside headers, inside data, at boundaries, in the end marker): the
    index task's count and ids equal the rows the read yields, each sample once, plus one tail
    row exactly when the cut lost the end-of-archive marker."""
    data = tar_bytes(plain_samples("k", 3, 0))
    end_marker = max(end for _, _, end in member_offsets(data).values())  # where the first zero block starts
    path = tmp_path / "t.tar"
    for cut in sorted({*range(0, len(data), 97), *range(0, len(data), 512), len(data)}):
        path.write_bytes(data[:cut])
        summary, planned_ids, rows = _plan_and_read(path)
        ids = rows.column("id").to_pylist()
        assert rows.num_rows == summary["num_rows"] and sorted(ids) == planned_ids, cut
        assert rows.column("__row").to_pylist() == list(range(rows.num_rows))
        tail = [e for i, e in zip(ids, rows.column("__read_error").to_pylist()) if i == "t.tar" + TAIL_SUFFIX]
        if cut >= end_marker + 512:  # a whole zero block: the archive ends properly
            assert tail == [], cut
        else:
            assert len(tail) == 1 and tail[0].startswith(("row.truncated_tar:", "row.corrupt_tar:")), (cut, tail)


def test_a_tar_that_changed_after_planning_fails_its_read(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(tar_bytes(plain_samples("k", 2, 0)))
    summary, *_ = index_tar(str(path), "t.tar", False)
    file = ManifestFile(str(path), "t.tar", summary["num_rows"], summary["size"], fingerprint=summary["fingerprint"])
    path.write_bytes(tar_bytes(plain_samples("j", 2, 0)))  # same count, other keys
    with pytest.raises(IOError, match="tar changed since the plan"):
        list(read_tar(Shard(0, 0, 0, 2), file, COLUMNS))


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
e2e = pytest.mark.e2e


def _args(pattern: str, out: Path, checkpoint: str, *extra: str) -> list[str]:
    return ["run", f"input.path={pattern}", "input.format=webdataset", f"output.path={out}",
            f"model.checkpoint={checkpoint}", "model.precision=fp32", "embed.batch_size=8", "decode.batch_size=8",
            "label.enabled=false", "index.enabled=false", *extra]


def _run_record(out) -> dict:
    return json.loads((Path(out) / "_run.json").read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    return {"root": root, "tars": write_dataset(root / "shards")}


@pytest.fixture(scope="module")
def local_run(ray_local, dataset, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "job"
    pattern = f"{dataset['root']}/shards/{{00000..00002}}.tar"
    first = cli.main(_args(pattern, out, tiny_checkpoint))
    record = _run_record(out) if first == 0 else None
    second = cli.main(_args(pattern, out, tiny_checkpoint))  # the same plan: resumes, does nothing
    return {"rc": (first, second), "out": out, "pattern": pattern, "first": record, "second": _run_record(out)}


@e2e
def test_every_sample_is_one_row_with_its_key_image_and_text(local_run, tiny_encoder):
    from clip_core.preprocess import load_image

    assert local_run["rc"] == (0, 0)
    table = read_results(local_run["out"])
    want = expected_rows()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(want) and len(set(ids)) == len(ids)
    rows = {r["id"]: r for r in table.to_pylist()}
    for key, w in want.items():
        row = rows[key]
        assert row["text"] == w["text"], key
        assert (row["status"], (row["error"] or "").split(":")[0] or None) == (
            "error" if w["error"] else "ok", w["error"]), key
        assert (row["image_embedding"] is None) == (w["image"] is None), key
        assert (row["text_embedding"] is None) == (w["text"] is None), key
    assert json.loads(rows["000000002"]["json"])["caption"] == "a webp caption"  # the json passes through
    assert rows["000010000"]["json"] is None
    with_image = [k for k, w in want.items() if w["image"]]
    direct = tiny_encoder.encode_images(torch.stack(
        [tiny_encoder.preprocess(load_image(img(*want[k]["image"]))) for k in with_image]))
    got = embeddings(table.take([ids.index(k) for k in with_image]), "image_embedding")
    assert cosine_rows(got, direct).min() >= 0.999  # jpg beats png; png and webp decode as bytes


@e2e
def test_run_record_counts_and_a_second_run_processes_nothing(local_run):
    first, second = local_run["first"], local_run["second"]
    n = len(expected_rows())
    assert first["counts"]["rows_in"] == first["counts"]["rows_out"] == n
    assert first["counts"]["shards"] == 3 and first["counts"]["shards_this_run"] == 3
    assert first["counts"]["errors_by_cause"] == {"row.no_input": 1}
    assert second["counts"]["shards_resumed"] == 3 and second["counts"]["shards_this_run"] == 0
    assert second["counts"]["rows_this_run"] == 0 and second["counts"]["rows_out"] == n
    plan = json.loads((local_run["out"] / "_plan.json").read_text())
    assert plan["format"] == "webdataset" and [i["rel"] for i in plan["inputs"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(len(i["fingerprint"]) == 32 for i in plan["inputs"])


@e2e
def test_a_resume_over_another_set_of_tars_is_refused(local_run, tiny_checkpoint, capsys):
    pattern = local_run["pattern"].replace("00002}", "00003}")
    rc = cli.main(_args(pattern, local_run["out"], tiny_checkpoint))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert "was started with a different plan (the set of manifest files changed)" in err[-1]
    assert err[-1].startswith("clip-etl: error: ")


def test_patterns_that_match_nothing_are_one_line_job_errors(dataset, tmp_path, capsys):
    for pattern, message in ((f"{dataset['root']}/shards/{{00010..00011}}.tar", "no .tar files found at"),
                             (f"{dataset['root']}/nowhere/*.tar", "no .tar files found at"),
                             (f"{dataset['root']}/shards/{{00002..00005}}.tar", "2 tar(s) named by")):
        rc = cli.main(_args(pattern, tmp_path / "out", "demo"))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and message in err[0], err


def damaged_tars(folder: Path) -> dict[str, dict]:
    """Tars cut or damaged in different ways, and the rows each must give: {key: error cause}."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    whole = tar_bytes(plain_samples("a", 4, 60))
    header, data_at, _ = member_offsets(whole)["a0002.jpg"]
    (folder / "cut_in_image.tar").write_bytes(whole[:data_at + 100])  # inside a0002.jpg's data
    out["cut_in_image.tar"] = {"a0000": None, "a0001": None, "a0002": "image.truncated_tar",
                               "cut_in_image.tar#tail": "row.truncated_tar"}
    whole = tar_bytes(plain_samples("b", 4, 70))
    header, _, _ = member_offsets(whole)["b0002.jpg"]
    (folder / "cut_at_header.tar").write_bytes(whole[:header])  # right before b0002.jpg's header
    out["cut_at_header.tar"] = {"b0000": None, "b0001": None, "cut_at_header.tar#tail": "row.truncated_tar"}
    whole = bytearray(tar_bytes(plain_samples("c", 4, 80)))
    header, _, _ = member_offsets(bytes(whole))["c0002.jpg"]
    whole[header:header + 512] = b"\x7fgarbage" * 64  # a damaged header in the middle
    (folder / "garbage_header.tar").write_bytes(bytes(whole))
    out["garbage_header.tar"] = {"c0000": None, "c0001": None, "garbage_header.tar#tail": "row.corrupt_tar"}
    (folder / "not_a_tar.tar").write_bytes(b"this is not a tar archive\n" * 40)
    out["not_a_tar.tar"] = {"not_a_tar.tar#tail": "row.corrupt_tar"}
    return out


@e2e
def test_cut_and_damaged_tars_give_error_rows_not_a_failed_job(ray_local, tiny_checkpoint, tmp_path):
    want = {k: v for rows in damaged_tars(tmp_path / "bad").values() for k, v in rows.items()}
    out = tmp_path / "out"
    assert cli.main(_args(f"{tmp_path}/bad/*.tar", out, tiny_checkpoint)) == 0
    table = read_results(out)
    got = {r["id"]: (r["error"] or "").split(":")[0] or None for r in table.to_pylist()}
    assert got == want
    counts = _run_record(out)["counts"]
    assert counts["rows_in"] == counts["rows_out"] == len(want) and counts["shards"] == 4
    assert counts["errors_by_cause"] == {"image.truncated_tar": 1, "row.corrupt_tar": 2, "row.truncated_tar": 2}
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    assert ok.num_rows == 6 and ok.column("image_embedding").null_count == 0


@e2e
def test_tars_on_s3_give_the_same_rows(local_run, dataset, s3_server, tiny_checkpoint):
    client = s3_client(s3_server)
    client.create_bucket(Bucket="wds")
    for name, data in dataset["tars"].items():
        client.put_object(Bucket="wds", Key=f"shards/{name}", Body=data)
    out = "s3://wds/out"
    assert cli.main(_args("s3://wds/shards/{00000..00002}.tar", out, tiny_checkpoint, *s3_overrides(s3_server))) == 0
    opts = pio.S3Options(endpoint_url=s3_server, access_key_id="testing", secret_access_key="testing",
                         region="us-east-1")
    remote = read_results(out, opts).sort_by("id")
    local = read_results(local_run["out"]).sort_by("id")
    assert remote.column("id").to_pylist() == local.column("id").to_pylist()
    assert remote.column("status").to_pylist() == local.column("status").to_pylist()
    a, b = remote.column("image_embedding").to_pylist(), local.column("image_embedding").to_pylist()
    assert [x is None for x in a] == [x is None for x in b]
    np.testing.assert_allclose(np.array([x for x in a if x]), np.array([x for x in b if x]), atol=1e-5)
    record = json.loads(client.get_object(Bucket="wds", Key="out/_run.json")["Body"].read())
    assert record["counts"]["rows_out"] == len(expected_rows()) and record["counts"]["shards"] == 3


def test_input_format_is_validated():
    from pipelines.config import ConfigError, load_config

    assert load_config(overrides=["input.format=webdataset"]).input.format == "webdataset"
    assert load_config().input.format == "parquet"
    with pytest.raises(ConfigError, match="'input.format' must be one of parquet, webdataset; got 'tar'"):
        load_config(overrides=["input.format=tar"])


def test_a_tar_that_grew_after_planning_fails_its_read_and_max_rows_reads_a_prefix(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(tar_bytes(plain_samples("k", 2, 0)))
    summary, *_ = index_tar(str(path), "t.tar", False)
    file = ManifestFile(str(path), "t.tar", summary["num_rows"], summary["size"], fingerprint=summary["fingerprint"])
    prefix = pa.concat_tables(list(read_tar(Shard(0, 0, 0, 1), file, COLUMNS)))  # a max_rows shard
    assert prefix.column("id").to_pylist() == ["k0000"]
    path.write_bytes(tar_bytes(plain_samples("k", 3, 0)))  # the same first keys, one more sample
    with pytest.raises(IOError, match="tar changed since the plan"):
        list(read_tar(Shard(0, 0, 0, 2), file, COLUMNS))

"""``clip-etl manifest``: a folder of images (local or S3) -> a manifest the pipeline reads as is."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import ray_local, s3_server, tiny_checkpoint  # noqa: F401 (fixtures)
from pipeline_fixtures import S3_KEYS, image_bytes, make_image, read_results, s3_client
from pipelines import cli
from pipelines import manifest as mf

# relative path -> (image size or None for a corrupt file, caption file text or None)
IMAGES = {
    "cat.jpg": ((40, 30), " a cat on a mat \n"),
    "cat.k.png": ((12, 10), None),  # sorts between cat.jpg and cat.txt
    "cat.v2.jpg": ((10, 10), None),  # sorts between cat.txt and cat.webp
    "cat.webp": ((16, 9), None),  # sorts after cat.txt: gets the caption listed before it
    "2024/01/dog.PNG": ((33, 21), "a dog, caf\u00e9 au lait"),
    "2024/01/broken.jpg": (None, "still listed"),
    "2024/blank.gif": ((8, 8), "  \n"),  # a blank caption is no caption
    "2024-extra/bird.tiff": ((7, 5), None),
    "z/deep/er/fish.bmp": ((3, 4), "fish"),
    "z/big.png": ((640, 480), None),  # larger than the 64 KiB an S3 size probe reads
}
CAPTIONS = {
    "cat.jpg": "a cat on a mat", "cat.k.png": None, "cat.v2.jpg": None, "cat.webp": "a cat on a mat",
    "2024/01/dog.PNG": "a dog, caf\u00e9 au lait", "2024/01/broken.jpg": "still listed",
    "2024/blank.gif": None, "2024-extra/bird.tiff": None, "z/deep/er/fish.bmp": "fish", "z/big.png": None,
}
NOT_IMAGES = {"readme.md": b"# not an image", "2024/01/notes.txt": b"a caption without an image",
              "z/data.parquet": b"PAR1", ".hidden.jpg": b"hidden", ".cache/x.jpg": b"hidden folder"}
EXPECTED_IDS = sorted(IMAGES)  # lexicographic order of the relative paths


def _formats(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    return {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF", ".tiff": "TIFF", ".bmp": "BMP"}[ext]


def tree_files() -> dict[str, bytes]:
    """Every file of the test tree, relative path -> bytes."""
    files = dict(NOT_IMAGES)
    for i, (name, (size, caption)) in enumerate(IMAGES.items()):
        files[name] = b"\xff\xd8 not really a jpeg" if size is None else image_bytes(
            make_image(i, size), _formats(name))
        if caption is not None:
            files[os.path.splitext(name)[0] + ".txt"] = caption.encode("utf-8")
    return files


def write_tree(root: Path, order=None) -> Path:
    files = tree_files()
    for name in order or files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "photos")


def _build(*args: str) -> int:
    return cli.main(["manifest", *args])


def test_local_folder_becomes_a_manifest(tree, tmp_path, capsys):
    out = tmp_path / "manifest.parquet"
    assert _build(str(tree), "-o", str(out)) == 0
    table = pq.read_table(out)
    assert table.schema == mf.SCHEMA
    rows = {r["id"]: r for r in table.to_pylist()}
    assert table.column("id").to_pylist() == EXPECTED_IDS  # non-images, hidden names left out
    files = tree_files()
    for rid, (size, _) in IMAGES.items():
        row = rows[rid]
        assert row["image"] == str(tree / rid) and os.path.isabs(row["image"])
        assert row["text"] == CAPTIONS[rid], rid
        assert (row["width"], row["height"]) == (size if size else (None, None)), rid
        assert row["bytes"] == len(files[rid])
    err = capsys.readouterr().err
    assert "wrote 10 images (5 with captions, 1 without a readable header" in err
    assert "\r" not in err  # stderr is not a terminal here: no progress line


def test_progress_on_a_terminal_and_quiet(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert _build(str(tree), "-o", str(tmp_path / "a.parquet"), "--batch-rows", "4") == 0
    lines = capsys.readouterr().err.split("\n")
    assert lines[0].startswith("\r[manifest] 4 images, ") and "\r[manifest] 10 images, 5 with captions" in lines[0]
    assert lines[1].startswith("[manifest] wrote 10 images") and lines[2:] == [""]
    assert _build(str(tree), "-o", str(tmp_path / "b.parquet"), "--quiet") == 0
    assert capsys.readouterr().err == ""


def test_the_command_is_registered(capsys):
    assert cli.main(["manifest", "--help"]) == 0
    assert "--probe-size" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert "manifest" in capsys.readouterr().out


def test_ids_do_not_depend_on_listing_order(tmp_path, monkeypatch):
    """Two builds of one folder, and a build of a copy written in another order and listed by a
    filesystem that returns entries backwards, give the same rows in the same order."""
    first = write_tree(tmp_path / "a")
    mf.build_manifest(str(first), str(tmp_path / "1.parquet"))
    mf.build_manifest(str(first), str(tmp_path / "2.parquet"))
    second = write_tree(tmp_path / "b", order=sorted(tree_files(), reverse=True))
    real_scandir = os.scandir

    class Backwards:
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = sorted(it, key=lambda e: e.name, reverse=True)

        def __iter__(self):
            return iter(self.entries)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(mf.os, "scandir", Backwards)
    mf.build_manifest(str(second), str(tmp_path / "3.parquet"))
    t1, t2, t3 = (pq.read_table(tmp_path / f"{i}.parquet") for i in (1, 2, 3))
    assert t1.equals(t2)
    assert t3.column("id").to_pylist() == t1.column("id").to_pylist() == EXPECTED_IDS
    assert t3.drop_columns(["image"]).equals(t1.drop_columns(["image"]))


def test_existing_output_needs_force(tree, tmp_path, capsys):
    out = tmp_path / "manifest.parquet"
    out.write_bytes(b"someone else's file")
    assert _build(str(tree), "-o", str(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clip-etl: error: {out} already exists; pass --force to replace it"]
    assert out.read_bytes() == b"someone else's file"
    assert _build(str(tree), "-o", str(out), "--force", "--quiet") == 0
    assert capsys.readouterr().err == ""
    assert pq.read_table(out).num_rows == len(IMAGES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.parquet", "photos"]  # no temp file left


def test_a_folder_without_images_writes_nothing(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no images here")
    out = tmp_path / "manifest.parquet"
    assert _build(str(tmp_path / "src"), "-o", str(out)) == 1
    assert "no images under" in capsys.readouterr().err
    assert _build(str(tmp_path / "nope"), "-o", str(out)) == 1
    assert "not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_row_groups_and_no_probe(tree, tmp_path):
    out = tmp_path / "m.parquet"
    summary = mf.build_manifest(str(tree), str(out), probe_size=False, batch_rows=4)
    assert summary.rows == len(IMAGES) and summary.unreadable == 0
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    table = pq.read_table(out)
    assert table.column("width").null_count == len(IMAGES)  # not probed
    assert table.column("text").to_pylist() == [CAPTIONS[k] for k in EXPECTED_IDS]


def test_captions_are_paired_from_an_endless_sorted_listing():
    """Pairing holds only a window of keys: it yields from a listing that never ends."""

    def endless():
        for i in itertools.count():
            stem = f"img{i:09d}"
            yield mf.Listed(f"{stem}.jpg", f"/x/{stem}.jpg", 1)
            if i % 2 == 0:
                yield mf.Listed(f"{stem}.txt", f"/x/{stem}.txt", 1)

    pairs = list(itertools.islice(mf.pair_captions(endless()), 1000))
    assert [p[0].key for p in pairs[:2]] == ["img000000000.jpg", "img000000001.jpg"]
    assert [p[1].key if p[1] else None for p in pairs[:3]] == ["img000000000.txt", None, "img000000002.txt"]
    assert len(pairs) == 1000


def test_an_unsorted_listing_is_refused():
    listing = [mf.Listed("b.jpg", "/b.jpg", 1), mf.Listed("a.jpg", "/a.jpg", 1)]
    with pytest.raises(mf.ManifestBuildError, match="not sorted"):
        list(mf.pair_captions(listing))


# --------------------------------------------------------------------------------------------
# S3 (moto's server on loopback)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def s3_tree(s3_server, monkeypatch):
    """The same tree under s3://photos/in/, credentials in the environment as a user would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEYS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEYS["secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_KEYS["region"])
    client = s3_client(s3_server)
    if "photos" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="photos")
        for name, data in tree_files().items():
            client.put_object(Bucket="photos", Key=f"in/{name}", Body=data)
        client.put_object(Bucket="photos", Key="in-other/ignored.jpg", Body=b"outside the prefix")
    return {"endpoint": s3_server, "client": client}


@pytest.mark.e2e
def test_s3_prefix_becomes_the_same_manifest(s3_tree, tree, tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "LIST_PAGE_KEYS", 4)  # several ListObjectsV2 pages
    endpoint = s3_tree["endpoint"]
    local = tmp_path / "local.parquet"
    assert _build(str(tree), "-o", str(local)) == 0
    out = "s3://photos/manifests/photos.parquet"
    assert _build("s3://photos/in", "-o", out, "--s3-endpoint-url", endpoint, "--probe-size", "--threads", "4") == 0
    body = s3_tree["client"].get_object(Bucket="photos", Key="manifests/photos.parquet")["Body"].read()
    remote = pq.read_table(pa.BufferReader(body))
    assert remote.column("image").to_pylist() == [f"s3://photos/in/{k}" for k in EXPECTED_IDS]
    # same ids, captions, sizes (from 64 KiB ranged GETs) and byte counts as the local copy
    assert remote.drop_columns(["image"]).equals(pq.read_table(local).drop_columns(["image"]))

    # sizes are not probed on S3 by default; an existing S3 output is kept without --force
    assert _build("s3://photos/in/", "-o", out, "--s3-endpoint-url", endpoint) == 1
    assert _build("s3://photos/in/", "-o", out, "--s3-endpoint-url", endpoint, "--force") == 0
    body = s3_tree["client"].get_object(Bucket="photos", Key="manifests/photos.parquet")["Body"].read()
    unprobed = pq.read_table(pa.BufferReader(body))
    assert unprobed.column("width").null_count == len(IMAGES)
    assert unprobed.drop_columns(["width", "height"]).equals(remote.drop_columns(["width", "height"]))


# --------------------------------------------------------------------------------------------
# The manifest feeds a real run
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_the_pipeline_runs_on_a_built_manifest(ray_local, tree, tmp_path, tiny_checkpoint):
    manifest = tmp_path / "manifest.parquet"
    assert _build(str(tree), "-o", str(manifest)) == 0
    out = tmp_path / "job"
    rc = cli.main(["run", f"input.path={manifest}", f"output.path={out}", f"model.checkpoint={tiny_checkpoint}",
                   "model.backend=torch", "model.precision=fp32", "label.classes=[cat, dog]", "index.enabled=false",
                   "caption.enabled=false", "embed.batch_size=4"])
    assert rc == 0
    rows = {r["id"]: r for r in read_results(out).to_pylist()}
    assert sorted(rows) == EXPECTED_IDS
    assert rows["2024/01/broken.jpg"]["status"] == "error"
    assert rows["2024/01/broken.jpg"]["error"].startswith("image.")
    ok = [rid for rid in EXPECTED_IDS if rid != "2024/01/broken.jpg"]
    assert all(rows[rid]["status"] == "ok" and rows[rid]["image_embedding"] is not None for rid in ok)
    assert rows["cat.jpg"]["text_embedding"] is not None and rows["cat.k.png"]["text_embedding"] is None
    assert rows["cat.jpg"]["width"] == 40 and rows["cat.jpg"]["bytes"] > 0  # manifest columns pass through

"""S3 in and out, over the real S3 protocol: a moto server on loopback holds the manifest, the
images and the class list, and receives the results."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline_fixtures import ray_local, s3_server, tiny_checkpoint, tiny_encoder  # noqa: F401 (fixtures)
from pipeline_fixtures import cosine_rows, embeddings, image_bytes, make_image, s3_client, s3_overrides
from pipeline_fixtures import s3_put_parquet, s3_read_parquet
from pipelines import cli
from pipelines import storage as pio

pytestmark = pytest.mark.e2e
N = 12


@pytest.fixture(scope="module")
def bucket(s3_server):
    client = s3_client(s3_server)
    client.create_bucket(Bucket="data")
    client.create_bucket(Bucket="results")
    blobs = {}
    for i in range(N):
        key = f"in/images/{i:02d}.png"
        blobs[i] = image_bytes(make_image(50 + i), "PNG")
        client.put_object(Bucket="data", Key=key, Body=blobs[i])
    # absolute s3:// URIs, paths relative to the manifest, and one missing object
    images = [f"s3://data/in/images/{i:02d}.png" if i % 2 else f"images/{i:02d}.png" for i in range(N)]
    images[-1] = "s3://data/in/images/nope.png"
    table = pa.table({"id": list(range(N)), "image": images, "text": [f"text {i}" for i in range(N)]})
    s3_put_parquet(client, "data", "in/manifest.parquet", table)
    client.put_object(Bucket="data", Key="classes.txt", Body=b"# shapes\nred square\nblue circle\n\ngreen star\n")
    return {"client": client, "endpoint": s3_server, "blobs": blobs}


def test_io_roundtrip_against_s3(bucket):
    opts = pio.S3Options(endpoint_url=bucket["endpoint"], access_key_id="testing", secret_access_key="testing",
                         region="us-east-1")
    pio.write_json_atomic("s3://results/t/x.json", {"a": 1}, opts)
    assert pio.read_json("s3://results/t/x.json", opts) == {"a": 1}
    assert pio.list_files("s3://data/in", suffix=".parquet", s3=opts) == ["s3://data/in/manifest.parquet"]
    assert pio.parquet_metadata("s3://data/in/manifest.parquet", opts)[0] == N
    t = pio.read_parquet_rows("s3://data/in/manifest.parquet", 3, 7, ["id"], opts)
    assert t.column("id").to_pylist() == [3, 4, 5, 6]


def test_fetch_to_local_files_and_folders(bucket, tmp_path, monkeypatch):
    """One S3-to-local copy for checkpoints, index files and prompt files: a file or a folder,
    published whole under ``dest``; a second fetch of a published folder is harmless."""
    from pipelines.etl.embed import localize_checkpoint

    opts = pio.S3Options(endpoint_url=bucket["endpoint"], access_key_id="testing", secret_access_key="testing",
                         region="us-east-1")
    client = bucket["client"]
    client.put_object(Bucket="data", Key="ckpt/config.json", Body=b"{}")
    client.put_object(Bucket="data", Key="ckpt/sub/weights.bin", Body=b"w" * 100)
    got = pio.fetch_to_local("s3://data/classes.txt", str(tmp_path / "a" / "classes.txt"), opts)
    assert got == str(tmp_path / "a" / "classes.txt") and open(got, "rb").read().startswith(b"# shapes")
    folder = str(tmp_path / "b" / "ckpt")
    for _ in range(2):  # the second publishes onto an existing folder: kept, the copy dropped
        assert pio.fetch_to_local("s3://data/ckpt", folder, opts) == folder
        assert open(f"{folder}/sub/weights.bin", "rb").read() == b"w" * 100
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt"]  # no temporary left behind
    with pytest.raises(FileNotFoundError):
        pio.fetch_to_local("s3://data/nope.txt", str(tmp_path / "c" / "nope.txt"), opts)
    assert not (tmp_path / "c" / "nope.txt").exists() and not list((tmp_path / "c").iterdir())

    monkeypatch.setenv("CLIP_ETL_CACHE_DIR", str(tmp_path / "cache"))
    local = localize_checkpoint("s3://data/ckpt/", opts)
    assert local.startswith(str(tmp_path / "cache" / "models")) and local.endswith("/ckpt")
    assert open(f"{local}/config.json").read() == "{}" and localize_checkpoint("s3://data/ckpt/", opts) == local


def test_s3_manifest_images_and_output(ray_local, bucket, tiny_checkpoint, tiny_encoder):
    from clip_core.preprocess import load_image

    rc = cli.main(["run", "input.path=s3://data/in/manifest.parquet", "output.path=s3://results/job",
                   f"model.checkpoint={tiny_checkpoint}", "model.precision=fp32", "output.shard_size=5",
                   "embed.batch_size=4", "label.classes=s3://data/classes.txt", "index.enabled=false",
                   *s3_overrides(bucket["endpoint"])])
    assert rc == 0
    client = bucket["client"]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="results", Prefix="job/")["Contents"])
    assert keys == ["job/_SUCCESS", "job/_plan.json", "job/_run.json", "job/report.html",
                    "job/results/part-00000.parquet",
                    "job/results/part-00001.parquet", "job/results/part-00002.parquet"]
    parts = [s3_read_parquet(client, "results", k) for k in keys if k.endswith(".parquet")]
    table = pa.concat_tables(parts)
    assert table.column("id").to_pylist() == list(range(N))
    status = table.column("status").to_pylist()
    assert status == ["ok"] * (N - 1) + ["error"]
    assert table.column("error")[N - 1].as_py().startswith("image.missing_file: no such file: s3://data/in/images/nope.png")
    direct = tiny_encoder.encode_images(torch.stack(
        [tiny_encoder.preprocess(load_image(bucket["blobs"][i])) for i in range(N - 1)]))
    got = embeddings(table.slice(0, N - 1), "image_embedding")
    assert cosine_rows(got, direct).min() >= 0.9999
    assert set(table.column("label").to_pylist()[: N - 1]) <= {"red square", "blue circle", "green star"}
    record = json.loads(client.get_object(Bucket="results", Key="job/_run.json")["Body"].read())
    assert record["counts"]["errors_by_cause"] == {"image.missing_file": 1}
    assert record["config"]["s3"]["secret_access_key"] == "<redacted>"  # no credentials in outputs

    # the finished output on S3 is recognised on re-run: nothing is rewritten
    before = {k: client.head_object(Bucket="results", Key=k)["ETag"] for k in keys if k.endswith(".parquet")}
    rc = cli.main(["run", "input.path=s3://data/in/manifest.parquet", "output.path=s3://results/job",
                   f"model.checkpoint={tiny_checkpoint}", "model.precision=fp32", "output.shard_size=5",
                   "embed.batch_size=4", "label.classes=s3://data/classes.txt", "index.enabled=false",
                   *s3_overrides(bucket["endpoint"])])
    assert rc == 0
    after = {k: client.head_object(Bucket="results", Key=k)["ETag"] for k in before}
    assert before == after


def test_s3_errors_are_one_line(bucket, tiny_checkpoint, capsys):
    rc = cli.main(["run", "input.path=s3://data/in/missing.parquet", "output.path=s3://results/x",
                   f"model.checkpoint={tiny_checkpoint}", *s3_overrides(bucket["endpoint"])])
    assert rc == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clip-etl: error:")]
    assert len(err) == 1 and "s3://data/in/missing.parquet" in err[0]


def test_a_live_lease_on_s3_refuses_a_second_run(ray_local, bucket, tiny_checkpoint, capsys):
    """The lease is a conditional PUT on S3: a run into an output another run holds fails at
    once naming the holder; when the holder stops heartbeating, the lease expires and a run goes in."""
    from pipelines.etl.lease import OutputLease

    opts = pio.S3Options(endpoint_url=bucket["endpoint"], access_key_id="testing", secret_access_key="testing",
                         region="us-east-1")
    out = "s3://results/leased"
    holder = OutputLease(out, opts, timeout_s=3, run_id="other-run").acquire()  # no heartbeat: as if killed
    args = ["run", "input.path=s3://data/in/manifest.parquet", f"output.path={out}",
            f"model.checkpoint={tiny_checkpoint}", "model.backend=torch", "model.precision=fp32",
            "label.classes=[a, b]", "index.enabled=false", "output.lease_timeout_s=3",
            *s3_overrides(bucket["endpoint"])]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "output is in use by run 'other-run'" in err and "_lease.json" in err
    time.sleep(3.5)
    assert cli.main(args) == 0
    assert holder.path == "s3://results/leased/_lease.json" and not pio.exists(holder.path, opts)


SECRETS = {"access_key_id": "AKIACLIPETLTEST7Q", "secret_access_key": "cl1p-etl-S3CR3T-9zQ",
           "session_token": "cl1p-etl-T0KEN-4xW"}


def _secret_overrides(endpoint: str) -> list[str]:
    return [f"s3.endpoint_url={endpoint}", "s3.region=us-east-1"] + [f"s3.{k}={v}" for k, v in SECRETS.items()]


def _leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


def test_credentials_appear_in_no_output_log_config_or_error(bucket, tiny_checkpoint, tmp_path):
    """Credentials given as config (the least safe way) are used, and never written back: not in
    any output object, the job's stdout/stderr, Ray's own logs, --print-config, a repr or an error."""
    import shutil
    import tempfile

    from pipeline_fixtures import run_cli
    from pipelines.config import load_config

    args = ["run", "input.path=s3://data/in/manifest.parquet", "output.path=s3://results/secrets",
            f"model.checkpoint={tiny_checkpoint}", "model.precision=fp32", "output.shard_size=5",
            "label.classes=s3://data/classes.txt", *_secret_overrides(bucket["endpoint"])]
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray puts sockets under it
    try:
        proc = run_cli(args, timeout=600, RAY_TMPDIR=ray_tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not _leaks(proc.stdout + proc.stderr)
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".json")]
        assert logs, "Ray wrote no logs where expected"
        assert not [str(p) for p in logs if _leaks(p.read_text(errors="replace"))]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    client = bucket["client"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="results", Prefix="secrets/")["Contents"]]
    assert "secrets/_SUCCESS" in keys and any(k.startswith("secrets/index/") for k in keys)
    for key in keys:
        body = client.get_object(Bucket="results", Key=key)["Body"].read().decode("latin-1")
        assert not _leaks(body), key
    record = json.loads(client.get_object(Bucket="results", Key="secrets/_run.json")["Body"].read())
    assert {record["config"]["s3"][k] for k in SECRETS} == {"<redacted>"}

    printed = run_cli(["run", "--print-config", *args[1:]])
    assert printed.returncode == 0 and "<redacted>" in printed.stdout and not _leaks(printed.stdout)
    cfg = load_config(None, args[1:])
    assert cfg.s3.secret_access_key == SECRETS["secret_access_key"]  # given to the client...
    assert cfg.s3_options().storage_options()["token"] == SECRETS["session_token"]
    assert not _leaks(repr(cfg)) and not _leaks(repr(cfg.s3_options()))  # ...and shown nowhere
    bad = run_cli(["run", "s3.secret_access_key=[cl1p-etl-S3CR3T-9zQ]", "input.path=x"])
    assert bad.returncode == 2 and "s3.secret_access_key" in bad.stderr and not _leaks(bad.stderr)

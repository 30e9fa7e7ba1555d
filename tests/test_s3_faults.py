"""S3 that fails the way real S3 does under load, through a fault-injecting proxy in front of the
moto server: the job retries (bounded), loses nothing, and gives the same embeddings as a clean
run; an S3 that refuses every request fails the job fast with one clear line."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from fault_proxy import FaultProxy
from pipeline_fixtures import ray_local, s3_server, tiny_checkpoint  # noqa: F401 (fixtures)
from pipeline_fixtures import S3_KEYS, embeddings, image_bytes, make_image, s3_client, s3_put_parquet, s3_read_parquet
from pipelines import cli

pytestmark = pytest.mark.e2e
N = 24


@pytest.fixture(scope="module")
def bucket(s3_server):
    client = s3_client(s3_server)
    client.create_bucket(Bucket="flaky-in")
    client.create_bucket(Bucket="flaky-out")
    for i in range(N):
        client.put_object(Bucket="flaky-in", Key=f"images/{i:02d}.png", Body=image_bytes(make_image(200 + i), "PNG"))
    table = pa.table({"id": [f"r{i}" for i in range(N)], "image": [f"images/{i:02d}.png" for i in range(N)],
                      "text": [f"a caption {i}" for i in range(N)]})
    s3_put_parquet(client, "flaky-in", "manifest.parquet", table)
    return {"client": client, "endpoint": s3_server}


def _args(endpoint: str, out: str, checkpoint: str) -> list[str]:
    return ["run", "input.path=s3://flaky-in/manifest.parquet", f"output.path=s3://flaky-out/{out}",
            f"model.checkpoint={checkpoint}", "model.backend=torch", "model.precision=fp32", "output.shard_size=6",
            "embed.batch_size=4", "decode.batch_size=4", "label.classes=[red, green, blue]", "index.enabled=false",
            f"s3.endpoint_url={endpoint}", *[f"s3.{k}={v}" for k, v in S3_KEYS.items()]]


def _results(client, prefix: str) -> pa.Table:
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="flaky-out", Prefix=f"{prefix}/results/")["Contents"])
    return pa.concat_tables([s3_read_parquet(client, "flaky-out", k) for k in keys])


def test_a_flaky_s3_loses_nothing_and_changes_nothing(ray_local, bucket, tiny_checkpoint):
    client = bucket["client"]
    assert cli.main(_args(bucket["endpoint"], "clean", tiny_checkpoint)) == 0
    with FaultProxy(bucket["endpoint"], rate=0.2, slow_s=0.5, seed=1) as proxy:
        assert cli.main(_args(proxy.url, "flaky", tiny_checkpoint)) == 0
    assert set(proxy.injected) == {"503", "500", "reset", "slow", "lost"}, proxy.injected
    assert sum(proxy.injected.values()) >= 0.1 * proxy.requests, (proxy.injected, proxy.requests)
    clean, flaky = _results(client, "clean"), _results(client, "flaky")
    assert flaky.column("id").to_pylist() == [f"r{i}" for i in range(N)]
    assert flaky.column("status").to_pylist() == ["ok"] * N, flaky.column("error").to_pylist()
    for col in ("image_embedding", "text_embedding"):
        assert np.abs(embeddings(flaky, col) - embeddings(clean, col)).max() <= 1e-6
    assert flaky.column("label").to_pylist() == clean.column("label").to_pylist()
    # the retries are counted, by cause, in the record; the clean run had none
    record = json.loads(client.get_object(Bucket="flaky-out", Key="flaky/_run.json")["Body"].read())
    failed = Counter()
    for side in ("driver", "workers"):
        failed.update({k: v for k, v in record["s3_requests"][side].items() if k.startswith("failed.")})
    assert failed["failed.http_503"] and failed["failed.http_500"], record["s3_requests"]
    assert sum(failed.values()) >= 0.5 * (proxy.injected["503"] + proxy.injected["500"]), (failed, proxy.injected)
    assert record["s3_requests"]["workers"]["attempts"] > 0
    clean_record = json.loads(client.get_object(Bucket="flaky-out", Key="clean/_run.json")["Body"].read())
    assert not [k for side in clean_record["s3_requests"].values() for k in side if k.startswith("failed.")]


def test_wrong_credentials_or_a_missing_bucket_fail_fast_with_one_line(ray_local, bucket, tiny_checkpoint, capsys):
    with FaultProxy(bucket["endpoint"], rate=1.0, faults=("403",)) as proxy:
        t0 = time.monotonic()
        assert cli.main(_args(proxy.url, "denied", tiny_checkpoint)) == 1
        # ~1 s here; the bound leaves room for a loaded machine, while retrying the refusal
        # (s3.max_attempts=10 with backoff) would take minutes
        assert time.monotonic() - t0 < 60
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clip-etl: error:")]
    assert len(lines) == 1 and "s3://flaky-in/manifest.parquet" in lines[0] and "PermissionError" in lines[0], lines
    assert proxy.requests <= 10  # refused, not retried: a 403 is no transient failure

    args = [a if not a.startswith("output.path=") else "output.path=s3://no-such-bucket/out"
            for a in _args(bucket["endpoint"], "", tiny_checkpoint)]
    t0 = time.monotonic()
    assert cli.main(args) == 1
    assert time.monotonic() - t0 < 60
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clip-etl: error:")]
    assert len(lines) == 1 and "no-such-bucket" in lines[0], lines

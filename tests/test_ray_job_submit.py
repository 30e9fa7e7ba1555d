"""``ray job submit`` against a real ``ray start --head`` cluster started (and stopped) here.

The job's driver runs ``clip-etl`` from the submitted working directory, connects to the
cluster through ``RAY_ADDRESS`` (set by the job server) instead of starting its own Ray, and the
submission ends SUCCEEDED with ``_SUCCESS`` written.

Teardown stops only this test's cluster (see ``pipeline_fixtures.ray_head``), never ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import tiny_checkpoint  # noqa: F401 (fixture)
from pipeline_fixtures import VENV_BIN, cli_env, copy_conf, free_port, ray_head, read_results, wait_for, write_images, write_manifest

pytestmark = pytest.mark.e2e
RAY = str(VENV_BIN / "ray")


@pytest.fixture(scope="module")
def ray_cluster():
    # Token authentication, as Ray enables by default, with a token private to this test. The
    # head (where the job's driver runs) has one CPU, too few for a model actor, which takes most
    # of a 2-CPU node: Ray must place the actor on the worker node, so the embeddings are always
    # computed on another node than the driver's.
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    with ray_head(env, num_cpus=1) as head:
        head["procs"].append(_start_worker_node(head["gcs"], head["temp_dir"], env, head["address"]))
        yield head


def _alive_nodes(address: str, env: dict) -> dict[str, bool]:
    """``{node_id: is_head_node}`` of the cluster's alive nodes."""
    r = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json", "--filter", "state=ALIVE"],
                       capture_output=True, text=True, env=env, timeout=60)
    ok = r.returncode == 0 and r.stdout.strip().startswith("[")
    return {n["node_id"]: bool(n["is_head_node"]) for n in json.loads(r.stdout)} if ok else {}


def _start_worker_node(gcs: str, temp_dir: str, env: dict, address: str) -> subprocess.Popen:
    """A second Ray node on this machine (own raylet and object store), joined to the head."""
    ports = {name: free_port() for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port")}
    args = [RAY, "start", f"--address={gcs}", "--block", "--num-cpus=2", "--object-store-memory=150000000",
            "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}/w"] + [
                f"--{k}={v}" for k, v in ports.items()]
    log = open(os.path.join(temp_dir, "worker.log"), "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if not wait_for(lambda: proc.poll() is not None or len(_alive_nodes(address, env)) >= 2, timeout=180, interval=2) \
            or proc.poll() is not None:
        log.flush()
        pytest.fail("the worker node did not join:\n" + Path(temp_dir, "worker.log").read_text()[-3000:])
    return proc


def test_ray_job_submit_runs_the_pipeline(ray_cluster, tiny_checkpoint, tmp_path):
    work = copy_conf(tmp_path / "work")
    data = work / "data"
    paths = write_images(data / "images", 24)
    write_manifest(data / "manifest.parquet", {"image": [f"images/{p.name}" for p in paths],
                                               "text": [f"text {i}" for i in range(24)]})
    shutil.copy(tiny_checkpoint, data / "tiny.safetensors")
    out = tmp_path / "out"
    submission = f"clip-etl-test-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(work),
           "--submission-id", submission, "--",
           "clip-etl", "run", "-c", "conf/pipeline.yaml", "input.path=data/manifest.parquet",
           f"output.path={out}", "model.checkpoint=data/tiny.safetensors", "model.precision=fp32",
           "output.shard_size=4", "embed.batch_size=4", "decode.batch_size=4", "label.classes=[red, blue]",
           "index.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ray_cluster["env"], timeout=500)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    assert f"Job '{submission}' succeeded" in logs
    status = subprocess.run([RAY, "job", "status", "--address", ray_cluster["address"], submission],
                            capture_output=True, text=True, env=ray_cluster["env"], timeout=120)
    assert status.returncode == 0 and "succeeded" in (status.stdout + status.stderr).lower()
    assert (out / "_SUCCESS").exists()
    table = read_results(out)
    assert table.num_rows == 24 and set(table.column("status").to_pylist()) == {"ok"}
    record = json.loads((out / "_run.json").read_text())
    assert record["ray"]["mode"] == "cluster"  # connected through RAY_ADDRESS, no embedded Ray
    assert record["counts"]["rows_out"] == 24
    # The model actor ran on the worker node, not beside the driver on the head; the job's record
    # names the node and the model.
    nodes = _alive_nodes(ray_cluster["address"], ray_cluster["env"])
    worker_node = [n for n, head in nodes.items() if not head]
    actors = record["ray"]["actor_models"]
    assert len(nodes) == 2 and [m["node"] for m in actors] == worker_node, (nodes, record["ray"])
    assert actors[0]["fingerprint"] == record["model"]["fingerprint"]
    # Workers wrote the results (where Ray Data placed the write tasks); each part's footer names
    # the nodes that wrote it, and the driver's record agrees with the footers.
    writers = set()
    for part in sorted((out / "results").iterdir()):
        footer = json.loads(pq.ParquetFile(part).metadata.metadata[b"clip_etl"])
        writers.update(footer["writer_nodes"])
    assert writers and writers <= set(nodes) and writers == set(record["ray"]["pieces_per_node"]), record["ray"]


def test_ray_job_submit_failure_is_not_succeeded(ray_cluster, tmp_path):
    """A job-level failure ends the submission FAILED with the one-line reason in its logs."""
    work = copy_conf(tmp_path / "work")
    cmd = [RAY, "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(work), "--",
           "clip-etl", "run", "-c", "conf/pipeline.yaml", "input.path=data/none.parquet",
           f"output.path={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ray_cluster["env"], timeout=300)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0, logs[-3000:]
    assert "clip-etl: error: manifest not found" in logs
    assert "failed" in logs.lower()

"""Fixtures and helpers shared by the pipeline tests: a local Ray, a tiny model, generated images
and manifests, a moto S3 server on loopback, and a way to run ``clip-etl`` as a real process.

Import the fixtures into a test module with ``from pipeline_fixtures import *``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLIP_ETL = str(VENV_BIN / "clip-etl")
CLASSES = ["red square", "green circle", "blue triangle", "yellow star"]


# --------------------------------------------------------------------------------------------
# Ray and the model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray per test module (2 CPUs, 256 MB object store, no dashboard)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             logging_level="warning", configure_logging=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The 32-px ``tiny-test`` CLIP with seeded random weights, saved in the native format."""
    import torch

    from clip_core import create_model
    from clip_core.checkpoints import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(create_model("tiny-test"), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    """The same model through the Encoder interface, as the pipeline's actors load it."""
    from clip_core.encoders import load_encoder

    return load_encoder(tiny_checkpoint, backend="torch", precision="fp32", device="cpu", num_threads=1)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def make_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB"):
    """A deterministic image with a coloured block, so embeddings differ between images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    color = rng.integers(0, 256, 3)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    arr[y0 : y0 + h // 2, x0 : x0 + w // 2] = color
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def image_bytes(img, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_images(folder: Path, n: int, *, size=(48, 40), start_seed: int = 0) -> list[Path]:
    """``n`` images (alternating PNG and JPEG) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        p = folder / f"img_{i:04d}.{ext}"
        p.write_bytes(image_bytes(make_image(start_seed + i, size), fmt))
        paths.append(p)
    return paths


def write_manifest(path: Path, columns: dict, *, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_noisy_jpeg_manifest(root: Path, rows: int, *, size: tuple[int, int] = (900, 700)) -> Path:
    """``rows`` large noisy JPEGs and a manifest with ids ``id000``...: decoding them is slow enough
    for a test to stop a run after its first shards and before its last."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(rows):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        (root / "images" / f"{i:03d}.jpg").write_bytes(image_bytes(Image.fromarray(arr), "JPEG", quality=90))
        names.append(f"images/{i:03d}.jpg")
    return write_manifest(root / "manifest.parquet", {
        "id": [f"id{i:03d}" for i in range(rows)], "image": names, "text": [f"caption {i}" for i in range(rows)]})


def read_results(output: str | Path, s3=None) -> pa.Table:
    """All committed parts of a job's results, in part order."""
    from pipelines import storage as pio

    results = pio.join(str(output), "results")
    parts = pio.list_files(results, suffix=".parquet", s3=s3)
    return pa.concat_tables([pq.read_table(pio.strip_scheme(p), filesystem=pio.filesystem_for(p, s3))
                             for p in parts])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def embeddings(table: pa.Table, column: str) -> np.ndarray:
    return np.array(table.column(column).to_pylist(), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    """Environment for a ``clip-etl`` child: the venv first on PATH, no inherited Ray address."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args: list[str], *, timeout: float = 300, cwd: str | Path | None = None, **env) -> subprocess.CompletedProcess:
    """Run the installed ``clip-etl`` console script and capture its output."""
    return subprocess.run([CLIP_ETL, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(cwd or REPO), env=cli_env(**env))


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: Ray's workers may leave the process group
    of the driver that started them, but not its session."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child started with ``start_new_session=True`` and everything it started, and wait
    until all of it is gone: a task still running in a worker could otherwise commit a file after
    the caller has looked at the output."""
    deadline = time.monotonic() + 30
    while True:
        members = _session_members(proc.pid)
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if not members or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pids_using(marker: str) -> list[int]:
    """Processes (other than this one) whose command line contains ``marker``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd and int(entry) != os.getpid():
            out.append(int(entry))
    return out


@contextlib.contextmanager
def ray_head(env: dict, *, num_cpus: int = 2, object_store_bytes: int = 200_000_000):
    """A real ``ray start --head`` with the dashboard (the Jobs API) on free loopback ports.

    Yields ``{"address": <Jobs API URL>, "gcs": <host:port>, "temp_dir", "env", "procs"}``; a caller
    that starts more nodes appends their ``Popen`` to ``procs`` (and puts their temp dir under
    ``temp_dir``). Teardown stops only these processes (their process groups, then any process
    still pointing at the private temp dir) rather than ``ray stop``, which would stop every Ray on
    the machine.
    """
    ray = str(VENV_BIN / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {name: free_port() for name in ("port", "dashboard-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "node-manager-port", "object-manager-port",
                                            "runtime-env-agent-port")}
    args = [ray, "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_bytes}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
            "--disable-usage-stats", f"--temp-dir={temp_dir}"] + [f"--{k}={v}" for k, v in ports.items()]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"

    def job_server_up() -> bool:
        if proc.poll() is not None:
            return True
        r = subprocess.run([ray, "job", "list", "--address", address], capture_output=True, env=env, timeout=60)
        return r.returncode == 0

    procs = [proc]
    try:
        ok = wait_for(job_server_up, timeout=240, interval=2)
        if proc.poll() is not None or not ok:
            log.flush()
            pytest.fail("ray start --head did not come up:\n" + Path(temp_dir, "head.log").read_text()[-3000:])
        yield {"address": address, "gcs": f"127.0.0.1:{ports['port']}", "temp_dir": temp_dir, "env": env,
               "procs": procs}
    finally:
        for p in reversed(procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
                if wait_for(lambda: p.poll() is not None, timeout=5, interval=0.5):
                    break
        for pid in pids_using(temp_dir):  # daemons that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------
S3_KEYS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def s3_put_parquet(client, bucket: str, key: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    client.put_object(Bucket=bucket, Key=key, Body=sink.getvalue())


def s3_read_parquet(client, bucket: str, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()))


def s3_overrides(endpoint: str) -> list[str]:
    """Config overrides that point the job at the test server (explicit, so Ray workers that
    started before the server did still get the endpoint and keys)."""
    return [f"s3.endpoint_url={endpoint}"] + [f"s3.{k}={v}" for k, v in S3_KEYS.items()]


def copy_conf(dst: Path) -> Path:
    shutil.copytree(REPO / "conf", dst / "conf")
    return dst


__all__ = [
    "CLASSES",
    "CLIP_ETL",
    "REPO",
    "S3_KEYS",
    "VENV_BIN",
    "cli_env",
    "copy_conf",
    "cosine_rows",
    "embeddings",
    "free_port",
    "image_bytes",
    "kill_group",
    "make_image",
    "pids_using",
    "ray_head",
    "ray_local",
    "read_results",
    "run_cli",
    "s3_client",
    "s3_overrides",
    "s3_server",
    "tiny_checkpoint",
    "tiny_encoder",
    "wait_for",
    "write_images",
    "write_manifest",
    "write_noisy_jpeg_manifest",
]

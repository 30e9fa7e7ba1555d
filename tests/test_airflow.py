"""``docker/airflow_dag.py`` under a real Airflow (``airflow dags test``) against a real Ray head.

Airflow lives in its own venv (``tests/airflow_env.sh``; built on first use, then reused), with
no Ray in it: the DAG talks to the cluster through the Jobs REST API only. The Ray head runs
with token authentication and ``.venv/bin`` first on its PATH, so the job's ``clip-etl`` is
this checkout's. What is checked against the cluster uses Ray's own ``JobSubmissionClient``, not
the DAG's client.

- a run with the model, manifest and output passed as ``--conf`` succeeds and writes the output;
- a job that fails fails the task, and the Airflow error carries the job's ``clip-etl: error:``;
- a try killed mid-run (SIGTERM, as Airflow kills a task) stops its Ray job and fails, and
  Airflow's retry (a new submission id) resumes the same output: committed shards are kept,
  every row is written exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys

import pytest

from pipeline_fixtures import tiny_checkpoint  # noqa: F401 (fixture)
from pipeline_fixtures import REPO, cli_env, kill_group, ray_head, read_results, wait_for, write_images, \
    write_manifest, write_noisy_jpeg_manifest

pytestmark = pytest.mark.e2e
AIRFLOW_VENV = REPO / ".venv-airflow"
DAG_ID = "clip_etl_daily"
FAST = ["model.precision=fp32", "index.enabled=false", "embed.batch_size=4", "decode.batch_size=4",
        "label.classes=[red, blue]"]


@pytest.fixture(scope="module")
def airflow_bin() -> str:
    """Airflow's own venv, installed once by the same script CI runs."""
    r = subprocess.run(["bash", str(REPO / "tests" / "airflow_env.sh"), str(AIRFLOW_VENV)], capture_output=True,
                       text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return str(AIRFLOW_VENV / "bin" / "airflow")


@pytest.fixture(scope="module")
def cluster():
    token = secrets.token_hex(32)
    with ray_head(cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)) as head:
        from ray.job_submission import JobSubmissionClient

        head["token"] = token
        head["client"] = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {token}"})
        yield head


@pytest.fixture(scope="module")
def airflow(airflow_bin, cluster, tmp_path_factory):
    """An AIRFLOW_HOME (sqlite) with the dags folder ``docker/``, migrated once for the module."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "docker"), RAY_AUTH_TOKEN=cluster["token"])
    r = subprocess.run([airflow_bin, "db", "migrate"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return {"bin": airflow_bin, "env": env, "db": home / "airflow.db"}


def _dags_test(airflow, cluster, date: str, conf: dict, *, retries: int = 0, background: bool = False):
    params = {"ray_address": cluster["address"], "config": str(REPO / "conf" / "pipeline.yaml"),
              "poll_seconds": 0.5, **conf}
    env = {**airflow["env"], "CLIP_ETL_TASK_RETRIES": str(retries), "CLIP_ETL_TASK_RETRY_DELAY_S": "3"}
    cmd = [airflow["bin"], "dags", "test", DAG_ID, date, "--conf", json.dumps(params)]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def _task_instance(airflow, date: str) -> tuple[str, int]:
    """(state, try_number) of the run's task, as Airflow recorded them."""
    with sqlite3.connect(airflow["db"]) as db:
        return db.execute(
            "SELECT ti.state, ti.try_number FROM task_instance ti JOIN dag_run dr"
            " ON ti.dag_id = dr.dag_id AND ti.run_id = dr.run_id"
            " WHERE dr.dag_id = ? AND dr.logical_date LIKE ? ORDER BY dr.id DESC LIMIT 1",
            (DAG_ID, f"{date}%")).fetchone()


def _jobs_writing(cluster, out) -> list:
    """The cluster's submitted jobs whose entrypoint writes ``out``, oldest first."""
    jobs = [j for j in cluster["client"].list_jobs() if f"output.path={out}" in (j.entrypoint or "")]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def test_dags_test_runs_the_pipeline_with_params(airflow, cluster, tiny_checkpoint, tmp_path):
    paths = write_images(tmp_path / "images", 12)
    manifest = write_manifest(tmp_path / "manifest.parquet", {"image": [str(p) for p in paths],
                                                              "text": [f"text {i}" for i in range(12)]})
    r = _dags_test(airflow, cluster, "2025-01-02", {
        "manifest": str(manifest), "output": str(tmp_path / "out" / "{ds}"), "model": tiny_checkpoint,
        "overrides": FAST + ["output.shard_size=4"]})
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-6000:]
    out = tmp_path / "out" / "2025-01-02"  # {ds} became the logical date
    assert (out / "_SUCCESS").exists(), logs[-4000:]
    record = json.loads((out / "_run.json").read_text())
    assert record["counts"]["rows_out"] == 12 and record["counts"]["ok"] == 12
    assert record["ray"]["mode"] == "cluster"
    assert read_results(out).num_rows == 12
    assert _task_instance(airflow, "2025-01-02") == ("success", 1)
    [job] = _jobs_writing(cluster, out)
    assert str(job.status) == "SUCCEEDED" and job.submission_id.endswith("-try1")
    assert f"input.path={manifest}" in job.entrypoint and f"model.checkpoint={tiny_checkpoint}" in job.entrypoint
    assert "secret" not in json.dumps(job.runtime_env or {}) and "s3." not in job.entrypoint


def test_a_failed_job_fails_the_task_with_its_error_line(airflow, cluster, tmp_path):
    out = tmp_path / "out"
    r = _dags_test(airflow, cluster, "2025-01-03", {
        "manifest": str(tmp_path / "none.parquet"), "output": str(out), "model": None, "overrides": FAST})
    logs = r.stdout + r.stderr
    assert r.returncode != 0 and "DagRun failed" in logs, logs[-6000:]
    assert "ended FAILED: clip-etl: error: manifest not found" in logs, logs[-6000:]
    assert _task_instance(airflow, "2025-01-03") == ("failed", 1)
    [job] = _jobs_writing(cluster, out)
    assert str(job.status) == "FAILED"
    assert not (out / "_SUCCESS").exists()


def test_a_killed_try_stops_its_job_and_the_retry_resumes(airflow, cluster, tiny_checkpoint, tmp_path):
    rows, shard = 24, 4
    manifest = write_noisy_jpeg_manifest(tmp_path / "data", rows)
    out = tmp_path / "out"
    proc = _dags_test(airflow, cluster, "2025-01-04", {
        "manifest": str(manifest), "output": str(out), "model": tiny_checkpoint,
        # a stopped job's lease on the output expires quickly, so the retry 3 s later may take over
        "overrides": FAST + [f"output.shard_size={shard}", "decode.batch_size=2", "embed.batch_size=2",
                             "decode.io_threads=1", "output.lease_timeout_s=2"]}, retries=1, background=True)
    try:
        def committed() -> list[str]:
            folder = out / "results"
            return sorted(n for n in os.listdir(folder) if n.startswith("part-")) if folder.exists() else []

        started = wait_for(lambda: committed() or proc.poll() is not None, timeout=600, interval=0.05)
        # Kill the first try as Airflow does (SIGTERM to the task's process): its on_kill stops the job.
        os.kill(proc.pid, signal.SIGTERM)
        logs, _ = proc.communicate(timeout=900)
    finally:
        kill_group(proc)
    assert started and proc.returncode == 0, logs[-8000:]
    first_try, second_try = _jobs_writing(cluster, out)
    assert str(first_try.status) == "STOPPED", f"the first job was not stopped mid-run: {first_try.status}"
    assert first_try.submission_id.endswith("-try1") and second_try.submission_id.endswith("-try2")
    assert str(second_try.status) == "SUCCEEDED"
    assert f"stopping Ray job {first_try.submission_id}" in logs and f"{first_try.submission_id} ended STOPPED" in logs
    assert _task_instance(airflow, "2025-01-04") == ("success", 2)
    record = json.loads((out / "_run.json").read_text())
    assert 1 <= record["counts"]["shards_resumed"] < rows // shard, record["counts"]
    assert record["counts"]["rows_out"] == rows and record["counts"]["rows_this_run"] < rows
    ids = read_results(out).column("id").to_pylist()
    assert sorted(ids) == [f"id{i:03d}" for i in range(rows)]  # every row exactly once


def test_the_dag_client_needs_the_cluster_token(cluster):
    """The stdlib Jobs API client the DAG uses: a wrong token is refused with a clear HTTP error."""
    sys.path.insert(0, str(REPO / "docker"))
    try:
        from ray_jobs import RayJobsClient, RayJobsError
    finally:
        sys.path.remove(str(REPO / "docker"))
    with pytest.raises(RayJobsError, match="HTTP 403"):
        RayJobsClient(cluster["address"], token="0" * 64).info("no-such-job")
    with pytest.raises(RayJobsError, match="HTTP 404"):
        RayJobsClient(cluster["address"], token=cluster["token"]).info("no-such-job")


def test_the_entrypoint_refuses_credentials_and_quotes_values(airflow_bin, tmp_path):
    """The DAG's command line, built in the Airflow venv: ``{ds}`` filled in, values quoted for the
    job's shell, and S3 credentials refused as overrides (they belong in the nodes' environment)."""
    snippet = """if True:
        import json, shlex, sys
        sys.path.insert(0, "docker")
        import airflow_dag
        params = {"config": "c.yaml", "manifest": "s3://b/m/{ds}/m.parquet", "output": "s3://b/o/{ds}", "model": None,
                  "overrides": ["label.classes=[red, blue]"]}
        print(json.dumps(shlex.split(airflow_dag.entrypoint(params, "2025-01-02"))))
        try:
            airflow_dag.entrypoint({**params, "overrides": ["s3.secret_access_key=abc"]}, "2025-01-02")
        except Exception as e:
            print(type(e).__name__, e)
    """
    python = str(AIRFLOW_VENV / "bin" / "python")
    r = subprocess.run([python, "-c", snippet], capture_output=True, text=True, cwd=str(REPO), timeout=300,
                       env={**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    assert r.returncode == 0, r.stderr[-3000:]
    argv_line, refusal = r.stdout.strip().splitlines()[-2:]
    assert json.loads(argv_line) == ["clip-etl", "run", "-c", "c.yaml", "input.path=s3://b/m/2025-01-02/m.parquet",
                                     "output.path=s3://b/o/2025-01-02", "label.classes=[red, blue]"]
    assert refusal.startswith("AirflowFailException") and "s3.secret_access_key" in refusal and "abc" not in refusal

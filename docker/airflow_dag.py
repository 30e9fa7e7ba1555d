"""Example Airflow DAG: run the clip-etl pipeline on a Ray cluster once a day.

The task submits ``clip-etl run`` with the Ray Jobs API, waits for the job, and fails unless the
job ends SUCCEEDED. Why not a BashOperator with ``ray job submit``: that command exits 0 when the
job is STOPPED (someone ran ``ray job stop``, or the cluster was shut down), which would mark a
run that produced nothing as a success.

What makes it safe to retry:

- every try gets its own submission id (``<dag>-<run>-<try>``), so a retry never collides with
  the id of a job that is still registered on the cluster;
- the output path depends only on the logical date, and the pipeline resumes into an existing
  output: a retry after a crash keeps the parts already committed and does only the rest;
- killing the Airflow task (timeout, mark failed) stops the Ray job too.

Requirements on the Airflow side: ``apache-airflow`` and ``ray[default]`` of the cluster's Ray
version (for ``ray.job_submission``). The cluster runs the image built from
``docker/Dockerfile.cpu`` or ``docker/Dockerfile.cuda``, which has clip-etl and ``conf/`` at
``/opt/clip-etl``. If the cluster uses token authentication, give the Airflow workers
``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN``).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

from airflow.decorators import dag, task
from airflow.exceptions import AirflowException

RAY_DASHBOARD = "http://ray-head.internal:8265"  # the Ray Jobs API (dashboard) address
MANIFEST = "s3://my-bucket/manifests/{ds}/manifest.parquet"  # one manifest per day
OUTPUT = "s3://my-bucket/clip-etl/{ds}"  # one output root per day; re-runs resume into it
CONFIG = "/opt/clip-etl/conf/pipeline.yaml"  # baked into the cluster image
POLL_SECONDS = 30
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submission_id(dag_id: str, run_id: str, try_number: int) -> str:
    """A unique, Ray-safe id for this try of this run."""
    raw = f"{dag_id}-{run_id}-try{try_number}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)[:200]


@dag(
    dag_id="clip_etl_daily",
    schedule="@daily",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["clip-etl", "ray"],
)
def clip_etl_daily():
    @task(execution_timeout=timedelta(hours=12))
    def run_pipeline(ds: str | None = None, run_id: str | None = None, ti=None) -> dict:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(RAY_DASHBOARD)
        job_id = submission_id(ti.dag_id, run_id, ti.try_number)
        entrypoint = " ".join([
            "clip-etl", "run", "-c", CONFIG,
            f"input.path={MANIFEST.format(ds=ds)}",
            f"output.path={OUTPUT.format(ds=ds)}",
            # everything else comes from the config file; add overrides here, e.g.
            # "embed.actors=8", "model.checkpoint=s3://my-bucket/models/ViT-B-32.pt",
            # but never s3.* credentials: the entrypoint is stored and shown by the Ray Jobs API.
            # The job reads them from the cluster nodes' standard AWS environment (instance
            # role, AWS_* variables, profiles).
        ])
        client.submit_job(entrypoint=entrypoint, submission_id=job_id)
        print(f"submitted Ray job {job_id}: {entrypoint}")

        try:
            while True:
                status = client.get_job_status(job_id)
                if str(status.value if hasattr(status, "value") else status) in TERMINAL:
                    break
                time.sleep(POLL_SECONDS)
        except BaseException:
            # Airflow killed the task (timeout, manual fail): do not leave the job running.
            try:
                client.stop_job(job_id)
            finally:
                raise

        logs = client.get_job_logs(job_id)
        print(logs[-20000:])
        if status != JobStatus.SUCCEEDED:
            info = client.get_job_info(job_id)
            last_error = next((ln for ln in reversed(logs.splitlines()) if ln.startswith("clip-etl: error:")), "")
            raise AirflowException(
                f"Ray job {job_id} ended {status}: {last_error or info.message or 'see the job logs above'}"
            )
        return {"submission_id": job_id, "output": OUTPUT.format(ds=ds)}

    run_pipeline()


clip_etl_daily()

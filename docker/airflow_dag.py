"""Example Airflow DAG: run the clip-etl pipeline on a Ray cluster once a day.

The task submits ``clip-etl run`` to the cluster's Ray Jobs API, waits for the job, and fails
unless the job ends SUCCEEDED. Why not a BashOperator with ``ray job submit``: that command exits
0 when the job is STOPPED (someone ran ``ray job stop``, or the cluster was shut down), which would
mark a run that produced nothing as a success.

Parameters (``params``; a triggered run's conf or ``airflow dags test ... --conf '{...}'``
overrides each): ``manifest``, ``output`` and ``model`` (the checkpoint; null: the config file's),
``config`` (a path on the cluster), ``ray_address`` (the Jobs API, ``http://<head>:8265``),
``overrides`` (more ``section.key=value`` for ``clip-etl run``) and ``poll_seconds``. ``{ds}`` in
``manifest`` and ``output`` becomes the run's logical date, so by default each day has its own
manifest and output.

What makes it safe to retry:

- every try gets its own submission id (``<dag>-<run>-try<n>``), so a retry never collides with
  the id of a job that is still registered on the cluster;
- the output path depends only on the parameters and the logical date, and the pipeline resumes
  into an existing output: a retry keeps the parts already committed and does only the rest;
- killing the Airflow task (timeout, mark failed) stops the Ray job too (``on_kill``).

S3 credentials never go into the entrypoint or the job's ``runtime_env``: the Jobs API stores
and shows both. The job reads them from the cluster nodes' standard AWS environment (instance
role, ``AWS_*`` variables, profiles); overrides naming ``s3.access_key_id``,
``s3.secret_access_key`` or ``s3.session_token`` are refused.

Requirements on the Airflow side: Airflow 3 and ``ray_jobs.py`` from this folder next to this
file; no Ray (the Jobs API is plain HTTP). The cluster runs the image built from
``docker/Dockerfile.cpu`` or ``docker/Dockerfile.cuda``, which has clip-etl and ``conf/`` at
``/opt/clip-etl``. If the cluster uses token authentication, give the Airflow workers the token
(``RAY_AUTH_TOKEN``, or a file at ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
``CLIP_ETL_TASK_RETRIES`` (default 2) and ``CLIP_ETL_TASK_RETRY_DELAY_S`` (default 600) set the
task's retries where the DAG is parsed.
"""

from __future__ import annotations

import os
import re
import shlex
from datetime import datetime, timedelta

from airflow.sdk import DAG, BaseOperator, Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from ray_jobs import RayJobsClient, last_error_line

SECRET_KEYS = ("s3.access_key_id", "s3.secret_access_key", "s3.session_token")
LOG_TAIL_CHARS = 20000


def submission_id(dag_id: str, run_id: str, try_number: int) -> str:
    """A unique, Ray-safe id for this try of this run."""
    raw = f"{dag_id}-{run_id}-try{try_number}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)[:200]


def entrypoint(params: dict, ds: str) -> str:
    """The ``clip-etl run`` command line for these parameters and logical date."""
    overrides = list(params.get("overrides") or [])
    secret = [o for o in overrides if o.split("=", 1)[0].strip() in SECRET_KEYS]
    if secret:
        raise AirflowFailException(f"S3 credentials must come from the cluster's environment, not overrides: "
                                   f"{', '.join(o.split('=', 1)[0] for o in secret)}")
    args = ["clip-etl", "run", "-c", params["config"],
            f"input.path={params['manifest'].replace('{ds}', ds)}",
            f"output.path={params['output'].replace('{ds}', ds)}"]
    if params.get("model"):
        args.append(f"model.checkpoint={params['model']}")
    return shlex.join(args + overrides)


class ClipEtlRayJobOperator(BaseOperator):
    """Run ``clip-etl run`` as a Ray job; succeed only if the job ends SUCCEEDED."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._client: RayJobsClient | None = None
        self._job_id: str | None = None

    def execute(self, context) -> dict:
        params, ti = context["params"], context["ti"]
        command = entrypoint(params, context["ds"])
        self._client = RayJobsClient(params["ray_address"])
        self._job_id = submission_id(ti.dag_id, context["run_id"], ti.try_number)
        metadata = {"airflow_dag": ti.dag_id, "airflow_run": context["run_id"]}
        self._client.submit(command, self._job_id, metadata=metadata)
        self.log.info("submitted Ray job %s: %s", self._job_id, command)
        info = self._client.wait(self._job_id, poll_s=float(params["poll_seconds"]))
        logs = self._client.logs(self._job_id)
        self.log.info("Ray job %s ended %s; its log:\n%s", self._job_id, info["status"], logs[-LOG_TAIL_CHARS:])
        if info["status"] != "SUCCEEDED":
            reason = last_error_line(logs) or info.get("message") or "see the job log above"
            raise AirflowException(f"Ray job {self._job_id} ended {info['status']}: {reason}")
        return {"submission_id": self._job_id, "output": params["output"].replace("{ds}", context["ds"])}

    def on_kill(self) -> None:
        """Airflow killed the task (timeout, marked failed): do not leave the job running."""
        if self._client and self._job_id:
            self.log.info("stopping Ray job %s", self._job_id)
            self._client.stop(self._job_id)


with DAG(
    dag_id="clip_etl_daily",
    schedule="@daily",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": int(os.environ.get("CLIP_ETL_TASK_RETRIES", "2")),
                  "retry_delay": timedelta(seconds=float(os.environ.get("CLIP_ETL_TASK_RETRY_DELAY_S", "600")))},
    params={
        "manifest": Param("s3://my-bucket/manifests/{ds}/manifest.parquet", type="string",
                          description="input.path; {ds} is the logical date"),
        "output": Param("s3://my-bucket/clip-etl/{ds}", type="string",
                        description="output.path, one per day; re-runs resume into it"),
        "model": Param("s3://my-bucket/models/ViT-B-32.pt", type=["null", "string"],
                       description="model.checkpoint; null: the config file's"),
        "config": Param("/opt/clip-etl/conf/pipeline.yaml", type="string", description="config file on the cluster"),
        "ray_address": Param("http://ray-head.internal:8265", type="string", description="the Ray Jobs API"),
        "overrides": Param([], type="array", items={"type": "string"},
                           description="more section.key=value overrides, never s3 credentials"),
        "poll_seconds": Param(30, type="number", exclusiveMinimum=0, description="seconds between status polls"),
    },
    tags=["clip-etl", "ray"],
):
    ClipEtlRayJobOperator(task_id="run_pipeline", execution_timeout=timedelta(hours=12))

"""A small client for the Ray Jobs REST API (the dashboard's ``/api/jobs/``), standard library only.

Why not ``ray.job_submission.JobSubmissionClient``: it needs ``ray[default]`` of exactly the
cluster's Ray version installed wherever the client runs (an Airflow worker, a CI runner), and
Ray is large. The REST API it wraps is stable and small; these are the calls it makes:

- ``POST /api/jobs/`` with ``{"entrypoint", "submission_id", "runtime_env", "metadata"}``;
- ``GET /api/jobs/<id>`` (status ``PENDING``/``RUNNING``/``STOPPED``/``SUCCEEDED``/``FAILED``,
  ``message``);
- ``GET /api/jobs/<id>/logs`` (``{"logs": "..."}``, the driver's output);
- ``POST /api/jobs/<id>/stop`` (``{"stopped": bool}``).

Clusters with token authentication (the default since Ray 2.52) want ``Authorization: Bearer
<token>``; the token comes from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``, the same places Ray's own clients look.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class RayJobsError(RuntimeError):
    """The Jobs API refused a request or could not be reached."""


def auth_token() -> str | None:
    """The cluster token from the environment or Ray's token file, if any."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file():
        return None
    return path.read_text().strip() or None


class RayJobsClient:
    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 60.0):
        self.address = address.rstrip("/")
        self.token = token if token is not None else auth_token()
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.address + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace").strip().splitlines()
            raise RayJobsError(f"{method} {path}: HTTP {e.code}: {detail[-1] if detail else e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RayJobsError(f"{method} {self.address}{path}: {getattr(e, 'reason', e)}") from None

    def submit(self, entrypoint: str, submission_id: str, *, runtime_env: dict | None = None,
               metadata: dict[str, str] | None = None) -> str:
        body = {"entrypoint": entrypoint, "submission_id": submission_id,
                "runtime_env": runtime_env or {}, "metadata": metadata or {}}
        return self._call("POST", "/api/jobs/", body)["submission_id"]

    def info(self, submission_id: str) -> dict:
        return self._call("GET", f"/api/jobs/{submission_id}")

    def logs(self, submission_id: str) -> str:
        return self._call("GET", f"/api/jobs/{submission_id}/logs").get("logs", "")

    def stop(self, submission_id: str) -> bool:
        return bool(self._call("POST", f"/api/jobs/{submission_id}/stop").get("stopped"))

    def wait(self, submission_id: str, *, poll_s: float,
             on_poll: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is terminal; return its last info."""
        while True:
            info = self.info(submission_id)
            if on_poll:
                on_poll(info)
            if info.get("status") in TERMINAL:
                return info
            time.sleep(poll_s)


def last_error_line(logs: str, prefix: str = "clip-etl: error:") -> str:
    """The last one-line job error the CLI printed, or ''."""
    return next((ln.strip() for ln in reversed(logs.splitlines()) if ln.strip().startswith(prefix)), "")

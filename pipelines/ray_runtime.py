"""Where the job's Ray comes from: an existing cluster, or an embedded local Ray.

Why one place: the same ``clip-etl run`` must work on a laptop (no cluster: start Ray inside the
process and stop it at the end), under ``ray job submit`` (the job server sets ``RAY_ADDRESS``;
connect to it and only disconnect at the end), and inside a process that already initialized
Ray (tests, notebooks: reuse it and leave it running).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pipelines.config import RayConfig


@dataclass
class RaySession:
    """What the job learned about the Ray it runs on."""

    mode: str  # "existing" (already initialized), "cluster" (connected), "embedded" (started here)
    address: str | None  # cluster address when connected
    cpus: float  # CPUs in the cluster
    gpus: float  # GPUs in the cluster

    def to_dict(self) -> dict:
        return {"mode": self.mode, "address": self.address, "cpus": self.cpus, "gpus": self.gpus}


def _describe(mode: str, address: str | None) -> RaySession:
    import ray

    res = ray.cluster_resources()
    return RaySession(mode, address, float(res.get("CPU", 0)), float(res.get("GPU", 0)))


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[RaySession]:
    """Initialize Ray for the job and undo exactly what was done on exit."""
    import ray

    if ray.is_initialized():
        yield _describe("existing", None)
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        try:
            yield _describe("cluster", address)
        finally:
            ray.shutdown()
        return
    kwargs = {
        "num_cpus": cfg.num_cpus or os.cpu_count() or 1,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = int(cfg.object_store_mb) * 1024 * 1024
    ray.init(**kwargs)
    try:
        yield _describe("embedded", None)
    finally:
        ray.shutdown()


def actor_gpus(setting: float | str, session: RaySession) -> float:
    """GPUs per model actor: ``"auto"`` = one when the cluster has any, else none."""
    if setting == "auto":
        return 1.0 if session.gpus > 0 else 0.0
    return float(setting)


__all__ = ["RaySession", "actor_gpus", "ray_session"]

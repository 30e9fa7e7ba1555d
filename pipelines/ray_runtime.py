"""Where the job's Ray comes from: an existing cluster, or an embedded local Ray.

Why one place: the same ``clip-etl run`` must work on a laptop (no cluster: start Ray inside the
process and stop it at the end), under ``ray job submit`` (the job server sets ``RAY_ADDRESS``;
connect to it and only disconnect at the end), and inside a process that already initialized
Ray (tests, notebooks: reuse it and leave it running).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from pipelines.config import RayConfig


@dataclass
class RaySession:
    """What the job learned about the Ray it runs on."""

    mode: str  # "existing" (already initialized), "cluster" (connected), "embedded" (started here)
    address: str | None  # cluster address when connected
    cpus: float  # CPUs in the cluster
    gpus: float  # GPUs in the cluster
    node_cpus: list[float] = field(default_factory=list)  # CPUs of each alive node that has any

    def to_dict(self) -> dict:
        return {"mode": self.mode, "address": self.address, "cpus": self.cpus, "gpus": self.gpus,
                "node_cpus": self.node_cpus}


def node_id() -> str:
    """The Ray node this code runs on (``"local"`` outside Ray: the batch functions called
    directly), recorded beside what a worker wrote or computed so a run shows where its work ran."""
    import ray

    if not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_node_id()


def _describe(mode: str, address: str | None) -> RaySession:
    import ray

    res = ray.cluster_resources()
    nodes = sorted(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))
    return RaySession(mode, address, float(res.get("CPU", 0)), float(res.get("GPU", 0)), [c for c in nodes if c > 0])


@contextmanager
def _keeps_sigterm_handler() -> Iterator[None]:
    """``ray.init`` puts its crash reporter on SIGTERM (it prints a stack and aborts the process);
    a Python handler the caller had set (``clip-etl run`` unwinds on SIGTERM) is put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


# How long an idle worker process beyond the node's CPU count lives before Ray kills it (Ray's
# default: 1 s). The job's small tasks (reads, writes, commits) come every few seconds, so with
# the default each one started a fresh worker, paying ~1 CPU-second of imports: 8 workers for a
# 512-row job on 2 CPUs, 18% of the machine. Kept for a minute, a few workers serve them all
# (BENCHMARKS.md, "End to end"). A cluster started with `ray start` takes the same setting as
# --system-config='{"idle_worker_killing_time_threshold_ms": 60000}' (docs/pipeline.md).
IDLE_WORKER_KEEP_MS = 60_000


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[RaySession]:
    """Initialize Ray for the job and undo exactly what was done on exit."""
    import ray

    if ray.is_initialized():
        yield _describe("existing", None)
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        with _keeps_sigterm_handler():
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
        "_system_config": {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    }
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = int(cfg.object_store_mb) * 1024 * 1024
    with _keeps_sigterm_handler():
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


# Of a CPU-only node, the share ``auto`` leaves to decode tasks beside the model actors (with
# ``decode.placement=tasks``; by default CPU actors decode themselves): decoding photos with JPEG
# draft measured a third of the work of a ViT-B/32 in bf16 (BENCHMARKS.md), larger models less.
DECODE_SHARE = 0.25
# CPUs ``auto`` leaves free on a node for the brief read, write and commit tasks (0.1 each).
SMALL_TASKS_CPUS = 0.2


@dataclass(frozen=True)
class StageCpus:
    """CPUs each model actor and each decode task reserves."""

    actor: float
    decode: float


def decode_in_actors(placement: str, gpus: float) -> bool:
    """``decode.placement``: ``auto`` decodes in the model actors when they run on CPUs.

    Why: on the same cores, a decode task slows a multi-threaded CPU model far more than the CPU
    time it takes (measured on 2 CPUs: ViT-B/32 with 2 threads beside one decode task needed
    1.6x its busy time; BENCHMARKS.md), while the actor decoding its own batch with the model's
    threads, then embedding it, keeps every core busy with one thing at a time. Beside GPU
    actors decoding is what the CPUs are for, in tasks that scale with the cluster.
    """
    return placement == "actors" or (placement == "auto" and gpus == 0)


def stage_cpus(embed_setting: float | str, decode_setting: float | str, gpus: float, actors: int,
               session: RaySession, decode_in_actor: bool = False) -> StageCpus:
    """Resolve ``embed.num_cpus`` / ``decode.num_cpus`` (``"auto"`` or numbers).

    Beside GPU actors a CPU is one actor's feeder and one decode task's worker. Without GPUs the
    model and decoding share the nodes' CPUs: a model runs as many threads as it reserves, so a
    fixed 1 CPU per actor would leave most of a node idle. ``auto`` gives each actor its share of
    a node (the actors spread over the nodes) less :data:`DECODE_SHARE` of it (at least half a
    CPU) and :data:`SMALL_TASKS_CPUS`, and decode tasks that share, at most one CPU each: on a
    2-CPU machine the model runs 2 threads (1.3 reserved) and one decode task at a time (0.5).
    When the actors decode themselves (``decode_in_actor``), no share is left to decoding: on 2
    CPUs an actor reserves 1.8 and runs 2 threads for both.
    """
    if gpus > 0 or not session.node_cpus:
        return StageCpus(1.0 if embed_setting == "auto" else float(embed_setting),
                         1.0 if decode_setting == "auto" else float(decode_setting))
    node = max(session.node_cpus)
    per_node = -(-actors // len(session.node_cpus))  # ceil: actors per node when spread
    share = node / per_node
    decode_share = 0.0 if decode_in_actor else max(0.5, DECODE_SHARE * share)
    actor = max(0.5, share - decode_share - SMALL_TASKS_CPUS / per_node)
    return StageCpus(actor if embed_setting == "auto" else float(embed_setting),
                     min(1.0, max(0.5, decode_share)) if decode_setting == "auto" else float(decode_setting))


__all__ = ["RaySession", "StageCpus", "actor_gpus", "decode_in_actors", "node_id", "ray_session", "stage_cpus"]

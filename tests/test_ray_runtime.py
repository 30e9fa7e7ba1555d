"""How the job sizes its Ray stages: GPUs per actor, and the CPUs model actors and decode tasks
reserve (what lets a CPU-only model use the cores decoding leaves, without starving decoding)."""

from __future__ import annotations

import pytest

from pipelines.etl.embed import actor_threads
from pipelines.ray_runtime import RaySession, actor_gpus, decode_in_actors, stage_cpus


def _session(*node_cpus: float, gpus: float = 0.0) -> RaySession:
    return RaySession("embedded", None, float(sum(node_cpus)), gpus, sorted(node_cpus))


def test_gpu_actors_take_one_cpu_and_decode_tasks_one_each():
    s = _session(16, gpus=2)
    assert actor_gpus("auto", s) == 1.0 and actor_gpus(0.5, s) == 0.5
    cpus = stage_cpus("auto", "auto", 1.0, 2, s)
    assert (cpus.actor, cpus.decode) == (1.0, 1.0)


@pytest.mark.parametrize("nodes, actors, actor, threads, decode", [
    ((2,), 1, 1.3, 2, 0.5),  # this project's 2-CPU machines: the model gets both cores' threads
    ((16,), 1, 11.8, 12, 1.0),  # a quarter of the node left to decode tasks of 1 CPU each
    ((16, 16), 4, 5.9, 6, 1.0),  # 2 actors per node, 8 CPUs each: 6 reserved, 2 for decoding
    ((2,), 2, 0.5, 1, 0.5),  # more actors than a small node fits well: still schedulable
])
def test_cpu_actors_share_each_node_with_decoding(nodes, actors, actor, threads, decode):
    cpus = stage_cpus("auto", "auto", 0.0, actors, _session(*nodes))
    assert cpus.actor == pytest.approx(actor) and actor_threads(cpus.actor) == threads
    assert cpus.decode == pytest.approx(decode)
    per_node = -(-actors // len(nodes))
    # what one node's actors reserve, plus one decode task and a read and a write task, fits on it
    assert per_node * cpus.actor + cpus.decode + 0.2 <= max(nodes) + 1e-9


def test_numbers_given_are_kept():
    cpus = stage_cpus(3, 0.25, 0.0, 1, _session(8))
    assert (cpus.actor, cpus.decode) == (3.0, 0.25)
    assert actor_threads(1.0) == 1 and actor_threads(1.3) == 2 and actor_threads(0.5) == 1


def test_cpu_actors_decode_their_own_batches_by_default():
    assert decode_in_actors("auto", 0.0) and not decode_in_actors("auto", 1.0)
    assert decode_in_actors("actors", 1.0) and not decode_in_actors("tasks", 0.0)
    cpus = stage_cpus("auto", "auto", 0.0, 1, _session(2), decode_in_actor=True)
    assert cpus.actor == pytest.approx(1.8) and actor_threads(cpus.actor) == 2  # no share left to tasks
    cpus = stage_cpus("auto", "auto", 0.0, 1, _session(16), decode_in_actor=True)
    assert cpus.actor == pytest.approx(15.8) and actor_threads(cpus.actor) == 16


def _worker_pids_of_spaced_small_tasks(keep_ms: int, monkeypatch) -> set[int]:
    """An embedded session with a model-sized actor holding most of the CPUs, then small tasks
    (like the job's reads, writes and commits) every 1.5 s: the worker process each ran in."""
    import time

    import ray

    from pipelines import ray_runtime
    from pipelines.config import RayConfig

    def pid() -> int:  # nested, so Ray ships it by value (workers cannot import this module)
        import os

        return os.getpid()

    class Holder:
        def pid(self) -> int:
            return pid()

    monkeypatch.setattr(ray_runtime, "IDLE_WORKER_KEEP_MS", keep_ms)
    with ray_runtime.ray_session(RayConfig(num_cpus=2)):
        holder = ray.remote(num_cpus=1.8)(Holder).remote()
        ray.get(holder.pid.remote())
        small = ray.remote(num_cpus=0.1)(pid)
        pids = set()
        for _ in range(4):
            pids.add(ray.get(small.remote()))
            time.sleep(1.5)
    return pids


@pytest.mark.e2e
def test_the_embedded_ray_keeps_idle_workers_for_the_small_tasks(monkeypatch):
    """With Ray's default (idle workers beyond the CPU count killed after 1 s) every small task
    of a job started a fresh worker process, ~1 CPU-second of imports each; kept for a minute,
    they reuse one. The default's behaviour is checked too, so the test shows the difference."""
    import ray

    if ray.is_initialized():  # left by another module: this test needs its own embedded Ray
        ray.shutdown()
    assert len(_worker_pids_of_spaced_small_tasks(60_000, monkeypatch)) == 1
    assert len(_worker_pids_of_spaced_small_tasks(1_000, monkeypatch)) >= 2

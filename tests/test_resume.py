"""SIGKILL, for real: the driver of a ``clip-etl run`` process, or one of its Ray workers.

A killed driver: the second run must keep every part the first one committed (same inode and
mtime: not rewritten), do the rest, write every id exactly once, and give the same results as a
run that was never interrupted. A killed model actor or decode task: the same run finishes, every
row once. A model actor that dies every time it starts: the job fails with one clear line
instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest

from pipeline_fixtures import (
    CLIP_ETL,
    REPO,
    _session_members,
    cli_env,
    embeddings,
    kill_group,
    read_results,
    tiny_checkpoint,  # noqa: F401 (fixture)
    wait_for,
    write_noisy_jpeg_manifest,
)

pytestmark = pytest.mark.e2e
ROWS, SHARD = 48, 6  # 8 shards


@pytest.fixture(scope="module")
def slow_manifest(tmp_path_factory):
    return write_noisy_jpeg_manifest(tmp_path_factory.mktemp("resume"), ROWS)


def _args(manifest, out, checkpoint) -> list[str]:
    return ["run", f"input.path={manifest}", f"output.path={out}", f"model.checkpoint={checkpoint}",
            "model.precision=fp32", f"output.shard_size={SHARD}", "embed.batch_size=2", "decode.batch_size=2",
            "decode.io_threads=1", "label.classes=[noise, signal]", "index.enabled=false",
            "ray.num_cpus=2", "ray.object_store_mb=200"]


def _parts(out) -> dict[str, tuple[int, int]]:
    folder = out / "results"
    if not folder.exists():
        return {}
    return {n: (os.stat(folder / n).st_ino, os.stat(folder / n).st_mtime_ns)
            for n in os.listdir(folder) if n.startswith("part-")}


def test_resume_after_sigkill(slow_manifest, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([CLIP_ETL, *_args(slow_manifest, out, tiny_checkpoint)], stdout=log,
                            stderr=subprocess.STDOUT, env=cli_env(), cwd=str(REPO), start_new_session=True)
    try:
        started = wait_for(lambda: len(_parts(out)) >= 1 or proc.poll() is not None, timeout=400, interval=0.02)
        finished_early = proc.poll() is not None
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its embedded Ray dies with it
        proc.wait(timeout=60)
    finally:
        kill_group(proc)  # anything left of that process group
        log.close()
    first = _parts(out)
    assert started and not finished_early, (tmp_path / "first.log").read_text()[-3000:]
    assert 1 <= len(first) < ROWS // SHARD, f"kill landed after the end: {sorted(first)}"
    assert not (out / "_SUCCESS").exists()

    # run again into the same output
    second = subprocess.run([CLIP_ETL, *_args(slow_manifest, out, tiny_checkpoint)], capture_output=True, text=True,
                            env=cli_env(), cwd=str(REPO), timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(first)} shards already committed" in second.stderr
    assert (out / "_SUCCESS").exists()
    after = _parts(out)
    assert len(after) == ROWS // SHARD
    for name, stat in first.items():
        assert after[name] == stat, f"{name} was rewritten"
    assert not [n for n in os.listdir(out / "results") if n.startswith(".tmp")]

    table = read_results(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == ROWS and sorted(ids) == [f"id{i:03d}" for i in range(ROWS)]
    record = json.loads((out / "_run.json").read_text())
    assert record["counts"]["shards_resumed"] == len(first)
    assert record["counts"]["rows_out"] == ROWS and record["counts"]["ok"] == ROWS
    assert record["counts"]["rows_this_run"] == ROWS - len(first) * SHARD < ROWS  # committed work not redone
    assert not (out / "_pieces").exists()

    # an uninterrupted run (in this process, embedded Ray) gives the same results
    from pipelines import cli

    ref_out = tmp_path / "reference"
    assert cli.main(_args(slow_manifest, ref_out, tiny_checkpoint)) == 0
    ref = read_results(ref_out)
    assert ref.column("id").to_pylist() == ids
    np.testing.assert_allclose(embeddings(table, "image_embedding"), embeddings(ref, "image_embedding"), atol=1e-6)
    np.testing.assert_allclose(embeddings(table, "text_embedding"), embeddings(ref, "text_embedding"), atol=1e-6)
    assert table.column("label").to_pylist() == ref.column("label").to_pylist()
    assert table.column("caption").to_pylist() == ref.column("caption").to_pylist()


def test_a_second_run_into_a_live_output_is_refused(slow_manifest, tiny_checkpoint, tmp_path):
    """Two runs into one output (an Airflow retry while the first still runs): the second fails
    fast naming the holder; once the holder is killed, the next run takes over and resumes."""
    out = tmp_path / "out"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([CLIP_ETL, *_args(slow_manifest, out, tiny_checkpoint)], stdout=log,
                             stderr=subprocess.STDOUT, env=cli_env(), cwd=str(REPO), start_new_session=True)
    try:
        assert wait_for(lambda: (out / "_lease.json").exists() or first.poll() is not None, timeout=300)
        holder = json.loads((out / "_lease.json").read_text())
        second = subprocess.run([CLIP_ETL, *_args(slow_manifest, out, tiny_checkpoint)], capture_output=True,
                                text=True, env=cli_env(), cwd=str(REPO), timeout=120)
        assert first.poll() is None, "the first run ended before the second one tried"
        assert second.returncode != 0
        assert f"output is in use by run '{holder['run_id']}'" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert wait_for(lambda: len(_parts(out)) >= 1 or first.poll() is not None, timeout=400, interval=0.02)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        kill_group(first)
        log.close()
    done_before = len(_parts(out))
    third = subprocess.run([CLIP_ETL, *_args(slow_manifest, out, tiny_checkpoint)], capture_output=True, text=True,
                           env=cli_env(), cwd=str(REPO), timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    record = json.loads((out / "_run.json").read_text())
    assert record["counts"]["shards_resumed"] == done_before and record["counts"]["rows_out"] == ROWS
    assert not (out / "_lease.json").exists()  # released at the end


def _workers_titled(session: int, title: str) -> list[int]:
    """Processes of the job's session whose Ray process title names ``title``."""
    found = []
    for pid in _session_members(session):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and title in cmdline:
            found.append(pid)
    return found


@pytest.mark.parametrize("victim, extra", [("EmbedActor", []), ("DecodeFn", ["decode.placement=tasks"])])
def test_a_worker_killed_mid_run_loses_and_repeats_nothing(slow_manifest, tiny_checkpoint, tmp_path, victim, extra):
    out = tmp_path / "out"
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([CLIP_ETL, *_args(slow_manifest, out, tiny_checkpoint), *extra], stdout=log,
                            stderr=subprocess.STDOUT, env=cli_env(), cwd=str(REPO), start_new_session=True)
    try:
        # the model actor once a shard is committed; a decode task while it decodes
        mid_run = (lambda: len(_parts(out)) >= 1) if victim == "EmbedActor" else (lambda: _workers_titled(proc.pid, victim))
        running = wait_for(lambda: mid_run() or proc.poll() is not None, timeout=400, interval=0.02)
        victims = _workers_titled(proc.pid, victim)
        parts_at_kill = len(_parts(out))
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        rc = proc.wait(timeout=600)
    finally:
        kill_group(proc)
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert running and victims, f"nothing named {victim} to kill: {text[-2000:]}"
    assert parts_at_kill < ROWS // SHARD  # killed before the end
    assert rc == 0, text[-3000:]
    table = read_results(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == [f"id{i:03d}" for i in range(ROWS)]  # every row, once
    assert table.column("status").to_pylist() == ["ok"] * ROWS
    record = json.loads((out / "_run.json").read_text())
    assert record["counts"]["rows_out"] == ROWS and record["counts"]["ok"] == ROWS


# Loaded into every process of the job (PYTHONPATH): inside a Ray worker, the model actor's
# constructor crashes the process, as a model whose load segfaults does.
CRASHING_ACTOR = """
import sys

if any("default_worker" in a for a in sys.argv):
    import importlib.abc, importlib.util, os, signal

    class _Crash(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "pipelines.etl.embed":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            real_exec = spec.loader.exec_module

            def exec_module(module):
                real_exec(module)
                module.EmbedActor.__init__ = lambda *a, **k: os.kill(os.getpid(), signal.SIGSEGV)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Crash())
"""


def test_a_model_actor_that_keeps_dying_fails_the_job_clearly(slow_manifest, tiny_checkpoint, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_ACTOR)
    env = cli_env(PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([CLIP_ETL, *_args(slow_manifest, tmp_path / "out", tiny_checkpoint), "ray.max_retries=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)  # a hang would end here, as a failure
    finally:
        kill_group(proc)
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("clip-etl: error:")]
    assert len(lines) == 1 and "kept dying" in lines[0] and "ray.max_retries" in lines[0], err[-3000:]
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_sigterm_unwinds_the_run_and_releases_the_lease(slow_manifest, tiny_checkpoint, tmp_path):
    """``ray job stop`` / Airflow's on_kill send SIGTERM: the run ends with 143, keeps what it
    committed and releases its output lease, so a retry need not wait for the lease to expire."""
    out = tmp_path / "out"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([CLIP_ETL, *_args(slow_manifest, out, tiny_checkpoint)], stdout=log,
                                stderr=subprocess.STDOUT, env=cli_env(), cwd=str(REPO), start_new_session=True)
        try:
            started = wait_for(lambda: len(_parts(out)) >= 1 or proc.poll() is not None, timeout=400, interval=0.02)
            finished_early = proc.poll() is not None
            assert (out / "_lease.json").exists()
            os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            kill_group(proc)
    text = log_path.read_text()
    assert started and not finished_early, text[-3000:]
    assert rc == 143, text[-3000:]
    assert "terminated (SIGTERM)" in text
    assert not (out / "_lease.json").exists()
    assert not (out / "_SUCCESS").exists() and len(_parts(out)) >= 1

"""The output lease: one live writer per output folder, on local disks and on S3 (a moto server on
loopback), with expiry after a killed run and exactly one winner among racing takers."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline_fixtures import REPO, S3_KEYS, cli_env, s3_client, s3_server, wait_for  # noqa: F401 (fixtures)
from pipelines import storage as pio
from pipelines.etl.lease import (
    LeaseHeldError,
    LeaseInfo,
    LeaseLostError,
    OutputLease,
    boto3_client,
    read_lease,
    stale_temp_files,
    temp_prefix,
)

T0 = 1_000_000.0  # a fake "now", far in the past of the real clock
BUCKET = "leases"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def s3_opts(s3_server) -> pio.S3Options:
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    return pio.S3Options(endpoint_url=s3_server, **S3_KEYS)


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> tuple[str, pio.S3Options | None]:
    """(output, s3 options): a fresh output folder, local or on the moto server."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/out", request.getfixturevalue("s3_opts")


def lease(target, run_id: str, **kw) -> OutputLease:
    output, s3 = target
    return OutputLease(output, s3, run_id=run_id, **kw)


def holder(target) -> str | None:
    info = read_lease(*target)
    return info.run_id if info else None


# --------------------------------------------------------------------------------------------
# create / refuse / release
# --------------------------------------------------------------------------------------------
def test_a_second_run_is_refused_with_the_holder_named(target):
    first = lease(target, "first-run").acquire()
    assert first.path == pio.join(target[0], "_lease.json")
    with pytest.raises(LeaseHeldError) as err:
        lease(target, "second-run").acquire()
    msg = str(err.value)
    for part in ("first-run", socket.gethostname(), str(os.getpid()), first.path, "expires in"):
        assert part in msg
    assert err.value.holder.run_id == "first-run"
    assert holder(target) == "first-run"

    first.release()
    assert read_lease(*target) is None
    second = lease(target, "second-run").acquire()
    assert holder(target) == "second-run"
    second.release()


def test_context_manager_acquires_heartbeats_and_releases(target):
    with lease(target, "ctx", timeout_s=30) as held:
        assert holder(target) == "ctx"
        assert held._thread is not None and held._thread.is_alive()
        held.check()
    assert read_lease(*target) is None
    assert held._thread is None


# --------------------------------------------------------------------------------------------
# expiry and takeover
# --------------------------------------------------------------------------------------------
def test_an_expired_lease_is_taken_over_and_the_old_holder_loses_it(target):
    old = lease(target, "old-run", timeout_s=10, clock=Clock(T0)).acquire()
    with pytest.raises(LeaseHeldError, match=r"expires in 5\.0s"):
        lease(target, "new-run", clock=Clock(T0 + 5)).acquire()  # still live

    new = lease(target, "new-run", clock=Clock(T0 + 11)).acquire()
    assert holder(target) == "new-run"
    with pytest.raises(LeaseLostError, match="new-run"):
        old.renew()
    with pytest.raises(LeaseLostError):
        old.check()

    old.release()  # must not delete the new holder's lease
    assert holder(target) == "new-run"
    new.release()
    assert read_lease(*target) is None


def test_release_after_an_unnoticed_takeover_keeps_the_new_lease(target):
    old = lease(target, "old-run", timeout_s=10, clock=Clock(T0)).acquire()
    new = lease(target, "new-run", clock=Clock(T0 + 11)).acquire()
    old.release()  # old never renewed, so it has not learned that it lost the lease
    assert holder(target) == "new-run"
    new.release()
    assert read_lease(*target) is None


def test_the_heartbeat_thread_notices_a_takeover(target):
    old = lease(target, "old-run", timeout_s=10, heartbeat_s=0.05, clock=Clock(T0)).acquire()
    old.start_heartbeat()
    time.sleep(0.2)
    old.check()  # renewing fine so far
    new = lease(target, "new-run", clock=Clock(T0 + 100)).acquire()
    assert wait_for(lambda: old.lost is not None, timeout=5)
    with pytest.raises(LeaseLostError, match="new-run"):
        old.check()
    old.release()
    assert holder(target) == "new-run"
    new.release()


def test_the_heartbeat_keeps_a_lease_alive_past_its_timeout(target):
    held = lease(target, "alive", timeout_s=1, heartbeat_s=0.2)
    with held:
        time.sleep(2)
        with pytest.raises(LeaseHeldError, match="alive"):
            lease(target, "intruder").acquire()
        held.check()
        assert time.time() - read_lease(*target).heartbeat_at < 0.6


def test_check_fails_once_renewals_stop_for_the_timeout(tmp_path):
    clock = Clock(T0)
    held = OutputLease(str(tmp_path), timeout_s=10, run_id="stalled", clock=clock).acquire()
    clock.t += 9
    held.check()
    clock.t += 2
    with pytest.raises(LeaseLostError, match="not renewed"):
        held.check()
    held.renew()  # nobody took it: renewing makes it good again
    held.check()


def test_a_renew_whose_reply_was_lost_still_counts_as_ours(target):
    held = lease(target, "flaky", clock=Clock(T0)).acquire()
    held._version = ("lost", 0.0) if target[1] is None else '"0000"'  # as if our last write's reply was lost
    held.renew()
    held.release()
    assert read_lease(*target) is None


# --------------------------------------------------------------------------------------------
# races and dead processes
# --------------------------------------------------------------------------------------------
@pytest.fixture
def atomic_moto(monkeypatch):
    """moto checks If-Match/If-None-Match and then writes, without a lock, while its server
    handles requests on parallel threads; real S3 decides atomically. Serialize moto's PUT and
    DELETE so the race test exercises our protocol, not moto's check-then-act window."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        def locked(self, _orig=getattr(S3Response, name)):
            with lock:
                return _orig(self)

        monkeypatch.setattr(S3Response, name, locked)


@pytest.mark.parametrize("before", ["expired", "absent"])
def test_racing_takers_have_exactly_one_winner(target, atomic_moto, before):
    if before == "expired":
        lease(target, "dead-run", timeout_s=1, clock=Clock(T0)).acquire()
    takers = [lease(target, f"taker-{i}", timeout_s=30) for i in range(8)]
    start = threading.Barrier(len(takers))
    won, refused = [], []

    def take(t: OutputLease) -> None:
        start.wait()
        try:
            won.append(t.acquire().run_id)
        except LeaseHeldError as e:
            refused.append(e.holder.run_id)

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert len(won) == 1, won
    assert refused == won * 7  # every loser names the winner
    assert holder(target) == won[0]
    if target[1] is None:  # no temp or moved-away files left behind
        assert sorted(os.listdir(target[0])) == ["_lease.json", "_lease.json.lock"]


HOLDER = """
import sys, time
from pipelines.etl.lease import OutputLease
lease = OutputLease(sys.argv[1], run_id="victim", timeout_s=1, heartbeat_s=0.2)
with lease:
    print("held", flush=True)
    time.sleep(60)
"""


def _killed_holder(out: str) -> int:
    """Run a real process that holds the lease of ``out`` and heartbeats, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out], cwd=str(REPO), env=cli_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        time.sleep(0.5)  # a few heartbeats
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    return proc.pid


def test_a_sigkilled_local_run_is_taken_over_at_once(tmp_path):
    """Same host, process gone: a resume right after ``kill -9`` need not wait for the timeout."""
    out = str(tmp_path / "out")
    _killed_holder(out)
    OutputLease(out, run_id="resume").acquire()
    assert holder((out, None)) == "resume"


def test_the_lease_of_a_sigkilled_run_on_another_host_expires(tmp_path):
    out = str(tmp_path / "out")
    pid = _killed_holder(out)
    lease_file = os.path.join(out, "_lease.json")
    doc = json.loads(open(lease_file).read())
    doc["host"] = "another-host"  # its process cannot be checked from here: only the timeout tells
    with open(lease_file, "w") as f:
        json.dump(doc, f)
    killed_at = time.monotonic()

    with pytest.raises(LeaseHeldError) as err:
        OutputLease(out, run_id="resume").acquire()
    assert err.value.holder.run_id == "victim" and err.value.holder.pid == pid

    def try_acquire() -> bool:
        try:
            OutputLease(out, run_id="resume").acquire()
            return True
        except LeaseHeldError:
            return False

    assert wait_for(try_acquire, timeout=5, interval=0.1)
    assert time.monotonic() - killed_at > 0.3  # waited for the expiry
    assert holder((out, None)) == "resume"


# --------------------------------------------------------------------------------------------
# odds and ends
# --------------------------------------------------------------------------------------------
def test_an_unreadable_lease_blocks_until_its_mtime_is_old(tmp_path):
    path = tmp_path / "_lease.json"
    path.write_bytes(b'{"run_id": "torn')
    with pytest.raises(LeaseHeldError, match="unreadable"):
        OutputLease(str(tmp_path), run_id="next").acquire()
    os.utime(path, (T0, T0))
    OutputLease(str(tmp_path), run_id="next").acquire()
    assert holder((str(tmp_path), None)) == "next"


def test_lease_held_error_survives_pickling():
    info = LeaseInfo("r1", "h", 7, "2026-01-01T00:00:00Z", T0, 60.0, "tok")
    err = pickle.loads(pickle.dumps(LeaseHeldError("/o/_lease.json", info, T0 + 1)))
    assert err.holder == info and "r1" in str(err) and "59.0s" in str(err)


def test_stale_temp_files_lists_only_other_runs():
    names = [
        f"{temp_prefix('run-a')}1234.parquet",
        f"results/{temp_prefix('run-a')}99",
        f"{temp_prefix('run-b')}5678.parquet",
        f"s3://b/out/results/{temp_prefix('run-a-2')}x",  # ambiguous (run "run-a-2" or "run-a"): kept
        ".tmp-abc123",  # older writers: no run id
        "part-00001.parquet",
        "_lease.json",
    ]
    assert stale_temp_files(names, "run-a") == [names[2], ".tmp-abc123"]
    assert stale_temp_files(names, "run-b") == [names[0], names[1], names[3], ".tmp-abc123"]


def test_boto3_client_follows_s3_options():
    from botocore import UNSIGNED

    client = boto3_client(pio.S3Options(endpoint_url="http://127.0.0.1:9", region="eu-west-1", anonymous=True))
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.config.signature_version is UNSIGNED

"""One writer per output folder: a lease file ``OUTPUT/_lease.json`` with a heartbeat.

Two ``clip-etl run`` processes writing into one output (an Airflow retry while the first attempt
still runs) would interleave parts and manifests. The first run creates the lease and rewrites its
``heartbeat_at`` every ``heartbeat_s``; a second run finds a live lease and is refused at once
(:class:`LeaseHeldError` names the holder). A killed run stops heartbeating, so after its
``timeout_s`` the lease is *expired* and a later run (a resume) takes it over.

Every change is a compare-and-swap, so of several racing runs exactly one wins:

* **S3**: conditional PUTs. ``If-None-Match: *`` creates the lease only if it is absent;
  ``If-Match: <etag>`` renews it, or takes over an expired one, only if it is still the version
  we read; ``DeleteObject`` with ``If-Match`` releases it only if it is still ours. A 412/409
  answer means someone else wrote first; we re-read and compare the holder's ``token`` (unique to
  one acquisition), because botocore retries a PUT whose answer was lost, and the retry fails
  with 412 although our first attempt succeeded. The moto server used in the tests (5.2.5)
  implements all three conditions, though it checks and writes without a lock between them.
* **Local disks**: the lease appears whole and only if absent with ``os.link(tmp, path)``; a
  renew re-reads the file and ``os.replace``-s it only if it still holds our token; a takeover
  renames the expired file away, checks that what it moved is the expired lease it read (not a
  fresher one somebody just created, which it puts back), then links its own. Each of these
  read-check-write sequences runs under ``flock`` on ``_lease.json.lock``, which the kernel drops
  when a process dies, so they cannot interleave. Where ``flock`` is unavailable (no ``fcntl``)
  two small windows stay: a renew that read "ours" just before a takeover overwrites the new
  holder, and a third run may create the lease while a losing taker holds a fresh lease it
  moved away. Both need the old lease to have gone unrenewed for its whole timeout (many
  heartbeats), and the loser finds out at its next renew.

Expiry compares the reader's clock with the writer's ``heartbeat_at``: hosts sharing an output
need clocks in sync to well within ``timeout_s`` (NTP is plenty for the default 60 s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from pipelines import storage as pio

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
TEMP_PREFIX = ".tmp-"


class LeaseHeldError(RuntimeError):
    """Another live run holds the output."""

    def __init__(self, path: str, holder: LeaseInfo, now: float):
        self.path, self.holder, self.now = path, holder, now
        age = now - holder.heartbeat_at
        left = max(0.0, holder.timeout_s - age)
        super().__init__(
            f"output is in use by run {holder.run_id!r} (host {holder.host}, pid {holder.pid}, "
            f"started {holder.started_at}, last heartbeat {age:.1f}s ago); lease {path} expires "
            f"in {left:.1f}s if that run is dead. Stop that run or wait, then retry."
        )

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return type(self), (self.path, self.holder, self.now)


class LeaseLostError(RuntimeError):
    """Our lease was taken over (or went unrenewed past its timeout): stop writing."""


@dataclass
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    started_at: str  # ISO 8601, UTC
    heartbeat_at: float  # unix time of the last renew
    timeout_s: float
    token: str = field(default="", repr=False)  # unique per acquisition; run ids may repeat

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, mtime: float) -> LeaseInfo:
        """A lease that cannot be parsed counts as held until ``mtime`` + 60 s, so a torn file
        never lets two runs in but does not block the output forever either."""
        try:
            d = json.loads(data)
            return cls(str(d["run_id"]), str(d["host"]), int(d["pid"]), str(d["started_at"]),
                       float(d["heartbeat_at"]), float(d["timeout_s"]), str(d.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return cls("<unreadable lease>", "?", 0, "?", mtime, 60.0, "")


def is_live(info: LeaseInfo, now: float) -> bool:
    return now - info.heartbeat_at <= info.timeout_s


def holder_is_gone(info: LeaseInfo) -> bool:
    """True when the holder ran on this host and its process no longer exists.

    A ``kill -9`` of a local run can then be resumed at once instead of after the timeout. Used
    for local outputs only: two machines sharing an S3 output may share a host name, and a
    wrong "gone" would let two writers in, while a wrong "alive" only waits for the timeout.
    """
    if info.host != socket.gethostname() or info.pid <= 0:
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def lease_path(output: str) -> str:
    return pio.join(str(output).rstrip("/"), LEASE_NAME)


def read_lease(output: str, s3: pio.S3Options | None = None) -> LeaseInfo | None:
    return _store(lease_path(output), s3).read()[0]


def temp_prefix(run_id: str) -> str:
    """Prefix of a run's temp files (``.tmp-<run_id>-<random>``), so cleanup can tell runs apart."""
    return f"{TEMP_PREFIX}{run_id}-"


def stale_temp_files(names: list[str], live_run_id: str) -> list[str]:
    """Temp files (names or paths) that do not belong to ``live_run_id``.

    Call it only while holding the lease: then no other run is live, so its temp files are
    leftovers. Unprefixed ``.tmp-*`` names (older writers) count as stale too.
    """
    mine = temp_prefix(live_run_id)
    out = []
    for name in names:
        base = str(name).rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(TEMP_PREFIX) and not base.startswith(mine):
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------
# Storage: read, and three compare-and-swap writes. A "version" identifies what was read.
# --------------------------------------------------------------------------------------------
class _LocalStore:
    def __init__(self, path: str):
        self.path = pio.strip_scheme(path)

    @staticmethod
    def _read(path: str) -> tuple[LeaseInfo | None, Any]:
        try:
            with open(path, "rb") as f:
                info = LeaseInfo.parse(f.read(), os.fstat(f.fileno()).st_mtime)
        except FileNotFoundError:
            return None, None
        return info, (info.token, info.heartbeat_at)

    def read(self) -> tuple[LeaseInfo | None, Any]:
        return self._read(self.path)

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: rely on link/rename alone (see the module docstring)
            yield
            return
        with open(self.path + ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _temp(self, info: LeaseInfo) -> str:
        tmp = f"{self.path}.{info.token}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(info.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _link(self, info: LeaseInfo) -> bool:
        tmp = self._temp(info)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network filesystems): exclusive create
            try:
                with open(self.path, "xb") as f:
                    f.write(info.to_bytes())
                return True
            except FileExistsError:
                return False
        finally:
            os.unlink(tmp)

    def create(self, info: LeaseInfo) -> Any:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._mutex():
            return (info.token, info.heartbeat_at) if self._link(info) else None

    def swap(self, info: LeaseInfo, expected: Any, takeover: bool) -> Any:
        with self._mutex():
            if self.read()[1] != expected:
                return None
            if takeover:
                return self._take_over(info, expected)
            os.replace(self._temp(info), self.path)
            return info.token, info.heartbeat_at

    def _take_over(self, info: LeaseInfo, expected: Any) -> Any:
        moved = f"{self.path}.expired-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return None
        if self._read(moved)[1] != expected:  # a fresher lease: give it back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
            os.unlink(moved)
            return None
        os.unlink(moved)
        return (info.token, info.heartbeat_at) if self._link(info) else None

    def delete(self, expected: Any) -> bool:
        with self._mutex():
            if self.read()[1] != expected:
                return False
            os.unlink(self.path)
            return True


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def boto3_client(s3: pio.S3Options | None = None):
    """A boto3 S3 client configured like the project's s3fs (same endpoint, keys, retries).

    Clients are thread-safe and slow to build, so one is kept per resolved configuration (and
    process: a client's connections must not cross a fork)."""
    opts = (s3 or pio.S3Options()).storage_options()
    key = json.dumps([os.getpid(), opts], sort_keys=True, default=str)
    with _clients_lock:  # boto3 sessions are not thread-safe; build clients one at a time
        if key not in _clients:
            _clients[key] = _new_client(opts)
        return _clients[key]


def _new_client(opts: dict[str, Any]):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(**opts.get("config_kwargs", {}))
    if opts.get("anon"):
        config = config.merge(Config(signature_version=UNSIGNED))
    client = boto3.session.Session().client("s3", aws_access_key_id=opts.get("key"),
                                            aws_secret_access_key=opts.get("secret"),
                                            aws_session_token=opts.get("token"), config=config,
                                            **opts.get("client_kwargs", {}))
    client.meta.events.register("response-received.s3", pio.count_s3_response)
    return client


class _S3Store:
    def __init__(self, path: str, s3: pio.S3Options | None):
        self.bucket, self.key = pio.strip_scheme(path).split("/", 1)
        self.client = boto3_client(s3)

    @staticmethod
    def _code(err: Exception) -> tuple[int | None, str]:
        r = getattr(err, "response", {})
        return r.get("ResponseMetadata", {}).get("HTTPStatusCode"), r.get("Error", {}).get("Code", "")

    def _conflict(self, err: Exception) -> bool:
        """412: not the version we read; 409: a concurrent write; NoSuchKey: deleted meanwhile."""
        status, code = self._code(err)
        return status in (409, 412) or code == "NoSuchKey"

    def read(self) -> tuple[LeaseInfo | None, Any]:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return LeaseInfo.parse(r["Body"].read(), r["LastModified"].timestamp()), r["ETag"]

    def _put(self, info: LeaseInfo, **cond: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=info.to_bytes(),
                                       ContentType="application/json", **cond)
        except ClientError as e:
            if self._conflict(e):
                return None
            raise
        return r["ETag"]

    def create(self, info: LeaseInfo) -> Any:
        return self._put(info, IfNoneMatch="*")

    def swap(self, info: LeaseInfo, expected: Any, takeover: bool) -> Any:
        return self._put(info, IfMatch=expected)

    def delete(self, expected: Any) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=expected)
            return True
        except ClientError as e:
            if self._conflict(e):
                return False
            if self._code(e)[1] != "NotImplemented":
                raise
        # a server without conditional deletes: the caller has just read that the lease is ours
        self.client.delete_object(Bucket=self.bucket, Key=self.key)
        return True


def _store(path: str, s3: pio.S3Options | None) -> _LocalStore | _S3Store:
    return _S3Store(path, s3) if pio.is_s3(path) else _LocalStore(path)


# --------------------------------------------------------------------------------------------
# The lease
# --------------------------------------------------------------------------------------------
class OutputLease:
    """Exclusive, expiring ownership of an output folder; use as ``with OutputLease(out) as lease:``
    and call ``lease.check()`` before each commit."""

    def __init__(
        self,
        output: str,
        s3: pio.S3Options | None = None,
        *,
        timeout_s: float = 60.0,
        heartbeat_s: float | None = None,
        run_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if run_id is not None and (not run_id or "/" in run_id or os.sep in run_id):
            raise ValueError(f"run_id must be a non-empty name without path separators, not {run_id!r}")
        self.output = str(output)
        self.path = lease_path(self.output)
        self.run_id = run_id or pio.unique_suffix()
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else self.timeout_s / 4
        if not 0 < self.heartbeat_s < self.timeout_s:  # else the lease expires between beats
            raise ValueError(f"need 0 < heartbeat_s < timeout_s, got {self.heartbeat_s} and {self.timeout_s}")
        self.clock = clock
        self.lost: LeaseLostError | None = None
        self._store = _store(self.path, s3)
        self._local = not pio.is_s3(self.path)
        self._info = LeaseInfo(self.run_id, socket.gethostname(), os.getpid(),
                               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), 0.0, self.timeout_s,
                               uuid.uuid4().hex)
        self._version: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._version is not None

    def _stamped(self) -> LeaseInfo:
        return LeaseInfo(**{**asdict(self._info), "heartbeat_at": self.clock()})

    def _won(self, info: LeaseInfo, version: Any) -> bool:
        if version is not None:
            self._info, self._version = info, version
        return version is not None

    def acquire(self) -> OutputLease:
        """Create the lease, or take over an expired one; refuse a live one.

        A failed compare-and-swap means another run moved first: look again, so a loser reports
        the winner (or retries if the winner has already released)."""
        with self._lock:
            for _ in range(5):
                info, version = self._store.read()
                mine = self._stamped()
                if info is not None and info.token == self._info.token:
                    won = self._won(info, version)  # our own write whose reply was lost
                elif info is None:
                    won = self._won(mine, self._store.create(mine))
                elif is_live(info, self.clock()) and not (self._local and holder_is_gone(info)):
                    raise LeaseHeldError(self.path, info, self.clock())
                else:
                    log.warning("taking over the lease of run %s (expired, or its process is gone) at %s",
                                info.run_id, self.path)
                    won = self._won(mine, self._store.swap(mine, version, takeover=True))
                if won:
                    return self
            raise RuntimeError(f"lease {self.path} kept changing while run {self.run_id!r} tried to acquire it")

    def renew(self) -> None:
        """Push ``heartbeat_at`` forward, unless the lease has become someone else's."""
        with self._lock:
            if self._version is None:
                raise LeaseLostError(f"lease {self.path} is not held by run {self.run_id!r}")
            for _ in range(2):
                mine = self._stamped()
                if self._won(mine, self._store.swap(mine, self._version, takeover=False)):
                    return
                info, version = self._store.read()
                if info is None or info.token != self._info.token:
                    self._version = None
                    raise LeaseLostError(self._lost_message(info))
                self._won(info, version)  # our previous renew landed but its reply was lost
            raise LeaseLostError(f"lease {self.path} keeps changing under run {self.run_id!r}")

    def _lost_message(self, info: LeaseInfo | None) -> str:
        who = "deleted" if info is None else f"taken over by run {info.run_id!r} (host {info.host}, pid {info.pid})"
        return f"lease {self.path} of run {self.run_id!r} was {who}; stop writing to this output"

    def start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Transient storage errors are retried at the next beat; only a lost lease stops it
        (and if errors last past the timeout, :meth:`check` notices the lease has expired)."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLostError as e:
                self.lost = e
                return
            except Exception as e:  # noqa: BLE001 - keep beating through a flaky network
                log.warning("lease heartbeat for %s failed: %s", self.path, e)

    def check(self) -> None:
        """Raise if the lease is no longer ours, or went unrenewed so long that it may be taken."""
        if self.lost is not None:
            raise self.lost
        if self._version is None:
            raise LeaseLostError(f"lease {self.path} is not held by run {self.run_id!r}")
        age = self.clock() - self._info.heartbeat_at
        if age > self.timeout_s:
            raise LeaseLostError(f"lease {self.path} of run {self.run_id!r} was not renewed for "
                                 f"{age:.1f}s (timeout {self.timeout_s:.1f}s); another run may own it")

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)
            self._thread = None

    def release(self) -> None:
        """Stop heartbeating and delete the lease, but never a lease another run took over."""
        self.stop_heartbeat()
        with self._lock:
            if self._version is None:
                return
            self._version = None
            info, version = self._store.read()  # by token: our last renew may have landed unseen
            if info is not None and info.token == self._info.token:
                self._store.delete(version)  # still conditional: a takeover in between survives

    def __enter__(self) -> OutputLease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        """A release that fails while the job is already failing only logs: the job's error is the
        one to see, and an unreleased lease expires by itself."""
        try:
            self.release()
        except Exception:
            if exc_type is None:
                raise
            log.warning("could not release lease %s; it expires in %.0fs", self.path, self.timeout_s,
                        exc_info=True)


__all__ = [
    "LEASE_NAME",
    "LeaseHeldError",
    "LeaseInfo",
    "LeaseLostError",
    "OutputLease",
    "boto3_client",
    "is_live",
    "lease_path",
    "read_lease",
    "stale_temp_files",
    "temp_prefix",
]

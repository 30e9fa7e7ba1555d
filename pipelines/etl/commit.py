"""Stage 5 (on the driver): commit shards from piece metadata, never from rows.

The driver reads the stream of piece metadata that the write tasks return (one small row per
piece file, see :mod:`pipelines.etl.write`), tracks which row ranges of each pending shard are
covered, and when a shard is covered starts its compaction as a Ray task. It holds only
``O(shards + pieces)`` small records: no result row, pixel or embedding passes through it.

It also holds the run to one model: every piece names the encoder that produced it, and a
piece from any other encoder than the one the driver resolved fails the job at once, before
its shard can be committed.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from pipelines import storage as pio
from pipelines.etl.read import Shard
from pipelines.etl.write import compact_shard, part_name


class ModelMismatchError(RuntimeError):
    """An actor ran another encoder than the one the run resolved."""


def encoder_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What must be equal across every actor of a run (the device index may differ)."""
    return {"fingerprint": info.get("fingerprint"), "backend": info.get("backend"),
            "precision": info.get("precision"), "device": str(info.get("device", "")).split(":")[0]}


@dataclass
class _PendingShard:
    shard: Shard
    pieces: list[str] = field(default_factory=list)
    encoders: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)  # the nodes whose write tasks wrote the pieces
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def covered(self) -> bool:
        """True when the union of the piece ranges is the whole shard."""
        reach = self.shard.start
        for start, stop in sorted(self.ranges):
            if start > reach:
                return False
            reach = max(reach, stop)
        return reach >= self.shard.stop


# CPUs a compaction task reserves. It reads a shard's pieces, sorts and writes one part: brief, like
# the write tasks, and it must fit in what CPU actors leave free (ray_runtime.SMALL_TASKS_CPUS):
# with half a CPU it waited until the actors were done, so every shard committed only at the end
# of the run and a run killed before then had committed nothing.
COMMIT_CPUS = 0.1


class ShardCommitter:
    """Track coverage of the pending shards and commit each one as a Ray task once covered."""

    def __init__(self, results_dir: str, pieces_dir: str, shards: list[Shard], schema: pa.Schema, *,
                 expected_encoder: dict[str, Any], tmp_prefix: str, s3: pio.S3Options | None = None,
                 total_rows: int | None = None, done_rows: int = 0, log: Callable[[str], None] | None = None,
                 heartbeat: Callable[[], None] | None = None):
        import ray

        self.results_dir, self.pieces_dir, self.schema, self.s3 = results_dir, pieces_dir, schema, s3
        self.pending = {s.index: _PendingShard(s) for s in shards}
        self.expected = encoder_identity(expected_encoder)
        self.tmp_prefix = tmp_prefix
        self.total_rows, self.done_rows = total_rows, done_rows
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.heartbeat = heartbeat or (lambda: None)
        self.in_flight: dict[Any, int] = {}  # compaction ObjectRef -> shard index
        self.committed: dict[int, dict[str, Any]] = {}  # shard index -> counts from its compaction
        self.stage_seconds: Counter = Counter()
        self.s3_requests: Counter = Counter()  # S3 attempts and transient failures of the workers
        self.nodes: Counter = Counter()  # pieces written per node id
        self.encoders: set[str] = set()
        self.pieces_seen = 0
        self._compact = ray.remote(num_cpus=COMMIT_CPUS, max_retries=3)(compact_shard)
        self.t0 = time.perf_counter()

    def add(self, meta: pa.Table) -> None:
        """Take a batch of piece metadata rows (any mix of shards)."""
        for row in meta.to_pylist():
            self._check_encoder(row["encoder"])
            for stage, sec in json.loads(row["stage_seconds"]).items():
                self.stage_seconds[stage] += sec
            self.s3_requests.update(json.loads(row["s3_requests"] or "{}"))
            self.nodes[row["node"]] += 1
            self.pieces_seen += 1
            sid = row["shard"]
            if sid not in self.pending:
                continue  # a late duplicate of a piece whose shard is already being committed
            pending = self.pending[sid]
            if row["path"] not in pending.pieces:
                pending.pieces.append(row["path"])
                pending.ranges.append((row["start"], row["stop"]))
            pending.encoders.add(row["encoder"])
            pending.nodes.add(row["node"])
            if pending.covered():
                self._submit(self.pending.pop(sid))
        self._collect(timeout=0)

    def _check_encoder(self, encoder_json: str) -> None:
        self.encoders.add(encoder_json)
        try:
            got = json.loads(encoder_json)
        except (TypeError, ValueError):
            got = None
        if not isinstance(got, dict) or encoder_identity(got) != self.expected:
            raise ModelMismatchError(
                f"a model actor ran encoder {encoder_json} but this run resolved {json.dumps(self.expected)}; "
                "every part of an output must come from one encoder")

    def _submit(self, pending: _PendingShard) -> None:
        path = pio.join(self.results_dir, part_name(pending.shard.index))
        provenance = {"encoders": sorted(pending.encoders), "writer_nodes": sorted(pending.nodes)}
        ref = self._compact.remote(pending.shard, pending.pieces, path, self.schema, self.pieces_dir,
                                   provenance, self.tmp_prefix, self.s3)
        self.in_flight[ref] = pending.shard.index

    def _collect(self, timeout: float | None) -> None:
        import ray

        while self.in_flight:
            done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
            if not done:
                return
            sid = self.in_flight.pop(done[0])
            stats = ray.get(done[0])
            self.committed[sid] = stats
            self.stage_seconds["commit"] += stats["seconds"]
            self.s3_requests.update(stats.get("s3_requests", {}))
            self._report(sid, stats)
            self.heartbeat()

    def _report(self, sid: int, stats: dict[str, Any]) -> None:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rows = self.rows_written
        done = self.done_rows + rows
        total = f"/{self.total_rows}" if self.total_rows else ""
        pct = f" ({100.0 * done / self.total_rows:.0f}%)" if self.total_rows else ""
        self.log(f"[clip-etl] committed {part_name(sid)}: {stats['rows']} rows, {stats['error']} errors | "
                 f"{done}{total} rows{pct} | {rows / elapsed:.1f} rows/s")

    @property
    def rows_written(self) -> int:
        return sum(s["rows"] for s in self.committed.values())

    def finish(self) -> None:
        """Wait for the last compactions; every pending shard must have been covered."""
        if self.pending:
            missing = sorted(self.pending)
            got = {s: sum(b - a for a, b in self.pending[s].ranges) for s in missing[:5]}
            raise RuntimeError(f"{len(missing)} shard(s) incomplete after the dataset finished (rows seen: {got})")
        self._collect(timeout=None)


__all__ = ["ModelMismatchError", "ShardCommitter", "encoder_identity"]

"""What the run report shows, read from a job's output with bounded reads only.

An output may hold 100M rows, and the report is built on the driver (or a laptop, for
``clip-etl report``): nothing here reads a whole result column except the fallback label count
of outputs whose ``_run.json`` predates label counts, which streams one small column row group
by row group. Samples come from the first rows of a few parts, error examples from the row
groups whose ``status`` statistics say they hold errors, and curation counts from the small
``keep``/``reason`` columns of ``OUTPUT/dedup/`` and ``OUTPUT/filter/``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage as pio

SAMPLE_ROWS = 24  # rows on the image grid
SAMPLE_PARTS = 4  # parts the sample is spread over
ERROR_EXAMPLES = 3  # example rows per error cause
ERROR_SCAN_ROWS = 2_000_000  # rows of status/error read at most while looking for examples
ERROR_SCAN_PARTS = 200  # parts opened at most while looking for them
CHART_LABELS = 30  # bars on the label chart (the rest as "(other)")
COMBINE_ROWS = 1_000_000  # dedup + filter decisions are joined by id (on the driver) up to this many rows
SAMPLE_COLUMNS = ("id", "label", "label_score", "caption", "clip_score", "text", "status", "error")


@dataclass
class ReportData:
    """Everything the page renders; small by construction."""

    output: str
    run: dict[str, Any]
    index: dict[str, Any] | None
    labels: dict[str, int]
    labels_source: str  # "run record" or "results"
    samples: list[dict[str, Any]]
    image_column: str | None
    error_examples: dict[str, list[dict[str, Any]]]
    curation: dict[str, Any] = field(default_factory=dict)


def result_parts(output: str, s3: pio.S3Options | None) -> list[str]:
    try:
        return pio.list_files(pio.join(output, "results"), suffix=".parquet", s3=s3)
    except FileNotFoundError:
        return []


def _row_groups(path: str, s3: pio.S3Options | None) -> Iterator[tuple[Any, int]]:
    """(ParquetFile, row group index) of one file, its handle closed when the caller moves on."""
    with pio.filesystem_for(path, s3).open_input_file(pio.strip_scheme(path)) as handle:
        pf = pq.ParquetFile(handle)
        for i in range(pf.metadata.num_row_groups):
            yield pf, i


def sample_rows(parts: list[str], s3: pio.S3Options | None, image_column: str | None,
                n: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
    """The first rows of up to :data:`SAMPLE_PARTS` parts spread over the output, ``n`` in all."""
    if not parts:
        return []
    step = max(1, len(parts) // SAMPLE_PARTS)
    chosen = parts[::step][:SAMPLE_PARTS]
    per_part = -(-n // len(chosen))
    rows: list[dict[str, Any]] = []
    for path in chosen:
        _, schema, groups = pio.parquet_metadata(path, s3)
        wanted = [c for c in (*SAMPLE_COLUMNS, image_column) if c and c in schema.names]
        table = pio.read_parquet_rows(path, 0, per_part, columns=list(dict.fromkeys(wanted)), s3=s3,
                                      row_groups=groups)
        rows.extend(table.to_pylist())
    return rows[:n]


def _may_hold_errors(pf: pq.ParquetFile, group: int) -> bool:
    """False only when the row group's ``status`` statistics prove every row is ok."""
    meta = pf.metadata.row_group(group)
    for c in range(meta.num_columns):
        col = meta.column(c)
        if col.path_in_schema == "status" and col.is_stats_set and col.statistics.has_min_max:
            return not (col.statistics.min == "ok" and col.statistics.max == "ok")
    return True


def error_examples(parts: list[str], s3: pio.S3Options | None, causes: dict[str, int],
                   per_cause: int = ERROR_EXAMPLES, scan_rows: int = ERROR_SCAN_ROWS) -> dict[str, list[dict]]:
    """Up to ``per_cause`` (id, error) rows for each cause in ``causes``; stops once every cause
    has its examples, after ``scan_rows`` rows of the two small columns were read, or after
    :data:`ERROR_SCAN_PARTS` parts (a rare cause may have fewer examples, or none)."""
    from pipelines.etl.write import CAUSE_RE

    found: dict[str, list[dict]] = {c: [] for c in causes}
    scanned = 0
    for path in parts[:ERROR_SCAN_PARTS]:
        for pf, group in _row_groups(path, s3):
            if all(len(v) >= per_cause for v in found.values()) or scanned >= scan_rows:
                return found
            if not _may_hold_errors(pf, group):
                continue
            table = pf.read_row_group(group, columns=["id", "status", "error"])
            scanned += table.num_rows
            for row in table.filter(pc.equal(table.column("status"), "error")).to_pylist():
                for cause in CAUSE_RE.findall(row["error"] or "") or ["row.unknown"]:
                    bucket = found.setdefault(cause, [])
                    if len(bucket) < per_cause:
                        bucket.append({"id": row["id"], "error": row["error"]})
    return found


def label_distribution(run: dict[str, Any], parts: list[str], s3: pio.S3Options | None) -> tuple[dict[str, int], str]:
    """Rows per label: from ``_run.json`` (counted at commit time), else streamed from the
    ``label`` column of each part, one row group at a time."""
    from pipelines.etl.write import label_counts, top_counts

    recorded = (run.get("counts") or {}).get("labels")
    if recorded is not None:
        return top_counts(Counter(recorded), CHART_LABELS), "run record"
    total: Counter = Counter()
    for path in parts:
        for pf, group in _row_groups(path, s3):
            if "label" not in pf.schema_arrow.names:
                return {}, "results"
            total.update(label_counts(pf.read_row_group(group, columns=["label"]).column("label"), CHART_LABELS * 4))
    return top_counts(total, CHART_LABELS), "results"


def _decision_files(folder: str, s3: pio.S3Options | None) -> list[str]:
    """The Parquet files of a curation step, without work or temp folders (``_*``, ``.*``)."""
    base = folder.rstrip("/")
    return [p for p in pio.list_files(folder, suffix=".parquet", s3=s3)
            if not any(part.startswith(("_", ".")) for part in p[len(base):].strip("/").split("/"))]


def _decision_counts(folder: str, s3: pio.S3Options | None) -> tuple[Counter, list[pa.Table]]:
    """Rows per (keep, reason) of a curation output (``keep`` null: not judged), and its
    (id, keep) tables when small enough to join."""
    counts: Counter = Counter()
    ids: list[pa.Table] = []
    rows = 0
    for path in _decision_files(folder, s3):
        for pf, group in _row_groups(path, s3):
            names = pf.schema_arrow.names
            table = pf.read_row_group(group, columns=[c for c in ("id", "keep", "reason") if c in names])
            rows += table.num_rows
            reasons = table.column("reason").to_pylist() if "reason" in names else [None] * table.num_rows
            counts.update(zip(table.column("keep").to_pylist(), reasons))
            if rows <= COMBINE_ROWS and "id" in names:
                ids.append(table.select(["id", "keep"]))
    return counts, ids if rows <= COMBINE_ROWS else []


def curation_summary(output: str, s3: pio.S3Options | None) -> dict[str, Any]:
    """Kept / dropped (by reason) / not judged counts of ``OUTPUT/dedup/`` and ``OUTPUT/filter/``
    when present, and their combined ``keep``: dropped when any step drops the row."""
    out: dict[str, Any] = {}
    tables: dict[str, pa.Table] = {}
    for step, reason_default in (("dedup", "duplicate"), ("filter", "dropped")):
        folder = pio.join(output, step)
        if not pio.exists(folder, s3):
            continue
        try:
            counts, ids = _decision_counts(folder, s3)
        except Exception as e:  # a step still being written, or another layout: say so, never fail
            out[step] = {"error": f"{type(e).__name__}: {e}"}
            continue
        dropped = Counter()
        for (keep, reason), n in counts.items():
            if keep is False:
                dropped[reason or reason_default] += n
        out[step] = {"kept": sum(n for (k, _), n in counts.items() if k), "dropped": sum(dropped.values()),
                     "not_judged": sum(n for (k, _), n in counts.items() if k is None),
                     "dropped_by_reason": dict(dropped.most_common())}
        if ids:
            tables[step] = pa.concat_tables(ids)
    if len(tables) == 2:
        out["combined"] = _combined_keep(tables["dedup"], tables["filter"])
    return out


def _combined_keep(dedup: pa.Table, filt: pa.Table) -> dict[str, int]:
    """Kept when no step drops the row and at least one judged it; dropped when any step does."""
    joined = dedup.rename_columns(["id", "a"]).join(filt.rename_columns(["id", "b"]), "id", join_type="full outer")
    a, b = joined.column("a"), joined.column("b")
    dropped = pc.or_(pc.fill_null(pc.invert(a), False), pc.fill_null(pc.invert(b), False))
    kept = pc.and_(pc.invert(dropped), pc.or_(pc.fill_null(a, False), pc.fill_null(b, False)))
    n_dropped, n_kept = int(pc.sum(dropped).as_py() or 0), int(pc.sum(kept).as_py() or 0)
    return {"kept": n_kept, "dropped": n_dropped, "not_judged": joined.num_rows - n_kept - n_dropped}


def read_index_json(output: str, s3: pio.S3Options | None) -> dict[str, Any] | None:
    path = pio.join(output, "index", "index.json")
    return pio.read_json(path, s3) if pio.exists(path, s3) else None


def gather(output: str, s3: pio.S3Options | None) -> ReportData:
    """The report's data for the job output ``output`` (local or ``s3://``)."""
    run = pio.read_json(pio.join(output, "_run.json"), s3)
    parts = result_parts(output, s3)
    image_column = ((run.get("config") or {}).get("input") or {}).get("image_column")
    labels, source = label_distribution(run, parts, s3) if (run.get("stages") or {}).get("label") else ({}, "")
    causes = (run.get("counts") or {}).get("errors_by_cause") or {}
    return ReportData(output=output, run=run, index=read_index_json(output, s3), labels=labels,
                      labels_source=source, samples=sample_rows(parts, s3, image_column),
                      image_column=image_column, error_examples=error_examples(parts, s3, causes) if causes else {},
                      curation=curation_summary(output, s3))


__all__ = ["ReportData", "curation_summary", "error_examples", "gather", "label_distribution", "sample_rows"]

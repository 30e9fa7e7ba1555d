"""The short table every pipeline run ends with on stderr: what came out, how fast, and where."""

from __future__ import annotations

from typing import Any


def _rate(rows: int, seconds: float | None, unit: str = "rows/s") -> str:
    return f"{rows / seconds:,.1f} {unit}" if seconds else f"- {unit}"


def summary_table(record: dict[str, Any], report_path: str | None = None) -> str:
    """The run record ``record`` as a few aligned lines: rows ok/error by cause, rows/s per
    stage (``process_s`` wall time, then each stage's busy time summed over its workers), and
    the output paths."""
    counts = record.get("counts") or {}
    timings = record.get("timings") or {}
    output = record.get("output") or {}
    rows = int(counts.get("rows_this_run") or 0)
    lines = [("rows", f"{counts.get('rows_out', 0):,} out of {counts.get('rows_in', 0):,} in: "
                      f"{counts.get('ok', 0):,} ok, {counts.get('error', 0):,} error"
                      + (f" ({rows:,} this run)" if rows != counts.get("rows_out") else ""))]
    for cause, n in sorted((counts.get("errors_by_cause") or {}).items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(("  error", f"{cause}: {n:,}"))
    if timings.get("process_s") is not None:
        lines.append(("pipeline", f"{timings['process_s']:.1f}s wall, {_rate(rows, timings['process_s'])}"))
    for stage, busy in (timings.get("stage_busy_s") or {}).items():
        lines.append((f"  {stage}", f"{busy:.2f}s busy, {_rate(rows, busy, 'rows per busy second')}"))
    if timings.get("index_s") is not None:
        lines.append(("index build", f"{timings['index_s']:.1f}s"))
    lines.append(("total", f"{timings.get('total_s', 0):.1f}s"))
    for key in ("results", "index"):
        if output.get(key):
            lines.append((key, str(output[key])))
    if report_path:
        lines.append(("report", report_path))
    width = max(len(k) for k, _ in lines)
    return "\n".join(["[clip-etl] summary"] + [f"  {k.ljust(width)}  {v}" for k, v in lines])


__all__ = ["summary_table"]

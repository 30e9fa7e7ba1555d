"""The run report as one self-contained HTML page: inline CSS, an inline SVG chart, images as
``data:`` URIs and a few lines of inline script, so it opens offline from a mail or a bucket.

Every string that comes from the data (ids, labels, captions, error messages, paths) goes
through :func:`esc`: a caption holding ``<script>`` is shown as text, never run.
"""

from __future__ import annotations

import html
from typing import Any, Iterable

from pipelines.report.gather import ReportData

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666;font-size:13px}.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.card b{display:block;font-size:22px}.card.error b{color:#b00}.card.ok b{color:#070}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #e3e3e3;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f6f6f6}code{font-size:12px;word-break:break-all}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure.sample{width:150px;margin:0;border:1px solid #e3e3e3;border-radius:4px;padding:6px;font-size:12px}
figure.sample img,.placeholder{width:96px;height:96px;object-fit:contain;display:block;margin:0 auto 4px}
.placeholder{background:#eee;color:#888;font-size:11px;text-align:center;line-height:96px}
figure.sample.error{border-color:#e99}figcaption{overflow-wrap:anywhere}.lbl{font-weight:600}.cap{color:#444}
svg text{font-size:12px;font-family:system-ui,sans-serif}
"""

# Marks each image with its decoded width, so a reader (or a test) can tell that it rendered.
SCRIPT = """
for (const img of document.images) {
  const mark = () => { img.dataset.naturalWidth = img.naturalWidth; };
  if (img.complete) mark(); else { img.addEventListener('load', mark); img.addEventListener('error', mark); }
}
document.body.dataset.rendered = '1';
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def table(rows: Iterable[Iterable[Any]], header: Iterable[str] | None = None, cls: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{esc(cls)}'>{head}{body}</table>"


def counts_section(counts: dict[str, Any]) -> str:
    cards = []
    for key, title in (("rows_in", "rows in"), ("rows_out", "rows out"), ("ok", "ok"), ("error", "error"),
                       ("shards", "shards")):
        cards.append(f"<div class='card {key}'><b data-count='{key}'>{esc(counts.get(key, 0))}</b>{esc(title)}</div>")
    return "<h2>Rows</h2><div class='cards' id='counts'>" + "".join(cards) + "</div>"


def errors_section(counts: dict[str, Any], examples: dict[str, list[dict]]) -> str:
    causes = counts.get("errors_by_cause") or {}
    if not causes:
        return "<h2>Errors</h2><p id='errors'>No row failed.</p>"
    rows = []
    for cause, n in sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])):
        ex = "".join(f"<div><code>{esc(e['id'])}</code>: {esc(e['error'])}</div>" for e in examples.get(cause, []))
        rows.append(f"<tr data-cause='{esc(cause)}'><td>{esc(cause)}</td><td data-count='{esc(n)}'>{esc(_fmt(n))}"
                    f"</td><td>{ex}</td></tr>")
    return ("<h2>Errors</h2><table id='errors'><tr><th>cause</th><th>rows</th><th>examples</th></tr>"
            + "".join(rows) + "</table>")


def label_chart(labels: dict[str, int], source: str) -> str:
    """One horizontal bar per label, longest first, as inline SVG."""
    if not labels:
        return ""
    bar_h, gap, label_w, bar_w = 14, 3, 220, 640
    top = max(labels.values()) or 1
    items = sorted(labels.items(), key=lambda kv: (kv[0] == "(other)", -kv[1], kv[0]))
    parts = []
    for i, (name, n) in enumerate(items):
        y = i * (bar_h + gap)
        w = max(1, round(bar_w * n / top))
        parts.append(f"<g class='bar' data-label='{esc(name)}' data-count='{n}'><title>{esc(name)}: {n}</title>"
                     f"<text x='{label_w - 6}' y='{y + 11}' text-anchor='end'>{esc(name[:34])}</text>"
                     f"<rect x='{label_w}' y='{y}' width='{w}' height='{bar_h}' fill='#4a7bd0'/>"
                     f"<text x='{label_w + w + 4}' y='{y + 11}'>{n:,}</text></g>")
    height = len(items) * (bar_h + gap)
    return (f"<h2>Labels</h2><p class='muted'>Predicted label per ok row (counted from the {esc(source)}).</p>"
            f"<svg id='label-chart' xmlns='http://www.w3.org/2000/svg' width='{label_w + bar_w + 70}' "
            f"height='{height}'>{''.join(parts)}</svg>")


def _sample_card(row: dict[str, Any], thumb: tuple[str | None, str]) -> str:
    uri, why = thumb
    img = (f"<img src='{esc(uri)}' alt='{esc(row.get('id'))}'>" if uri
           else f"<div class='placeholder' title='{esc(why)}'>no image</div>")
    lines = [f"<div><code>{esc(row.get('id'))}</code></div>"]
    if row.get("status") == "error":
        lines.append(f"<div class='err'>{esc(row.get('error'))}</div>")
    if row.get("label") is not None:
        score = row.get("label_score")
        lines.append(f"<div class='lbl'>{esc(row['label'])}"
                     + (f" <span class='muted'>{score:.2f}</span>" if isinstance(score, float) else "") + "</div>")
    if row.get("clip_score") is not None:
        lines.append(f"<div class='muted'>clip score {row['clip_score']:.3f}</div>")
    if row.get("caption"):
        lines.append(f"<div class='cap'>{esc(row['caption'])}</div>")
    if row.get("text"):
        lines.append(f"<div class='txt muted'>text: {esc(row['text'])}</div>")
    status = "error" if row.get("status") == "error" else "ok"
    return f"<figure class='sample {status}' data-id='{esc(row.get('id'))}'>{img}<figcaption>{''.join(lines)}</figcaption></figure>"


def samples_section(samples: list[dict[str, Any]], thumbs: list[tuple[str | None, str]]) -> str:
    if not samples:
        return ""
    cards = "".join(_sample_card(r, t) for r, t in zip(samples, thumbs))
    return (f"<h2>Sample rows</h2><p class='muted'>The first rows of a few result parts ({len(samples)}).</p>"
            f"<div class='grid' id='samples'>{cards}</div>")


def curation_section(curation: dict[str, Any]) -> str:
    if not curation:
        return ""
    rows = []
    for step in ("dedup", "filter", "combined"):
        info = curation.get(step)
        if info is None:
            continue
        if "error" in info:
            rows.append((step, "", "", "", f"unreadable: {info['error']}"))
            continue
        reasons = ", ".join(f"{k} {v:,}" for k, v in (info.get("dropped_by_reason") or {}).items())
        rows.append((step, info["kept"], info["dropped"], info["not_judged"], reasons))
    return ("<h2>Curation</h2><p class='muted'>The combined decision drops a row when any step drops it "
            "(not judged: rows a step could not decide, such as failed rows).</p>"
            + table(rows, ("step", "kept", "dropped", "not judged", "dropped by reason"), cls="curation"))


def index_section(index: dict[str, Any] | None) -> str:
    if not index or "factory" not in index:
        return ""
    recall = index.get("recall") or {}
    latency = index.get("latency_ms") or {}
    size = sum(int(s.get("bytes") or 0) for s in index.get("shards") or [])
    rows = [("type", index.get("factory")), ("vectors", index.get("count")), ("dimension", index.get("dim")),
            ("shards", len(index.get("shards") or [])), ("size (MiB)", round(size / 2**20, 2)),
            ("search params", index.get("search_params") or "(none)"),
            ("recall@1 / @10 / @100", " / ".join(_fmt(recall.get(k)) for k in ("1", "10", "100"))),
            ("target recall@10", f"{_fmt(index.get('target_recall'))} (reached: {index.get('target_reached')})"),
            ("latency ms (mean / p99)", f"{_fmt(latency.get('mean'))} / {_fmt(latency.get('p99'))}"),
            ("queries/s", index.get("qps")), ("build seconds", index.get("build_seconds"))]
    return "<h2>Index</h2>" + table(rows, cls="index")


def run_section(run: dict[str, Any]) -> str:
    model = run.get("model") or {}
    timings = run.get("timings") or {}
    ray = run.get("ray") or {}
    meta = [("model", model.get("name")), ("fingerprint", model.get("fingerprint")),
            ("backend", model.get("backend")), ("precision", model.get("precision")),
            ("device", model.get("device")), ("Ray", f"{ray.get('mode')}, {_fmt(ray.get('cpus'))} CPUs, "
                                                     f"{_fmt(ray.get('gpus'))} GPUs, {ray.get('actors')} actor(s)")]
    stage_rows = [(k, v) for k, v in timings.items() if not isinstance(v, dict)]
    busy = timings.get("stage_busy_s") or {}
    rows = (run.get("counts") or {}).get("rows_this_run") or 0
    busy_rows = [(k, v, round(rows / v, 1) if v else None) for k, v in busy.items()]
    return ("<h2>Run</h2>" + table(meta, cls="meta") + "<h3>Timings (s)</h3>" + table(stage_rows, cls="timings")
            + "<h3>Stage busy time (summed over workers)</h3>"
            + table(busy_rows, ("stage", "busy s", "rows per busy s"), cls="stages")
            + "<h3>Versions</h3>" + table(sorted((run.get("versions") or {}).items()), cls="versions"))


def render(data: ReportData, thumbs: list[tuple[str | None, str]]) -> str:
    run = data.run
    counts = run.get("counts") or {}
    title = f"clip-etl report: {data.output}"
    model, timings = run.get("model") or {}, run.get("timings") or {}
    header = (f"<h1>clip-etl run report</h1><div class='muted'><code>{esc(data.output)}</code><br>"
              f"job <b>{esc(run.get('job'))}</b>, status <b id='status'>{esc(run.get('status'))}</b>, run "
              f"{esc(run.get('run_id'))}, {esc(run.get('started_at'))} to {esc(run.get('finished_at'))}<br>"
              f"model <b>{esc(model.get('name'))}</b> ({esc(model.get('fingerprint'))}), {esc(model.get('backend'))}"
              f" {esc(model.get('precision'))} on {esc(model.get('device'))}; {esc(_fmt(timings.get('total_s')))} s"
              f" in all, {esc(_fmt(timings.get('rows_per_s')))} rows/s through the pipeline</div>")
    body = "".join((header, counts_section(counts), errors_section(counts, data.error_examples),
                    label_chart(data.labels, data.labels_source), curation_section(data.curation),
                    samples_section(data.samples, thumbs), index_section(data.index), run_section(run)))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}<script>{SCRIPT}</script></body></html>\n")


__all__ = ["esc", "render"]

"""The run report, rendered by a real headless Chromium, and the summary every run ends with.

One real pipeline run (the bundled demo model on the demo sample data, labels, captions and the
index on) is shared by the module. Its manifest holds a text with markup in it and a missing
image with markup in its path, so the page must show user data as text, and the run has an
error cause with an example row.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import s3_server  # noqa: F401 (fixture)
from pipeline_fixtures import read_results, run_cli, s3_client, s3_overrides
from pipelines.demo.sample_data import generate_sample_set

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
N = 30
XSS_TEXT = "<script>document.body.dataset.xss='text'</script> a red star"
XSS_IMAGE = "images/<img src=x onerror=\"document.body.dataset.xss='error'\">.png"
DEMO_RUN = ["model.checkpoint=demo", "model.precision=fp32", "label.classes=demo", "caption.enabled=true",
            "index.enabled=true", "ray.num_cpus=2", "embed.actors=1"]
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed from the system packages when missing."""
    if not Path(CHROMIUM).exists():
        proc = subprocess.run("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium",
                              shell=True, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not Path(CHROMIUM).exists():
            pytest.fail(f"the report tests need Chromium at {CHROMIUM}; `apt-get install -y chromium` failed "
                        f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return CHROMIUM


def browse(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium process on ``page`` with a fresh profile."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def demo_manifest(folder: Path, n: int) -> Path:
    """The demo sample set with markup in one text and one (missing) image path."""
    manifest = generate_sample_set(folder, n, seed=11, fmt="mixed")
    table = pq.read_table(manifest).to_pydict()
    table["text"][0] = XSS_TEXT
    table["image"][1] = XSS_IMAGE
    pq.write_table(pa.table(table), manifest)
    return manifest


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One ``clip-etl run --quiet`` of the demo; yields (output, _run.json, the process)."""
    tmp = tmp_path_factory.mktemp("report")
    manifest = demo_manifest(tmp / "data", N)
    out = tmp / "out"
    proc = run_cli(["run", "--quiet", f"input.path={manifest}", f"output.path={out}", *DEMO_RUN], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "_run.json").read_text()), proc


def attrs(tag: str) -> dict[str, str]:
    return {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}


def test_report_renders_counts_chart_images_in_chromium(demo_run, chromium, tmp_path):
    out, run, _ = demo_run
    page = out / "report.html"
    assert page.is_file(), "the run wrote no report.html"
    assert (out / "_SUCCESS").is_file()
    dom = browse(tmp_path, page, "--dump-dom").stdout
    assert 'data-rendered="1"' in dom  # the page's own script ran before the DOM was dumped

    counts = run["counts"]
    shown = {k: int(v.replace(",", "")) for k, v in re.findall(r'<b data-count="(\w+)">([^<]*)</b>', dom)}
    assert shown == {k: counts[k] for k in ("rows_in", "rows_out", "ok", "error", "shards")}
    assert counts["error"] == 1 and counts["ok"] == N - 1

    # the chart: one bar per label, with the counts the run recorded, which are the results' own
    bars = {attrs(t)["data-label"]: int(attrs(t)["data-count"]) for t in re.findall(r'<g class="bar"[^>]*>', dom)}
    labels = Counter(r["label"] for r in read_results(out).to_pylist() if r["status"] == "ok")
    assert bars == counts["labels"] and sum(bars.values()) == counts["ok"]
    assert all(labels[name] == n for name, n in bars.items() if name != "(other)")
    assert bars.get("(other)", 0) == sum(labels.values()) - sum(n for k, n in bars.items() if k != "(other)")

    # the grid: 24 sampled rows, every image a decoded data: URI, the missing one a placeholder
    grid = dom[dom.index('id="samples"'):]
    images = [attrs(t) for t in re.findall(r"<img [^>]*>", grid)]
    assert len(images) == 23 and grid.count('class="placeholder"') == 1
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in images)
    assert all(0 < int(a["data-natural-width"]) <= 96 for a in images)

    # user data is text: no markup of the data ran or became an element
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-xss" not in body and dom.count("<script") == 1
    assert html.escape(XSS_TEXT, quote=False) in dom
    errors = dom[dom.index('id="errors"'):dom.index('id="label-chart"')]
    assert 'data-cause="image.missing_file"' in errors and "&lt;img src=x onerror=" in errors

    index = json.loads((out / "index" / "index.json").read_text())
    assert f"<td>{index['factory']}</td>" in dom and "recall@1 / @10 / @100" in dom

    shot = tmp_path / "report.png"
    browse(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,2000")
    from PIL import Image

    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2000)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 200  # text, bars and thumbnails, not a blank page


def test_summary_table_and_quiet(demo_run):
    out, run, proc = demo_run
    err = proc.stderr
    done = err.index("[clip-etl] done:")
    summary = err[err.index("[clip-etl] summary"):]
    assert done < err.index("[clip-etl] summary")
    counts, timings = run["counts"], run["timings"]
    assert f"{N} out of {N} in: {counts['ok']} ok, 1 error" in summary
    assert re.search(r"error\s+image\.missing_file: 1\n", summary)
    wall = f"{timings['process_s']:.1f}s wall, {N / timings['process_s']:,.1f} rows/s"
    assert re.search(rf"pipeline\s+{re.escape(wall)}\n", summary)
    for stage, busy in timings["stage_busy_s"].items():
        per_s = f"{busy:.2f}s busy, " + (f"{N / busy:,.1f}" if busy else "-") + " rows per busy second"
        assert re.search(rf"\n\s+{stage}\s+{re.escape(per_s)}\n", summary), stage
    for path in (out / "results", out / "index", out / "report.html"):
        assert str(path) in summary
    # --quiet: no Ray Data progress, while the done line and the summary still print
    assert "Total Progress" not in err and "logging_progress" not in err


def test_report_cli_and_s3_output(s3_server, tmp_path):
    """A run into S3 writes its report there (thumbnails fetched from S3); ``clip-etl report``
    rebuilds it from the bucket. stderr is not a terminal here, so no progress prints either."""
    client = s3_client(s3_server)
    client.create_bucket(Bucket="data")
    client.create_bucket(Bucket="out")
    manifest = generate_sample_set(tmp_path / "data", 8, seed=3, fmt="jpeg")
    for f in (tmp_path / "data").rglob("*.*"):
        client.put_object(Bucket="data", Key=f"demo/{f.relative_to(tmp_path / 'data')}", Body=f.read_bytes())
    assert manifest.name == "manifest.parquet"
    proc = run_cli(["label", "input.path=s3://data/demo/manifest.parquet", "output.path=s3://out/run",
                    "model.checkpoint=demo", "model.precision=fp32", "label.classes=demo", "ray.num_cpus=2",
                    *s3_overrides(s3_server)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\n\s+report\s+s3://out/run/report\.html", proc.stderr) and "Total Progress" not in proc.stderr
    page = client.get_object(Bucket="out", Key="run/report.html")["Body"].read().decode()
    assert page.count("src='data:image/jpeg;base64,") == 8

    local = tmp_path / "again.html"
    cli = run_cli(["report", "s3://out/run", "-o", str(local), "--s3-endpoint-url", s3_server],
                  AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.strip() == str(local)
    again = local.read_text()
    assert again.count("src='data:image/jpeg;base64,") == 8 and "<b data-count='ok'>8</b>" in again

    missing = run_cli(["report", str(tmp_path / "nothing")])
    assert missing.returncode == 1 and "has no _run.json" in missing.stderr


def test_report_tolerates_missing_images_and_reads_curation(demo_run, tmp_path):
    """Curation decisions (``OUTPUT/dedup/``, ``OUTPUT/filter/``) combine into one keep count;
    an image that cannot be fetched is a placeholder, never a failed report."""
    from pipelines.report import write_report

    src, run, _ = demo_run
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("index"))
    ids = read_results(out).column("id").to_pylist()
    (out / "dedup").mkdir()
    (out / "filter").mkdir()
    dup = [i % 5 == 4 for i in range(N)]  # rows 4, 9, ... are duplicates; row 1 (the failed one) not judged
    low = [i % 3 == 0 for i in range(N)]  # rows 0, 3, ... score too low
    keep = [None if i == 1 else not d for i, d in enumerate(dup)]
    reason = ["status_not_ok" if i == 1 else ("duplicate" if d else "unique") for i, d in enumerate(dup)]
    pq.write_table(pa.table({"id": ids, "cluster": list(range(N)), "group": list(range(N)),
                             "duplicate_of": [ids[i - 1] if d else None for i, d in enumerate(dup)],
                             "max_similarity": [0.99 if d else 0.5 for d in dup], "keep": keep, "reason": reason}),
                   out / "dedup" / "part-00000.parquet")
    (out / "dedup" / "_work").mkdir()  # a step's work files are not its decisions
    pq.write_table(pa.table({"id": ids, "keep": [False] * N}), out / "dedup" / "_work" / "part-00000.parquet")
    pq.write_table(pa.table({"id": ids, "clip_score": [0.1 if x else 0.3 for x in low], "keep": [not x for x in low],
                             "reason": ["below_min_clip_score" if x else None for x in low]}),
                   out / "filter" / "part-00000.parquet")
    record = json.loads((out / "_run.json").read_text())
    record["config"]["input"]["path"] = str(tmp_path / "gone" / "manifest.parquet")  # the images moved away
    (out / "_run.json").write_text(json.dumps(record))

    page = Path(write_report(str(out))).read_text()
    assert page.count("<img ") == 0 and page.count("class='placeholder'") == 24
    assert "<h2>Index</h2>" not in page  # no index folder, no index section
    curation = page[page.index("<h2>Curation</h2>"):]
    both = sum(1 for d, x in zip(dup, low) if d or x)
    assert (f"<td>dedup</td><td>{N - sum(dup) - 1}</td><td>{sum(dup)}</td><td>1</td>"
            f"<td>duplicate {sum(dup)}</td>") in curation
    assert (f"<td>filter</td><td>{N - sum(low)}</td><td>{sum(low)}</td><td>0</td>"
            f"<td>below_min_clip_score {sum(low)}</td>") in curation
    assert f"<td>combined</td><td>{N - both}</td><td>{both}</td><td>0</td>" in curation


def test_report_is_a_cli_tool(capsys):
    from pipelines import cli

    assert cli.main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: clip-etl report") and "--out" in out and "--s3-endpoint-url" in out
    assert cli.main(["run", "--help"]) == 0 and "--quiet" in capsys.readouterr().out


def test_a_failing_report_is_a_warning_not_a_failed_job(tmp_path):
    """The job calls this after ``_run.json``: a report that cannot be built is one warning line."""
    from pipelines.etl.job import write_run_report

    lines: list[str] = []
    assert write_run_report(str(tmp_path / "no-such-output"), None, lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("[clip-etl] warning: the run report could not be written:")
    assert "has no _run.json" in lines[0]

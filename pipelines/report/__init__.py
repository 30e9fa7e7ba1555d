"""The run report: ``OUTPUT/report.html``, written at the end of every run and by ``clip-etl report``.

One self-contained page a person reads instead of ``_run.json``: counts and error causes with
example rows, the label distribution, sampled rows with thumbnails, curation decisions, the
index, and the run's model, timings and versions. Built from small reads only
(:mod:`pipelines.report.gather`), so it costs seconds on an output of any size.
"""

from __future__ import annotations

import argparse
import sys

from pipelines import storage as pio

REPORT_FILE = "report.html"


def write_report(output_path: str, s3: pio.S3Options | None = None, dest: str | None = None) -> str:
    """Build the report of the job output ``output_path`` (local or ``s3://``) and write it to
    ``dest`` (default ``OUTPUT/report.html``); returns where it was written."""
    from pipelines.report.gather import gather
    from pipelines.report.page import render
    from pipelines.report.thumbs import thumbnails

    output = output_path if pio.is_s3(output_path) else pio.strip_scheme(output_path)
    if not pio.exists(pio.join(output, "_run.json"), s3):
        raise FileNotFoundError(f"{output} has no _run.json: not the output of a finished clip-etl job")
    data = gather(output, s3)
    values = [row.get(data.image_column) if data.image_column else None for row in data.samples]
    page = render(data, thumbnails(values, data.run.get("config") or {}, s3))
    dest = dest or pio.join(output, REPORT_FILE)
    pio.write_bytes_atomic(dest, page.encode("utf-8"), s3)
    return dest


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a job's output root (OUTPUT, holding _run.json), local or s3://")
    parser.add_argument("-o", "--out", default=None, help="where to write the page (default OUTPUT/report.html)")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint (default: the AWS environment)")


def run_report(args: argparse.Namespace) -> int:
    s3 = pio.S3Options(endpoint_url=args.s3_endpoint_url) if args.s3_endpoint_url else None
    try:
        path = write_report(args.output, s3, dest=args.out)
    except FileNotFoundError as e:
        print(f"clip-etl: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


__all__ = ["REPORT_FILE", "add_report_arguments", "run_report", "write_report"]

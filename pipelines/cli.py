"""``clip-etl``: the command line of the batch jobs and tools.

Jobs (``run``, ``embed``, ``label``, ``caption``, ``index``, ``dedup OUTPUT``) take ``-c CONFIG``
(optional; the config dataclasses' defaults apply without it) and ``section.key=value`` overrides. Tools
(``search``, ``train``, ``export``, ``demo``, ``manifest``) have their own flags and live in their
own modules, imported only when used, so a missing optional part fails that subcommand alone,
clearly.

Exit status: 0 when the job finished (``_SUCCESS`` written); 2 for a bad command line or config;
1 for any other job-level failure. Failures print one ``clip-etl: error: ...`` line on stderr
(set ``CLIP_ETL_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

JOB_HELP = {
    "run": "the whole pipeline: manifest -> embeddings, labels, captions -> Parquet results -> index",
    "embed": "embeddings only (labels, captions and index off)",
    "label": "embeddings and zero-shot labels",
    "caption": "embeddings and captions",
    "index": "build OUTPUT/index/ from the existing OUTPUT/results/",
    "dedup": "semantic dedup of the existing OUTPUT/results/ into OUTPUT/dedup/",
}

# subcommand -> (module, add-arguments function, run function, help)
TOOLS: dict[str, tuple[str, str, str, str]] = {
    "search": ("pipelines.index.search_cli", "add_search_arguments", "run_search", "search an index built by a job"),
    "train": ("pipelines.train.job", "add_train_arguments", "run_train", "train or fine-tune a CLIP model"),
    "export": ("clip_core.export", "add_export_arguments", "run_export", "export a model to ONNX / int8 / TorchScript"),
    "demo": ("pipelines.demo.run", "add_demo_arguments", "run_demo", "run the bundled demo end to end"),
    "manifest": ("pipelines.manifest", "add_manifest_arguments", "run_manifest",
                 "write a manifest Parquet listing a folder of images (local or s3://)"),
    "report": ("pipelines.report", "add_report_arguments", "run_report",
               "write a job output's HTML run report (OUTPUT/report.html)"),
}


def _error(message: str, code: int) -> int:
    line = " ".join(str(message).split())  # one line, whatever the exception text held
    print(f"clip-etl: error: {line}", file=sys.stderr, flush=True)
    if os.environ.get("CLIP_ETL_DEBUG"):
        traceback.print_exc()
    return code


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a job unwinds like an interrupt.

    ``ray job stop``, Airflow's ``on_kill`` and a pod's shutdown all send SIGTERM. Python's default
    for it ends the process on the spot, leaving the output lease held until it expires
    (``output.lease_timeout_s``), so the retry that follows would wait for it; unwound, the run
    releases its lease and stops its embedded Ray, and the retry resumes at once.
    """


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (plus usage) and exit 2 as usual."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"clip-etl: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_job(sub, name: str) -> None:
    p = sub.add_parser(name, help=JOB_HELP[name], description=JOB_HELP[name])
    if name in OUTPUT_JOBS:
        p.add_argument("output", help="the job's output root (sets output.path), local or s3://")
    p.add_argument("-c", "--config", help="YAML config (conf/*.yaml); without it the built-in defaults apply")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. input.path=s3://bucket/manifest.parquet model.backend=onnx")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (also the default when stderr is not a terminal); results, the "
                        "done line, the summary and errors still print")
    p.set_defaults(kind="job", job=name)


# Jobs over an existing output, named by a positional OUTPUT instead of output.path=...
OUTPUT_JOBS = ("dedup",)


def _load_tool(name: str):
    module_name, add_name, run_name, _ = TOOLS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RuntimeError(f"the {name!r} command is not available in this installation ({module_name}: {e})") from e
    add = getattr(module, add_name, None)
    run = getattr(module, run_name, None)
    if add is None or run is None:
        raise RuntimeError(f"the {name!r} command is not available in this installation ({module_name} lacks {run_name})")
    return add, run


def build_parser(tool: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the tool named in ``tool`` gets its real arguments (lazy import)."""
    parser = _Parser(prog="clip-etl", description="Batch CLIP on Ray Data: embeddings, zero-shot labels, "
                     "captions and sharded FAISS indexes from Parquet manifests.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in JOB_HELP:
        _add_job(sub, name)
    for name, (_, _, _, help_text) in TOOLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == tool:
            add, run = _load_tool(name)
            add(p)
            p.set_defaults(kind="tool", tool_run=run)
        else:
            p.set_defaults(kind="tool", tool_run=None)
    return parser


def _run_job(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, apply_job, load_config, to_yaml

    overrides = list(args.overrides)
    if getattr(args, "output", None) is not None:
        overrides.append(f"output.path={args.output}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        return _error(e, 2)
    if args.print_config:
        print(to_yaml(apply_job(cfg, args.job)), end="")
        return 0
    try:
        from pipelines.etl.job import JobError, run_job
    except ImportError as e:
        return _error(f"cannot import the pipeline: {e}", 1)
    try:
        with _sigterm_unwinds():
            run_job(cfg, args.job, progress=not (args.quiet or not sys.stderr.isatty()))
    except Terminated:
        return _error("terminated (SIGTERM); committed shards are kept and a re-run resumes", 143)
    except ConfigError as e:
        return _error(e, 2)
    except JobError as e:
        return _error(e, 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except Exception as e:  # anything unexpected is still a job failure, reported in one line
        return _error(f"{type(e).__name__}: {e}", 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    tool = command if command in TOOLS else None
    try:
        parser = build_parser(tool)
    except RuntimeError as e:
        return _error(e, 2)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.kind == "job":
        return _run_job(args)
    run: Callable[[argparse.Namespace], int] = args.tool_run
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except Exception as e:
        return _error(f"{type(e).__name__}: {e}", 1)


if __name__ == "__main__":
    sys.exit(main())

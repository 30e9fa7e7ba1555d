"""``clip-etl search``: query an index built by a job, from a text, an image, a stored id or a vector.

Texts and images are encoded with the model recorded in ``index.json`` (or ``--model``), so the
query lands in the same embedding space as the indexed vectors. ``--id`` and ``--vector`` need no
model at all. Hits are joined by id with the job's results Parquet, when it is still readable, to
show the image, caption and label next to each score.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipelines import storage as pio
from pipelines.storage import S3Options

# Result columns worth showing next to a hit (whichever the results hold).
METADATA_COLUMNS = ("image", "text", "caption", "label", "label_score")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clip-etl search``."""
    parser.add_argument("index_dir", help="index directory (OUTPUT/index, or the job output OUTPUT), local or s3://")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find images (or texts) matching this text")
    query.add_argument("--image", help="find items similar to this image file (local path or s3://)")
    query.add_argument("--id", dest="query_id", help="find items similar to an indexed item")
    query.add_argument("--vector", help=".npy file with a query embedding [D] or queries [Q, D]")
    parser.add_argument("-k", "--k", type=int, default=10, help="number of hits (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per hit, best first")
    parser.add_argument("--model", help="checkpoint or export directory to encode the query with "
                        "(default: the model recorded in index.json)")
    parser.add_argument("--backend", default="torch", help="encoder backend for --text/--image (default torch)")
    parser.add_argument("--params", help="override the tuned search parameters, e.g. nprobe=64 or efSearch=256")
    parser.add_argument("--no-metadata", action="store_true", help="do not read the results Parquet for metadata")
    parser.add_argument("--no-mmap", action="store_true", help="read the index into memory instead of mapping it")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint (default: the AWS environment)")


def _model_source(meta: dict[str, Any], override: str | None) -> str:
    if override:
        return override
    model = meta.get("model") or {}
    for key in ("checkpoint", "source", "path", "name"):
        value = model.get(key) if isinstance(model, dict) else None
        if value and not str(value).startswith("<"):
            return str(value)
    raise ValueError("index.json does not record a loadable model for this index; pass --model CHECKPOINT")


def encode_query(args: argparse.Namespace, meta: dict[str, Any]) -> np.ndarray:
    """The query embedding(s) ``[Q, D]`` for --text / --image / --vector."""
    if args.vector:
        vec = np.load(args.vector)
        return np.atleast_2d(np.asarray(vec, dtype=np.float32))
    from clip_core.encoders import load_encoder  # imported here: --id / --vector work without the model stack

    source = _model_source(meta, args.model)
    print(f"[search] encoding the query with {source}", file=sys.stderr)
    encoder = load_encoder(source, backend=args.backend)
    if args.text is not None:
        return np.atleast_2d(np.asarray(encoder.encode_texts([args.text]), dtype=np.float32))
    from clip_core.preprocess import load_image

    image = load_image(pio.read_bytes(args.image, _s3(args)) if pio.is_s3(args.image) else args.image)
    pixels = encoder.preprocess(image)
    batch = pixels.unsqueeze(0) if hasattr(pixels, "unsqueeze") else np.expand_dims(np.asarray(pixels), 0)
    return np.atleast_2d(np.asarray(encoder.encode_images(batch), dtype=np.float32))


def _s3(args: argparse.Namespace) -> S3Options | None:
    endpoint = getattr(args, "s3_endpoint_url", None)
    return S3Options(endpoint_url=endpoint) if endpoint else None


def _printable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return round(value, 6)
    return value


def lookup_metadata(meta: dict[str, Any], ids: Sequence[str], s3: S3Options | None) -> dict[str, dict[str, Any]]:
    """``id -> {column: value}`` for the hits, read from the results Parquet with an id filter.

    Returns ``{}`` when the results are gone or hold none of the metadata columns: search still
    works without them.
    """
    source = meta.get("source") or {}
    files = source.get("files")
    root = meta.get("results_path") or source.get("path")
    if not ids or not (files or root):
        return {}
    id_col = source.get("id_column", meta.get("id_column", "id"))
    try:
        files = files or pio.list_files(root, ".parquet", s3)
        fs = pio.filesystem_for(files[0], s3)
        dataset = pads.dataset([pio.strip_scheme(f) for f in files], format="parquet", filesystem=fs)
        names = dataset.schema.names
        cols = [c for c in METADATA_COLUMNS if c in names]
        if not cols or id_col not in names:
            return {}
        id_type = dataset.schema.field(id_col).type
        wanted = pa.array(list(ids), pa.string())
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            wanted = pc.cast(wanted, id_type)
        table = dataset.to_table(columns=[id_col, *cols], filter=pc.field(id_col).isin(wanted))
    except (OSError, ValueError, pa.ArrowException) as exc:
        print(f"[search] metadata unavailable ({exc})", file=sys.stderr)
        return {}
    out: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        key = str(row.pop(id_col))
        out.setdefault(key, {k: _printable(v) for k, v in row.items()})
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    """A plain aligned text table (long values cut), for humans."""
    if not rows:
        return "(no hits)"
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]

    def cell(v: Any) -> str:
        s = f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
        return s if len(s) <= 60 else s[:57] + "..."

    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def run_search(args: argparse.Namespace) -> int:
    """Run one search and print the hits; returns the exit status."""
    from pipelines.index.open import open_index

    if args.k <= 0:
        raise ValueError(f"-k must be positive, got {args.k}")
    s3 = _s3(args)
    index = open_index(args.index_dir, mmap=not args.no_mmap, s3=s3)
    if args.params:
        index.set_search_params(args.params)
    if args.query_id is not None:
        scores, ids = index.search_by_id(args.query_id, args.k)
        scores, ids = scores[None, :], ids[None, :]
    else:
        queries = encode_query(args, index.meta)
        if queries.shape[1] != index.dim:
            raise ValueError(
                f"the query has dimension {queries.shape[1]} but the index holds {index.dim}-dimensional vectors "
                "(a different model?)"
            )
        scores, ids = index.search(queries, args.k)
    hit_ids = [str(i) for i in ids.reshape(-1) if i]
    metadata = {} if args.no_metadata else lookup_metadata(index.meta, sorted(set(hit_ids)), s3)
    many = scores.shape[0] > 1
    for q in range(scores.shape[0]):
        rows = []
        for rank, (score, id_) in enumerate(zip(scores[q], ids[q]), start=1):
            if not id_:
                continue
            row: dict[str, Any] = {"query": q} if many else {}
            row.update({"rank": rank, "id": str(id_), "score": round(float(score), 6)})
            row.update(metadata.get(str(id_), {}))
            rows.append(row)
        if args.json:
            for row in rows:
                row.pop("rank", None)
                print(json.dumps(row, default=str))
        else:
            if many:
                print(f"query {q}:")
            print(_table(rows))
    return 0


__all__ = ["METADATA_COLUMNS", "add_search_arguments", "encode_query", "lookup_metadata", "run_search"]

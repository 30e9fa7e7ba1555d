"""CLIP-score filtering: a ``keep`` flag per result row, written beside the results.

Why a separate output and not a column of the results: committed parts are immutable (resume
relies on it), and ``filter.top_fraction`` is a decision over the WHOLE output, known only when
every shard is committed. So after the run commits its last shard, Ray tasks write
``OUTPUT/filter/part-XXXXX.parquet`` next to each ``results/part-XXXXX.parquet``: the same rows
in the same order, with ``id``, ``clip_score``, ``keep`` and ``reason`` (null when kept, else
``no_clip_score``, ``below_min_clip_score`` or ``outside_top_fraction``, the first that applies).

The top fraction is exact without bringing scores to the driver: a radix select over the float32
scores mapped to order-preserving 32-bit keys. Three passes of Ray tasks each return a histogram
of the next 11, 11 and 10 bits of the keys that share the prefix chosen so far (at most 2048
counts per part, summed on the driver as they arrive), which pins down the exact score of the
k-th best row. Ties at that score are broken by output order (part, then row), so exactly
``k = floor(top_fraction * scored + 0.5)`` rows are kept; a fourth pass counts each part's ties
so every part knows how many of its tied rows are kept.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipelines import storage as pio

FILTER_DIR = "filter"
FOOTER_KEY = b"clip_etl_filter"  # Parquet key-value metadata of a filter part: its rule
REASONS = ("no_clip_score", "below_min_clip_score", "outside_top_fraction")
PASS_BITS = (11, 11, 10)  # radix-select digits, high to low: 32 bits in all


@dataclass
class FilterRule:
    """The resolved decision shipped to every part's task (plain data)."""

    min_clip_score: float | None  # keep score >= this; None = off
    top_fraction: float | None  # None = off
    threshold_key: int | None = None  # top fraction: keys above are kept, keys equal up to a quota; None = keep none
    kept_target: int | None = None  # k, the rows the top fraction keeps


def keep_count(top_fraction: float, scored: int) -> int:
    """The documented rounding: the nearest integer to ``top_fraction * scored``, halves up."""
    return min(scored, int(math.floor(top_fraction * scored + 0.5)))


def score_keys(scores: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores -> (uint32 keys in the scores' order, mask of rows with a finite score).

    Positive floats get the sign bit set, negative ones are bit-inverted, so unsigned key order
    is float order; -0.0 is made +0.0 first so the two zeros tie as they compare.
    """
    arr = scores.combine_chunks() if isinstance(scores, pa.ChunkedArray) else scores
    values = np.asarray(arr.fill_null(0.0).to_numpy(zero_copy_only=False), np.float32) + np.float32(0.0)
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool) & np.isfinite(values)
    bits = values.view(np.uint32)
    keys = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)
    return keys, valid


def _read_keys(path: str, s3: pio.S3Options | None) -> tuple[np.ndarray, np.ndarray]:
    return score_keys(pio.read_parquet(path, s3, columns=["clip_score"]).column("clip_score"))


def part_histogram(path: str, s3: pio.S3Options | None, prefix: int, prefix_bits: int, bits: int) -> np.ndarray:
    """Ray task: counts of the next ``bits`` key bits among a part's scored rows whose top
    ``prefix_bits`` bits equal ``prefix``."""
    keys, valid = _read_keys(path, s3)
    keys = keys[valid].astype(np.uint64)
    if prefix_bits:
        keys = keys[(keys >> np.uint64(32 - prefix_bits)) == prefix]
    digits = (keys >> np.uint64(32 - prefix_bits - bits)) & np.uint64((1 << bits) - 1)
    return np.bincount(digits.astype(np.int64), minlength=1 << bits).astype(np.int64)


def part_ties(path: str, s3: pio.S3Options | None, key: int) -> int:
    """Ray task: a part's scored rows whose key is exactly ``key``."""
    keys, valid = _read_keys(path, s3)
    return int((valid & (keys == np.uint32(key))).sum())


def decide(scores: pa.ChunkedArray | pa.Array, rule: FilterRule, tie_quota: int) -> tuple[np.ndarray, list[str | None]]:
    """Pure function: (keep, reason) per row of one part; the first ``tie_quota`` rows tied at the
    threshold (in row order) are kept."""
    keys, valid = score_keys(scores)
    arr = scores.combine_chunks() if isinstance(scores, pa.ChunkedArray) else scores
    values = arr.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    code = np.where(valid, 0, 1)  # 0 kept; i = REASONS[i - 1]
    if rule.min_clip_score is not None:
        code[(code == 0) & (values < rule.min_clip_score)] = 2
    if rule.top_fraction is not None:
        if rule.threshold_key is None:
            outside = valid
        else:
            t = np.uint32(rule.threshold_key)
            tied = np.flatnonzero(valid & (keys == t))
            outside = valid & (keys < t)
            outside[tied[tie_quota:]] = True
        code[(code == 0) & outside] = 3
    reasons = [None if c == 0 else REASONS[c - 1] for c in code.tolist()]
    return code == 0, reasons


def write_part_decisions(result_path: str, out_path: str, rule: FilterRule, tie_quota: int,
                         s3: pio.S3Options | None, tmp_prefix: str) -> dict[str, int]:
    """Ray task: one part's decisions -> ``OUTPUT/filter/part-XXXXX.parquet``; returns its counts."""
    part = pio.read_parquet(result_path, s3, columns=["id", "clip_score"])
    keep, reasons = decide(part.column("clip_score"), rule, tie_quota)
    table = pa.table({"id": part.column("id"), "clip_score": part.column("clip_score"),
                      "keep": pa.array(keep, pa.bool_()), "reason": pa.array(reasons, pa.string())})
    meta = {FOOTER_KEY: json.dumps(asdict(rule), sort_keys=True).encode()}
    pio.write_parquet_atomic(table.replace_schema_metadata(meta), out_path, s3, tmp_prefix=tmp_prefix)
    counts = {"rows": table.num_rows, "kept": int(keep.sum())}
    for r in REASONS:
        counts[r] = sum(1 for x in reasons if x == r)
    return counts


def _merged(fn, items: list, *args, combine=None):
    """Run ``fn(item, *args)`` as a Ray task per part; combine the results as they arrive (the
    driver holds one accumulator, never every part's result). Without ``combine``: the list of
    results in part order (small values only)."""
    import ray

    task = ray.remote(num_cpus=0.25, max_retries=3)(fn)
    refs = {task.remote(p, *args): i for i, p in enumerate(items)}
    results: dict[int, Any] = {}
    total = None
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=min(len(waiting), 64), timeout=None)
        for ref in ready:
            value = ray.get(ref)
            if combine is None:
                results[refs[ref]] = value
            else:
                total = value if total is None else combine(total, value)
    return [results[i] for i in range(len(items))] if combine is None else total


def select_threshold(paths: list[str], k: int, s3: pio.S3Options | None, first: np.ndarray) -> tuple[int, int]:
    """Radix select: (the key of the k-th best score, how many rows tied at it are kept).
    ``first`` is the first pass's merged histogram (it also gave the scored count)."""
    prefix, prefix_bits, remaining = 0, 0, k
    for i, bits in enumerate(PASS_BITS):
        hist = first if i == 0 else _merged(part_histogram, paths, s3, prefix, prefix_bits, bits,
                                            combine=np.add)
        from_top = np.cumsum(hist[::-1])
        j = int(np.searchsorted(from_top, remaining))  # the first digit, from the top, that reaches k
        digit = len(hist) - 1 - j
        remaining -= int(from_top[j] - hist[digit])
        prefix, prefix_bits = (prefix << bits) | digit, prefix_bits + bits
    return prefix, remaining


def tie_quotas(ties: list[int], keep_tied: int) -> list[int]:
    """Each part's share of the ``keep_tied`` tied rows, first parts first (output order)."""
    out, left = [], keep_tied
    for t in ties:
        out.append(min(t, left))
        left -= out[-1]
    return out


def run_filter(results_dir: str, filter_dir: str, min_clip_score: float | None, top_fraction: float | None,
               s3: pio.S3Options | None, tmp_prefix: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``OUTPUT/filter/`` for every committed part; returns the summary for ``_run.json``."""
    from pipelines.etl.write import PART_RE

    t0 = time.perf_counter()
    paths = [p for p in pio.list_files(results_dir, suffix=".parquet", s3=s3)
             if PART_RE.match(p.replace("\\", "/").rsplit("/", 1)[-1])]
    rule, quotas, scored, ties = FilterRule(min_clip_score, top_fraction), [0] * len(paths), None, 0
    if top_fraction is not None and paths:
        first = _merged(part_histogram, paths, s3, 0, 0, PASS_BITS[0], combine=np.add)
        scored = int(first.sum())
        rule.kept_target = keep_count(top_fraction, scored)
        if rule.kept_target > 0:
            rule.threshold_key, keep_tied = select_threshold(paths, rule.kept_target, s3, first)
            per_part = _merged(part_ties, paths, s3, rule.threshold_key)
            quotas, ties = tie_quotas(per_part, keep_tied), sum(per_part)
    outs = [pio.join(filter_dir, p.replace("\\", "/").rsplit("/", 1)[-1]) for p in paths]
    counts = _merged(_write_one, list(zip(paths, outs, quotas)), rule, s3, tmp_prefix,
                     combine=lambda a, b: {k: a[k] + b[k] for k in a}) if paths else {}
    summary = {"min_clip_score": min_clip_score, "top_fraction": top_fraction, "parts": len(paths),
               "rows": counts.get("rows", 0), "kept": counts.get("kept", 0),
               "reasons": {r: counts.get(r, 0) for r in REASONS},
               "top_fraction_scored": scored, "top_fraction_kept": rule.kept_target,
               "threshold": None if rule.threshold_key is None else float(key_value(rule.threshold_key)),
               "ties_at_threshold": ties, "output": filter_dir, "seconds": round(time.perf_counter() - t0, 3)}
    log(f"[clip-etl] filter: kept {summary['kept']} of {summary['rows']} rows -> {filter_dir}")
    return summary


def _write_one(item: tuple[str, str, int], rule: FilterRule, s3, tmp_prefix: str) -> dict[str, int]:
    result_path, out_path, quota = item
    return write_part_decisions(result_path, out_path, rule, quota, s3, tmp_prefix)


def key_value(key: int) -> np.float32:
    """The float32 score of a key (the inverse of :func:`score_keys`)."""
    k = np.uint32(key)
    bits = k & np.uint32(0x7FFFFFFF) if k >> np.uint32(31) else ~k
    return np.array([bits], np.uint32).view(np.float32)[0]


__all__ = [
    "FILTER_DIR",
    "FilterRule",
    "REASONS",
    "decide",
    "keep_count",
    "key_value",
    "part_histogram",
    "part_ties",
    "run_filter",
    "score_keys",
    "select_threshold",
    "tie_quotas",
    "write_part_decisions",
]

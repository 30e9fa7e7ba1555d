"""Choose a FAISS index for a vector set: exact when cheap, a graph when it fits, compressed when not.

The choice follows the same ladder as autofaiss (and the FAISS wiki's "guidelines to choose an
index"), because those rules are well tested on real embedding collections:

1. ``Flat`` (exact) for small sets, where a brute-force scan is both fast and free of tuning;
2. ``HNSW{M}`` when the raw vectors plus a graph of ``M`` links fit in the memory budget;
3. ``IVF{nlist},Flat`` when the raw vectors fit but a graph does not, or the set is too large
   for a single graph to build in reasonable time;
4. ``[OPQ{m}_{d'},]IVF{nlist}[_HNSW32],PQ{m}x8`` otherwise, with the largest code (``m`` bytes per
   vector) the budget allows.

Everything here is a pure function of ``(n, d, budget)``, so the choice can be unit tested and
explained in ``index.json``; nothing touches FAISS. The memory formulas below are the ones the
documentation quotes, so keep them in sync with ``docs/index.md``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3

# Below this many vectors an exact scan costs well under a millisecond per query per core at
# CLIP dimensions, and needs neither training nor tuning.
FLAT_THRESHOLD = 20_000
# A single HNSW graph above this size takes hours to build on a few cores; IVF scales better.
HNSW_MAX_VECTORS = 5_000_000
# Link count of the graph index, as autofaiss uses (M=32 is the usual sweet spot; fewer links
# trade recall for memory).
HNSW_MAX_M = 32
HNSW_MIN_M = 8
# IVF lists above this count get an HNSW coarse quantizer, so assigning a vector to its list
# does not cost a scan over every centroid.
HNSW_QUANTIZER_MIN_NLIST = 4096
# k-means wants 30..256 points per centroid; 64 keeps training quick without hurting quality.
TRAIN_POINTS_PER_CENTROID = 64
MIN_POINTS_PER_CENTROID = 39
# PQ with 8-bit codes trains 256 centroids per sub-quantizer.
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_CENTROID
PQ_CODE_SIZES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
IVF_ID_BYTES = 8  # FAISS stores a 64-bit id next to each code in an inverted list


@dataclass(frozen=True)
class IndexChoice:
    """The index to build and why; stored in ``index.json`` under ``selection``."""

    factory: str
    kind: str  # "flat" | "hnsw" | "ivf_flat" | "ivf_pq"
    estimated_bytes: int  # memory the finished index takes (see index_memory_bytes)
    train_size: int  # vectors to sample for training (0: no training needed)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FactoryParts:
    """The pieces of a factory string that memory estimates and tuning need."""

    kind: str
    dim_out: int  # dimension after an optional OPQ/PCA transform
    nlist: int = 0
    hnsw_m: int = 0
    quantizer_hnsw_m: int = 0
    pq_m: int = 0
    pq_bits: int = 8
    opq: bool = False


def nlist_for(n: int) -> int:
    """Number of IVF lists: a power of two near ``4 * sqrt(n)``, with enough points per list.

    ``4..16 * sqrt(n)`` is the FAISS guideline; the low end keeps k-means training cheap and
    each list long enough to be worth probing. At least ``MIN_POINTS_PER_CENTROID`` vectors
    per list are required for k-means to be meaningful.
    """
    if n <= 0:
        raise ValueError(f"cannot size an IVF index for {n} vectors")
    target = 4.0 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    cap = max(1, n // MIN_POINTS_PER_CENTROID)
    while nlist > cap and nlist > 1:
        nlist //= 2
    return int(min(nlist, 2**18))


def _coarse(nlist: int) -> str:
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_MIN_NLIST else f"IVF{nlist}"


def parse_factory(factory: str, d: int) -> FactoryParts:
    """Read the parts of a factory string that matter for memory and search-time tuning.

    Handles the strings this module produces and the common hand-written ones (``Flat``,
    ``HNSW32``, ``IVF4096,Flat``, ``IVF1024_HNSW32,PQ64x8``, ``OPQ16_64,IVF..,PQ16``, ``..x4fs``).
    Unknown parts are tolerated: the estimate then errs on the large side.
    """
    parts = [p.strip() for p in factory.split(",") if p.strip()]
    dim_out = d
    opq = False
    nlist = hnsw_m = q_m = pq_m = 0
    pq_bits = 8
    kind = "other"
    for p in parts:
        m = re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", p)
        if m:
            opq = True
            dim_out = int(m.group(2)) if m.group(2) else dim_out
            continue
        m = re.fullmatch(r"PCAR?(\d+)", p)
        if m:
            dim_out = int(m.group(1))
            continue
        m = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", p)
        if m:
            nlist = int(m.group(1))
            q_m = int(m.group(2) or 0)
            kind = "ivf"
            continue
        m = re.fullmatch(r"HNSW(\d+)(?:_.*)?", p)
        if m and kind != "ivf":
            hnsw_m = int(m.group(1))
            kind = "hnsw"
            continue
        m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs|fsr|np)?", p)
        if m:
            pq_m = int(m.group(1))
            pq_bits = int(m.group(2) or 8)
            kind = "ivf_pq" if kind == "ivf" else "pq"
            continue
        if p == "Flat":
            kind = {"ivf": "ivf_flat", "other": "flat"}.get(kind, kind)
            continue
    if kind == "ivf":  # "IVF1024" alone is not valid FAISS, but treat it as IVF,Flat
        kind = "ivf_flat"
    return FactoryParts(kind, dim_out, nlist, hnsw_m, q_m, pq_m, pq_bits, opq)


def hnsw_bytes_per_vector(d: int, m: int) -> float:
    """Vector + level-0 links (2M ints) + upper-level links (~M/(M-1) ints) + offsets/levels."""
    return 4.0 * d + 4.0 * (2 * m + m / max(m - 1, 1)) + 12.0


def index_memory_bytes(factory: str, n: int, d: int) -> int:
    """Estimated RAM of the finished index (also its size on disk, within a few percent).

    - ``Flat``: ``4*n*d``
    - ``HNSW{M}``: ``n * (4*d + 8*M + 16)``
    - ``IVF{L},Flat``: ``n * (4*d + 8) + 4*L*d`` (+ an HNSW32 quantizer over the L centroids)
    - ``[OPQ{m}_{d'},]IVF{L},PQ{m}x{b}``: ``n * (m*b/8 + 8) + 4*L*d' + 4*d'*256`` (+ ``4*d*d'`` OPQ)
    """
    p = parse_factory(factory, d)
    if p.kind == "flat":
        return int(4 * n * d)
    if p.kind == "hnsw":
        return int(n * hnsw_bytes_per_vector(p.dim_out, p.hnsw_m))
    transform = 4 * d * p.dim_out if p.dim_out != d or p.opq else 0
    if p.kind in ("ivf_flat", "ivf_pq"):
        quantizer = p.nlist * (
            hnsw_bytes_per_vector(p.dim_out, p.quantizer_hnsw_m) if p.quantizer_hnsw_m else 4 * p.dim_out
        )
        if p.kind == "ivf_flat":
            per_vector = 4 * p.dim_out + IVF_ID_BYTES
            codebook = 0
        else:
            per_vector = math.ceil(p.pq_m * p.pq_bits / 8) + IVF_ID_BYTES
            codebook = 4 * p.dim_out * (2**p.pq_bits)
        return int(n * per_vector + quantizer + codebook + transform)
    if p.kind == "pq":
        return int(n * math.ceil(p.pq_m * p.pq_bits / 8) + 4 * p.dim_out * (2**p.pq_bits) + transform)
    return int(4 * n * d)  # unknown: assume it keeps the raw vectors


def train_size_for(factory: str, n: int, d: int, memory_budget_bytes: float) -> int:
    """How many vectors to sample for training: enough for k-means/PQ, never more than RAM allows.

    The sample is held in memory as float32 while FAISS trains, and FAISS makes a working copy
    (residuals, transformed vectors), so it is capped at a quarter of the budget -- but never
    below the minimum k-means needs, ``39`` points per centroid.
    """
    p = parse_factory(factory, d)
    needs = 0
    if p.nlist:
        needs = max(needs, TRAIN_POINTS_PER_CENTROID * p.nlist)
    if p.pq_m:
        needs = max(needs, (2**p.pq_bits) * TRAIN_POINTS_PER_CENTROID)
    if p.opq:
        needs = max(needs, PQ_MIN_TRAIN)
    if needs == 0:
        return 0
    floor = max(MIN_POINTS_PER_CENTROID * max(p.nlist, 1), PQ_MIN_TRAIN if p.pq_m else 0)
    by_memory = int(memory_budget_bytes / 4 / (4 * d))
    return int(min(n, max(min(needs, by_memory), floor)))


def _pq_choice(n: int, d: int, budget: float) -> tuple[str, int]:
    """Largest PQ code that fits the budget; OPQ rotates (and reduces) dims when codes are short."""
    nlist = nlist_for(n)
    coarse = _coarse(nlist)
    for m in PQ_CODE_SIZES:
        if m > d // 2:  # one dimension per byte or less is pointless: use IVF,Flat instead
            continue
        if m * 4 < d:
            # Short codes: rotate with OPQ and project to 4 dims per sub-quantizer (the FAISS
            # wiki's OPQ{m}_{4m}); the rotation balances variance across sub-spaces.
            factory = f"OPQ{m}_{4 * m},{coarse},PQ{m}x8"
        elif d % m == 0:
            factory = f"{coarse},PQ{m}x8"
        else:
            dim = (d // m) * m
            factory = f"OPQ{m}_{dim},{coarse},PQ{m}x8"
        size = index_memory_bytes(factory, n, d)
        if size <= budget:
            return factory, size
    raise ValueError(
        f"memory budget {budget / GIB:.3f} GiB is too small for {n} vectors of dimension {d}: even "
        f"4-byte PQ codes need {index_memory_bytes(f'OPQ4_16,{coarse},PQ4x8', n, d) / GIB:.3f} GiB; "
        "raise index.memory_budget_gb or give index.factory explicitly"
    )


def choose_index(
    n: int,
    d: int,
    memory_budget_gb: float,
    *,
    flat_threshold: int = FLAT_THRESHOLD,
    hnsw_max_vectors: int = HNSW_MAX_VECTORS,
) -> IndexChoice:
    """Pick the factory string for ``n`` vectors of dimension ``d`` within ``memory_budget_gb``.

    The budget bounds the finished index (what search holds in RAM), as autofaiss's
    ``max_index_memory_usage`` does; building needs a little more (see ``build_memory_bytes``).
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"need a positive vector count and dimension, got n={n}, d={d}")
    if memory_budget_gb <= 0:
        raise ValueError(f"index.memory_budget_gb must be positive, got {memory_budget_gb}")
    budget = float(memory_budget_gb) * GIB

    flat_size = index_memory_bytes("Flat", n, d)
    if n < 1000 or (n < flat_threshold and flat_size <= budget):
        return IndexChoice("Flat", "flat", flat_size, 0, f"{n} vectors: an exact scan is fast enough")

    if n <= hnsw_max_vectors:
        m = int(math.floor((budget / n - 4 * d - 16) / 8))
        if m >= HNSW_MIN_M:
            m = min(m, HNSW_MAX_M)
            factory = f"HNSW{m}"
            return IndexChoice(
                factory, "hnsw", index_memory_bytes(factory, n, d), 0,
                f"raw vectors plus a graph of {m} links fit the budget",
            )

    nlist = nlist_for(n)
    ivf_flat = f"{_coarse(nlist)},Flat"
    size = index_memory_bytes(ivf_flat, n, d)
    if size <= budget:
        return IndexChoice(
            ivf_flat, "ivf_flat", size, train_size_for(ivf_flat, n, d, budget),
            "raw vectors fit the budget but a graph index does not"
            if n <= hnsw_max_vectors else f"more than {hnsw_max_vectors} vectors: inverted lists scale better",
        )

    factory, size = _pq_choice(n, d, budget)
    return IndexChoice(
        factory, "ivf_pq", size, train_size_for(factory, n, d, budget),
        f"raw vectors need {flat_size / GIB:.2f} GiB > budget: compressed to "
        f"{parse_factory(factory, d).pq_m} bytes per vector",
    )


def choose_factory(n: int, d: int, memory_budget_gb: float) -> str:
    """Just the factory string of :func:`choose_index`."""
    return choose_index(n, d, memory_budget_gb).factory


READER_BASE_BYTES = 224 * 1024**2  # Arrow/Parquet buffers and allocator caches of one reader (measured)


def build_memory_bytes(
    factory: str,
    n: int,
    d: int,
    *,
    train_size: int = 0,
    batch_rows: int = 2048,
    parallel_tasks: int = 1,
    shards: int = 1,
    merge: bool = False,
) -> int:
    """Peak RAM of a build, summed over the machine's concurrent tasks.

    The phases do not overlap, so the peak is the largest of:

    - training: the sample and FAISS's working copy, ``2 * 4*T*d`` (+ one reader);
    - adding: the shards in flight (each task holds only its own shard, allocated up front) plus
      one reader per task (``224 MiB + 6 * 4*B*d``: Parquet buffers, allocator caches, batch copies);
    - merging (optional): the whole index plus the shard being appended.
    """
    index = index_memory_bytes(factory, n, d)
    reader = READER_BASE_BYTES + 6 * 4 * batch_rows * d
    shards = max(shards, 1)
    tasks = min(parallel_tasks, shards)
    training = 2 * 4 * train_size * d + reader
    adding = tasks * (index / shards + reader)
    merging = index + index / shards if merge and shards > 1 else 0
    return int(max(training, adding, merging))


def search_parameter(factory: str, d: int = 0) -> str | None:
    """Name of the knob that trades speed for recall: ``nprobe`` (IVF), ``efSearch`` (HNSW) or none."""
    kind = parse_factory(factory, d or 1).kind
    if kind in ("ivf_flat", "ivf_pq"):
        return "nprobe"
    if kind == "hnsw":
        return "efSearch"
    return None


def search_parameter_grid(factory: str, d: int = 0) -> list[str]:
    """Candidate search-parameter strings, from fastest to most accurate.

    IVF: ``nprobe`` over a roughly geometric ladder up to ``nlist`` (with the HNSW coarse
    quantizer's ``efSearch`` kept at ``2*nprobe``, as autofaiss does); HNSW: ``efSearch`` from 16
    up to 4096. Recall grows and speed falls along the list, so the first entry that reaches the
    target is the fastest one that does.
    """
    p = parse_factory(factory, d or 1)
    ladder = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256,
              320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 3072, 4096]
    if p.kind in ("ivf_flat", "ivf_pq"):
        values = [v for v in ladder if v < p.nlist] + [p.nlist]
        if p.quantizer_hnsw_m:
            return [f"nprobe={v},quantizer_efSearch={max(16, 2 * v)}" for v in values]
        return [f"nprobe={v}" for v in values]
    if p.kind == "hnsw":
        return [f"efSearch={v}" for v in ladder if v >= 16]
    return [""]


__all__ = [
    "IndexChoice",
    "FactoryParts",
    "build_memory_bytes",
    "choose_factory",
    "choose_index",
    "index_memory_bytes",
    "nlist_for",
    "parse_factory",
    "search_parameter",
    "search_parameter_grid",
    "train_size_for",
]

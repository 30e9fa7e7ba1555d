"""The queries an index is tuned on, and the confidence bound the tuner decides by.

A tuned index is only as good as its tuning queries are like the real ones. Rows of the data held
out of the index are the easy case: a row's neighbours sit at the spacing of the data itself. Real
queries rarely do: a new photo, a noisy re-encoding, a text against image embeddings has no copy
in the database and sits *off* the data, its neighbours further and closer to each other in score,
and more of them in other IVF lists or graph regions. An index tuned on held-out rows therefore
reaches less recall on real queries than it promised. Two remedies, one per source:

- ``perturbed_held_out`` (the default): the held-out rows moved off the data by isotropic
  Gaussian noise of norm ``QUERY_NOISE`` times the median nearest-neighbour distance of the data,
  then re-normalized (:func:`perturb`). The spacing is estimated from a sample and extrapolated
  to the whole input (:func:`nn_distance_estimate`).
- ``file``: a sample of real queries the user supplies (``index.tuning_queries``, read by
  :func:`read_query_file`), which no synthetic perturbation can beat.

Either way the recall measured on a finite set of queries is an estimate; the tuner picks the
fastest setting whose *lower confidence bound* (:func:`recall_interval`) reaches the target, so
that a setting which reaches it only by the luck of the draw is not chosen.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clip_core.zero_shot import l2_normalize

from pipelines import storage as pio
from pipelines.storage import S3Options

# Noise norm of a perturbed tuning query, in units of the data's median nearest-neighbour
# distance r: the query ends up about sqrt(1 + 2^2) ~ 2.2 r from its nearest rows, off the data
# rather than on it. Measured on clustered data (docs/index.md): tuned this way, HNSW and IVF
# indexes kept a 0.995 target on noisy copies of stored rows with noise 2.5 r, where tuning on the
# held-out rows by their mean fell short (0.986-0.989).
QUERY_NOISE = 2.0
# Rows the nearest-neighbour distance is measured on (a sample of the input; more than any
# extrapolation needs) and how many held-out rows probe it.
NN_REFERENCE_ROWS = 20_000
NN_PROBES = 500
NN_MIN_ROWS = 200  # below this a nested subsample says too little about the slope
# Two-sided confidence of the recall interval; the tuner decides by its low end.
RECALL_CONFIDENCE = 0.95
INTERVAL_METHOD = "wilson-design-effect"
SOURCE_PERTURBED = "perturbed_held_out"
SOURCE_FILE = "file"
QUERY_FILE_SUFFIXES = (".parquet", ".npy")


# ------------------------------------------------------------------------------ recall ---

def query_hits(found: np.ndarray, truth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: how many of its true top-``k`` were returned in the top-``k``, out of how many.

    Positions ``-1`` (no hit, or fewer true neighbours than ``k``) never match and are not counted
    as true neighbours.
    """
    k = min(k, truth.shape[1], found.shape[1])
    f, t = found[:, :k], truth[:, :k]
    valid = t >= 0
    match = (f[:, :, None] == t[:, None, :]) & valid[:, None, :]  # [Q, k found, k true]
    return match.any(axis=1).sum(axis=1), valid.sum(axis=1)


@dataclass(frozen=True)
class RecallInterval:
    """recall@k measured on a query sample and the interval the true mean lies in."""

    estimate: float
    low: float
    high: float
    confidence: float
    queries: int
    effective_queries: float  # trials the interval is as wide as for independent hits
    method: str = INTERVAL_METHOD

    def reaches(self, target: float) -> bool:
        """The bound reaches ``target``, or nothing was missed (no sample of this size can show more)."""
        return self.low >= target or self.estimate >= 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("estimate", "low", "high"):
            d[key] = round(d[key], 5)
        d["effective_queries"] = round(d["effective_queries"], 1)
        return d


def wilson_interval(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` seen in ``n`` trials: unlike the normal
    approximation it stays inside [0, 1] and does not collapse to a point at p = 1."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def design_effect(hits: np.ndarray, trials: np.ndarray, p: float) -> float:
    """How much wider than for independent hits the interval must be, because a query's misses
    come together (a missed IVF list or graph region loses several neighbours at once).

    The ratio of the between-query variance of the pooled recall (cluster sampling) to the
    binomial one, clamped to [1, mean trials per query]: never narrower than independent hits,
    never wider than one trial per query.
    """
    q = int((trials > 0).sum())
    total = float(trials.sum())
    if q < 2 or p <= 0.0 or p >= 1.0:
        return 1.0
    between = q / (q - 1) * float(np.sum((hits - p * trials) ** 2)) / total**2
    binomial = p * (1 - p) / total
    return float(np.clip(between / binomial, 1.0, total / q))


def recall_interval(hits: np.ndarray, trials: np.ndarray, confidence: float = RECALL_CONFIDENCE) -> RecallInterval:
    """Pooled recall with a two-sided ``confidence`` interval over queries.

    The Wilson interval of the hits, counted as ``trials / design effect`` independent trials
    (Kish's effective sample size): queries are the sampling unit, the neighbours of one query
    are not independent draws.
    """
    total = float(trials.sum())
    queries = int(len(trials))
    if total == 0:
        return RecallInterval(1.0, 1.0, 1.0, confidence, queries, 0.0)
    p = float(hits.sum()) / total
    n_eff = total / design_effect(hits, trials, p)
    low, high = wilson_interval(p, n_eff, NormalDist().inv_cdf(0.5 + confidence / 2))
    return RecallInterval(p, min(low, p), max(high, p), confidence, queries, n_eff)


# ----------------------------------------------------------------- perturbed held-out ---

def median_nn_distance(probes: np.ndarray, reference: np.ndarray) -> float:
    """Median Euclidean distance from each probe to its nearest reference vector (unit vectors).

    Exact duplicates (distance 0) say nothing about the spacing of the data and are left out.
    """
    scores, _ = faiss.knn(probes, reference, 1, metric=faiss.METRIC_INNER_PRODUCT)
    dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores[:, 0]))
    dist = dist[dist > 1e-6]
    return float(np.median(dist)) if len(dist) else 0.0


def nn_distance_estimate(probes: np.ndarray, reference: np.ndarray, population: int) -> dict[str, Any]:
    """The median nearest-neighbour distance among ``population`` rows, from a uniform sample.

    A sample is sparser than the whole, so its neighbours are further. The distance falls as a
    power of the number of rows (``n^(-1/m)``, ``m`` the data's intrinsic dimension), so it is
    measured on nested halves of the sample (n, n/2, n/4, n/8) and the log-log line through them
    extrapolated to ``population``. Within a few percent on clustered test data.
    """
    n = len(reference)
    sizes = [n >> i for i in range(4) if (n >> i) >= NN_MIN_ROWS] or [n]
    medians = [median_nn_distance(probes, reference[:s]) for s in sizes]
    slope = 0.0
    if len(sizes) >= 2 and population > n and min(medians) > 0:
        slope = float(np.clip(np.polyfit(np.log(sizes), np.log(medians), 1)[0], -1.0, 0.0))
    scale = (population / n) ** slope if population > n else 1.0
    return {"nn_distance": round(medians[0] * scale, 6), "nn_distance_in_sample": round(medians[0], 6),
            "sample_rows": n, "population_rows": int(population), "log_slope": round(slope, 4)}


def perturb(vectors: np.ndarray, noise_norm: float, seed: int) -> np.ndarray:
    """``vectors`` plus isotropic Gaussian noise of expected norm ``noise_norm``, re-normalized.

    Isotropic, because the way a real query differs from the rows it retrieves is not known in
    advance; per-coordinate deviation ``noise_norm / sqrt(D)`` gives the noise that norm.
    """
    rng = np.random.default_rng(seed)
    d = vectors.shape[1]
    noise = rng.standard_normal(vectors.shape, dtype=np.float32) * np.float32(noise_norm / math.sqrt(d))
    return np.ascontiguousarray(l2_normalize(vectors + noise), dtype=np.float32)


# ------------------------------------------------------------------------- query file ---

def check_query_file(path: str, s3: S3Options | None) -> dict[str, Any]:
    """Size and change stamp of ``index.tuning_queries`` (they go into the build plan, so a changed
    file starts the build over); a missing file or unknown format fails before any work."""
    if not str(path).endswith(QUERY_FILE_SUFFIXES):
        raise ValueError(f"{path} is neither a .parquet nor a .npy file")
    try:
        return pio.file_info(path, s3)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None


def _vectors_from_column(column: pa.ChunkedArray, name: str, dim: int) -> np.ndarray:
    """Non-null list values of one Parquet column as float32 rows of length ``dim``."""
    col = pc.drop_null(column.combine_chunks())
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise ValueError(f"column {name!r} is {col.type}, not a list of floats")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(col) and not (lengths == dim).all():
        raise ValueError(f"column {name!r} holds vectors of length {sorted(set(lengths.tolist()))[:3]}, "
                         f"the index has dimension {dim}")
    values = pc.cast(col.flatten(), pa.float32()).to_numpy(zero_copy_only=False)
    return values.reshape(len(col), dim)


def read_query_file(path: str, column: str, dim: int, s3: S3Options | None) -> np.ndarray:
    """Query vectors from a ``.npy`` ``[Q, D]`` or the ``column`` of a Parquet file, local or
    ``s3://``: finite rows only, L2-normalized like the indexed vectors."""
    if str(path).endswith(".npy"):
        array = np.load(io.BytesIO(pio.read_bytes(path, s3)), allow_pickle=False)
        if array.ndim != 2 or array.shape[1] != dim:
            raise ValueError(f"{path} holds an array of shape {array.shape}, not [Q, {dim}]")
        vectors = array.astype(np.float32)
    else:
        try:
            table = pio.read_parquet(path, s3, columns=[column])
        except (KeyError, pa.ArrowInvalid):
            raise ValueError(f"{path} has no column {column!r} (index.embedding_column)") from None
        vectors = _vectors_from_column(table.column(column), column, dim)
    vectors = vectors[np.isfinite(vectors).all(axis=1) & (np.abs(vectors).sum(axis=1) > 0)]
    if len(vectors) == 0:
        raise ValueError(f"{path} holds no usable query vectors")
    return np.ascontiguousarray(l2_normalize(vectors), dtype=np.float32)


def subsample(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` rows, a seeded uniform choice (all of them, in order, when there are fewer)."""
    if len(vectors) <= n:
        return vectors
    pick = np.sort(np.random.default_rng(seed).choice(len(vectors), size=n, replace=False))
    return np.ascontiguousarray(vectors[pick])


__all__ = [
    "QUERY_NOISE",
    "RECALL_CONFIDENCE",
    "RecallInterval",
    "check_query_file",
    "nn_distance_estimate",
    "perturb",
    "query_hits",
    "read_query_file",
    "recall_interval",
    "subsample",
    "wilson_interval",
]

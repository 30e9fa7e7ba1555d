"""Search a sharded FAISS index built by :mod:`pipelines.index.build`.

An index directory holds ``index.json`` and one ``shard-NNNNN.faiss`` + ``shard-NNNNN.ids.parquet``
pair per shard (optionally a ``merged.faiss`` pair too). :func:`open_index` loads the shards,
memory-mapped where FAISS allows it so a large index costs page cache rather than heap, and
applies the search parameters the build tuned. :meth:`ShardedIndex.search` searches every shard
and merges the per-shard top-k into a global top-k, which for exact and IVF indexes (the shards
share one trained quantizer) is exactly what a single index over all vectors returns.

Ids are kept as Arrow string arrays, not Python objects, so millions of ids cost their bytes
rather than ~60 bytes of object overhead each.
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clip_core.zero_shot import l2_normalize

from pipelines import storage as pio
from pipelines.storage import S3Options

INDEX_JSON = "index.json"
# Shards at least this large are searched in parallel threads for small query batches; below it,
# handing work to a thread costs more than the search.
PARALLEL_SHARD_MIN = 50_000


@dataclass
class Shard:
    """One FAISS index file and its row-position -> id mapping."""

    index: faiss.Index
    ids: pa.Array  # string ids; element i is the id of the vector FAISS numbers i
    offset: int  # global position of this shard's first vector
    name: str

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


def _cache_root() -> str:
    from clip_core.encoders import cache_dir

    return str(cache_dir("index"))


def _localize(path: str, meta_bytes: bytes, files: list[str], s3: S3Options | None) -> str:
    """Copy an ``s3://`` index into a local cache so FAISS can memory-map it.

    The cache folder is keyed by the index location and its ``index.json`` content, so a rebuilt
    index is fetched again while repeated opens of the same one are free.
    """
    key = hashlib.sha256(path.encode() + b"\0" + meta_bytes).hexdigest()[:20]
    local = os.path.join(_cache_root(), key)
    os.makedirs(local, exist_ok=True)
    for name in files:
        dest = os.path.join(local, name)
        if not os.path.exists(dest):
            pio.fetch_to_local(pio.join(path, name), dest, s3)
    with open(os.path.join(local, INDEX_JSON), "wb") as f:
        f.write(meta_bytes)
    return local


def read_faiss(path: str, mmap: bool = True) -> faiss.Index:
    """Read a local FAISS file, memory-mapping flat codes and inverted lists when asked.

    ``IO_FLAG_MMAP_IFC`` maps both IVF lists and flat/HNSW vector storage; index types FAISS
    cannot map are read into memory instead (with a note on stderr).
    """
    if not mmap:
        return faiss.read_index(path)
    try:
        return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:  # pragma: no cover - depends on the index type
        print(f"index: {os.path.basename(path)} cannot be memory-mapped ({exc}); reading it", file=sys.stderr)
        return faiss.read_index(path)


def read_ids(path: str, s3: S3Options | None = None) -> pa.Array:
    """The ``id`` column of a shard's id file as one contiguous string array."""
    fs = pio.filesystem_for(path, s3)
    with fs.open_input_file(pio.strip_scheme(path)) as f:
        table = pq.read_table(f, columns=["id"])
    # 64-bit offsets: a merged index over ~100M ids holds more than 2 GiB of id text
    return table.column("id").cast(pa.large_string()).combine_chunks()


def _take_ids(ids: pa.Array, positions: np.ndarray) -> np.ndarray:
    """Map local positions (-1 = no hit) to an object array of id strings ("" = no hit)."""
    flat = positions.reshape(-1)
    valid = flat >= 0
    if valid.all():
        return ids.take(pa.array(flat, type=pa.int64())).to_numpy(zero_copy_only=False).reshape(positions.shape)
    out = np.full(flat.shape, "", dtype=object)
    if valid.any():
        out[valid] = ids.take(pa.array(flat[valid], type=pa.int64())).to_numpy(zero_copy_only=False)
    return out.reshape(positions.shape)


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply a FAISS parameter string such as ``nprobe=16`` or ``efSearch=64`` (empty: nothing)."""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def merge_topk(
    scores: list[np.ndarray], positions: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k from per-shard top-k lists, best score first.

    The candidates are laid out shard by shard and sorted with a stable sort, so equal scores
    keep shard order, then each shard's own order: the same answer on every run. Missing hits
    (FAISS's ``-1``) sort last with score ``-inf``.
    """
    s = np.concatenate(scores, axis=1)
    p = np.concatenate(positions, axis=1)
    s = np.where(p < 0, -np.inf, s).astype(np.float32)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(s, order, axis=1)
    p = np.take_along_axis(p, order, axis=1)
    if s.shape[1] < k:  # fewer candidates than k in total: pad
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        p = np.pad(p, ((0, 0), (0, pad)), constant_values=-1)
    return s, p


def as_queries(queries: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """Validate and L2-normalize queries: the index stores unit vectors and scores cosines."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be a float32 array [Q, {dim}], got shape {tuple(np.shape(queries))}")
    q = np.ascontiguousarray(q)
    if normalize:
        q = l2_normalize(q)  # [Q, dim]
    return np.ascontiguousarray(q, dtype=np.float32)


class ShardedIndex:
    """Several FAISS indexes searched as one; see :func:`open_index`."""

    def __init__(self, meta: dict[str, Any], shards: list[Shard], *, root: str, s3: S3Options | None = None):
        if not shards:
            raise ValueError("an index needs at least one shard")
        self.meta = meta
        self.shards = shards
        self.root = root
        self._s3 = s3
        self.dim = int(meta.get("dim") or shards[0].index.d)
        self.params = ""
        self._pool: ThreadPoolExecutor | None = None
        # One id array for all shards (each shard's ids become a zero-copy slice of it), so that
        # mapping a result matrix to ids is a single Arrow take.
        if len(shards) > 1:
            self._ids = pa.concat_arrays([s.ids for s in shards])
            for s in shards:
                s.ids = self._ids.slice(s.offset, len(s.ids))
        else:
            self._ids = shards[0].ids
        self.set_search_params(meta.get("search_params", "") or "")

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def factory(self) -> str:
        return str(self.meta.get("factory", ""))

    def set_search_params(self, params: str) -> None:
        """Change nprobe/efSearch on every shard (e.g. to trade recall for speed at query time)."""
        for shard in self.shards:
            set_search_params(shard.index, params)
        self.params = params

    def search_positions(self, queries: np.ndarray, k: int, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k as (scores, global row positions); positions are -1 where there is no hit."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = as_queries(queries, self.dim, normalize)
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)

        def one(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
            kk = min(k, max(shard.ntotal, 1))
            s, p = shard.index.search(q, kk)
            p = np.where(p >= 0, p + shard.offset, -1)
            return s, p

        if len(self.shards) == 1:
            s, p = one(self.shards[0])
            if s.shape[1] == k and (p >= 0).all():
                return s, p  # FAISS already returns the best first
            return merge_topk([s], [p], k)
        big = sum(1 for s in self.shards if s.ntotal >= PARALLEL_SHARD_MIN)
        if big > 1 and q.shape[0] < 64 and (os.cpu_count() or 1) > 1:
            # FAISS parallelizes over queries; with few queries, search large shards side by side.
            results = list(self._executor().map(one, self.shards))
        else:
            results = [one(s) for s in self.shards]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k)

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Id strings for global positions ("" where a position is -1)."""
        return _take_ids(self._ids, np.asarray(positions, dtype=np.int64))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(len(self.shards), os.cpu_count() or 1),
                                            thread_name_prefix="index-search")
        return self._pool

    def close(self) -> None:
        """Stop the shard-search threads (the index stays usable; they restart on demand)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def search(self, queries: np.ndarray, k: int, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``[Q, k]`` (best first, ``-inf`` where missing) and ids ``[Q, k]`` ("" where missing)."""
        scores, positions = self.search_positions(queries, k, normalize=normalize)
        return scores, self.ids_at(positions)

    def locate(self, id_: str) -> int | None:
        """Global position of the first vector with this id, or None."""
        for shard in self.shards:
            hits = pc.indices_nonzero(pc.equal(shard.ids, pa.scalar(str(id_), type=shard.ids.type)))
            if len(hits):
                return shard.offset + int(hits[0].as_py())
        return None

    def vector_for_id(self, id_: str) -> np.ndarray:
        """The stored embedding of ``id_``: from the source Parquet when readable, else from FAISS.

        The source holds the exact vector; FAISS can give it back exactly only for indexes that
        keep raw vectors (Flat, HNSW), so those are the fallback when the source is gone.
        """
        source = self.meta.get("source") or {}
        if source.get("path"):
            try:
                vec = _read_source_vector(source, str(id_), self._s3)
                if vec is not None:
                    return vec
            except (OSError, ValueError, pa.ArrowException) as exc:
                print(f"index: source Parquet not readable ({exc}); using the stored vector", file=sys.stderr)
        pos = self.locate(id_)
        if pos is None:
            raise KeyError(f"id {id_!r} is not in the index")
        for shard in self.shards:
            if shard.offset <= pos < shard.offset + shard.ntotal:
                try:
                    return shard.index.reconstruct(pos - shard.offset).astype(np.float32)
                except RuntimeError as exc:
                    raise KeyError(
                        f"id {id_!r} is indexed but its vector cannot be recovered: the source Parquet is not "
                        f"available and a {self.factory} index does not keep raw vectors ({exc})"
                    ) from exc
        raise KeyError(f"id {id_!r} is not in the index")  # pragma: no cover

    def search_by_id(self, id_: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of a stored item: scores ``[k]`` and ids ``[k]`` (the item itself usually first)."""
        scores, ids = self.search(self.vector_for_id(id_)[None, :], k)
        return scores[0], ids[0]

    def __repr__(self) -> str:
        return f"ShardedIndex({self.factory!r}, ntotal={self.ntotal}, dim={self.dim}, shards={len(self.shards)})"


def _read_source_vector(source: dict[str, Any], id_: str, s3: S3Options | None) -> np.ndarray | None:
    """Scan the source Parquet for ``id_`` and return its embedding (None when absent)."""
    id_col = source.get("id_column", "id")
    emb_col = source.get("embedding_column", "image_embedding")
    files = source.get("files") or pio.list_files(source["path"], ".parquet", s3)
    for path in files:
        fs = pio.filesystem_for(path, s3)
        with fs.open_input_file(pio.strip_scheme(path)) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=[id_col, emb_col], batch_size=65536):
                ids = pc.cast(batch.column(0), pa.string())
                hit = pc.indices_nonzero(pc.equal(ids, id_))
                if len(hit):
                    value = batch.column(1)[int(hit[0].as_py())].as_py()
                    if value is None:
                        return None
                    return np.asarray(value, dtype=np.float32)
    return None


def load_shards(
    root: str, meta: dict[str, Any], *, mmap: bool = True, s3: S3Options | None = None, prefer_merged: bool = True
) -> ShardedIndex:
    """Open the shard files listed in ``meta`` under a local directory ``root``."""
    merged = meta.get("merged")
    entries = [merged] if (prefer_merged and merged) else list(meta.get("shards") or [])
    shards: list[Shard] = []
    offset = 0
    for entry in entries:
        index = read_faiss(os.path.join(root, entry["file"]), mmap)
        ids = read_ids(os.path.join(root, entry["ids"]))
        if len(ids) != index.ntotal:
            raise ValueError(
                f"{entry['file']} holds {index.ntotal} vectors but {entry['ids']} has {len(ids)} ids: the index is corrupt"
            )
        shards.append(Shard(index, ids, offset, entry["file"]))
        offset += int(index.ntotal)
    return ShardedIndex(meta, shards, root=root, s3=s3)


def open_index(path: str, *, mmap: bool = True, s3: S3Options | None = None, prefer_merged: bool = True) -> ShardedIndex:
    """Open an index directory (local or ``s3://``) written by ``clip-etl index``.

    ``path`` may be the index directory itself or a job's output root containing ``index/``.
    An S3 index is copied to a local cache first (``$CLIP_ETL_CACHE_DIR`` or ``~/.cache/clip-etl``)
    because FAISS memory-maps only local files.
    """
    path = str(path).rstrip("/")
    meta_path = pio.join(path, INDEX_JSON)
    if not pio.exists(meta_path, s3) and pio.exists(pio.join(path, "index", INDEX_JSON), s3):
        path = pio.join(path, "index")
        meta_path = pio.join(path, INDEX_JSON)
    try:
        meta_bytes = pio.read_bytes(meta_path, s3)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no finished index at {path}: {INDEX_JSON} is missing (build it with `clip-etl index`; "
            "an interrupted build resumes when re-run)"
        ) from None
    import json

    meta = json.loads(meta_bytes)
    if pio.is_s3(path):
        entries = ([meta["merged"]] if (prefer_merged and meta.get("merged")) else []) or meta["shards"]
        files = [name for e in entries for name in (e["file"], e["ids"])]
        root = _localize(path, meta_bytes, files, s3)
    else:
        root = pio.strip_scheme(path)
    return load_shards(root, meta, mmap=mmap, s3=s3, prefer_merged=prefer_merged)


__all__ = ["ShardedIndex", "Shard", "as_queries", "load_shards", "merge_topk", "open_index", "read_faiss", "read_ids"]

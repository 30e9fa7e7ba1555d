"""A small in-memory image search engine: one exact FAISS inner-product index over CLIP embeddings.

This is the single-machine tool for a folder of images or a notebook; the sharded, tuned indexes
of batch jobs are built by the index stage. Embeddings are L2-normalised, so inner product is
cosine similarity and a query image finds itself with score ~1.

Unreadable images never disappear silently: they are logged, left out of the index, and
returned (with the reason) in :attr:`BuildReport.failed`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from clip_core.zero_shot import ImageLoadError, as_embedding_matrix, l2_normalize, open_image

from pipelines.storage import write_bytes_atomic

log = logging.getLogger(__name__)

INDEX_FILE = "clip.index"
IDS_FILE = "ids.json"
FORMAT = "clip-etl-search/1"

Id = Union[str, int]


@dataclass
class BuildReport:
    """What :meth:`ImageSearchEngine.build_index` did: ids added and ``(path, error)`` failures."""

    added: list[Id] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    write_bytes_atomic(str(path), data)


def _check_id(x: Any) -> Id:
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, bool) or not isinstance(x, (str, int)):
        raise TypeError(f"ids must be strings or integers (they are stored as JSON), got {x!r}")
    return x


class ImageSearchEngine:
    """Exact cosine search over image embeddings (``faiss.IndexFlatIP``), with text or image queries.

    ``encoder`` needs ``encode_images``, ``encode_texts``, ``preprocess`` and ``embed_dim``; it may
    be None when only :meth:`search_by_embedding` on a loaded index is used.
    """

    def __init__(self, encoder: Any = None, *, dim: int | None = None) -> None:
        import faiss

        self.encoder = encoder
        d = dim if dim is not None else getattr(encoder, "embed_dim", None)
        if d is None:
            raise ValueError("embedding dimension unknown: pass an encoder with embed_dim, or dim=")
        self.dim = int(d)
        self.index = faiss.IndexFlatIP(self.dim)
        self.ids: list[Id] = []

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # ---------------------------------------------------------------------------------- build
    def reset(self) -> None:
        self.index.reset()
        self.ids = []

    def add_embeddings(self, ids: Sequence[Id], embeddings: np.ndarray) -> None:
        """Append precomputed embeddings ([N, D], normalised here) under the given ids."""
        ids = [_check_id(x) for x in ids]
        emb = as_embedding_matrix(embeddings, self.dim, what="embeddings")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"{len(ids)} ids for {emb.shape[0]} embeddings")
        self.index.add(np.ascontiguousarray(emb))
        self.ids.extend(ids)

    def _require_encoder(self, what: str) -> Any:
        if self.encoder is None:
            raise ValueError(f"{what} needs an encoder; this engine was created without one")
        return self.encoder

    def build_index(self, image_paths: Sequence[str | os.PathLike], batch_size: int = 32,
                    progress: bool = True) -> BuildReport:
        """Replace the index with the embeddings of ``image_paths`` (ids = the paths as strings).

        Images that cannot be read or preprocessed are logged and listed in the report's
        ``failed``, never silently dropped. ``progress`` prints a line per batch to stderr.
        """
        import torch

        encoder = self._require_encoder("build_index")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        paths = [os.fspath(p) for p in image_paths]
        self.reset()
        report = BuildReport()
        for start in range(0, len(paths), batch_size):
            batch_ids, tensors = [], []
            for p in paths[start : start + batch_size]:
                try:
                    tensors.append(encoder.preprocess(open_image(p)))
                    batch_ids.append(p)
                except Exception as e:  # noqa: BLE001 - any decode/preprocess failure is row-level
                    msg = str(e) if isinstance(e, ImageLoadError) else f"{type(e).__name__}: {e}"
                    log.warning("skipping %s: %s", p, msg)
                    report.failed.append((p, msg))
            if tensors:
                emb = encoder.encode_images(torch.stack(tensors))
                self.add_embeddings(batch_ids, emb)
                report.added.extend(batch_ids)
            if progress:
                print(f"indexed {min(start + batch_size, len(paths))}/{len(paths)} images"
                      f" ({len(report.failed)} failed)", file=sys.stderr)
        if report.failed:
            log.warning("%d of %d images could not be indexed", len(report.failed), len(paths))
        return report

    # --------------------------------------------------------------------------------- search
    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[Id, float]]]:
        """Best ``k`` (id, cosine) per query row, best first; ``k`` is clipped to the index size."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.index.ntotal == 0:
            raise ValueError("the index is empty: call build_index(), add_embeddings() or load() first")
        q = as_embedding_matrix(queries, self.dim, what="query")
        scores, idx = self.index.search(np.ascontiguousarray(q), min(int(k), int(self.index.ntotal)))
        return [[(self.ids[j], float(s)) for j, s in zip(ri, rs) if j >= 0] for ri, rs in zip(idx, scores)]

    def search_by_embedding(self, vector: np.ndarray, k: int = 10) -> list[tuple[Id, float]]:
        """Search with one embedding ([D] or [1, D])."""
        q = np.asarray(vector, dtype=np.float32)
        if q.ndim == 2 and q.shape[0] != 1:
            raise ValueError(f"search_by_embedding takes one vector, got {q.shape[0]}; use search_embeddings")
        return self.search_embeddings(q, k)[0]

    def search_by_text(self, query: str, k: int = 10) -> list[tuple[Id, float]]:
        """Images most similar to a text query."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        emb = self._require_encoder("search_by_text").encode_texts([query])
        return self.search_by_embedding(l2_normalize(emb), k)

    def search_by_image(self, image: Any, k: int = 10) -> list[tuple[Id, float]]:
        """Images most similar to an image (a path or a PIL image)."""
        encoder = self._require_encoder("search_by_image")
        pixels = encoder.preprocess(open_image(image))[None]
        return self.search_by_embedding(encoder.encode_images(pixels), k)

    # -------------------------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``clip.index`` and ``ids.json`` into ``directory`` (created), each atomically."""
        import faiss

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "dim": self.dim, "count": int(self.index.ntotal), "ids": self.ids}
        try:
            meta_bytes = json.dumps(meta).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise TypeError(f"ids cannot be stored as JSON: {e}") from e
        _atomic_write(folder / INDEX_FILE, faiss.serialize_index(self.index).tobytes())
        _atomic_write(folder / IDS_FILE, meta_bytes)
        return folder

    def load(self, directory: str | os.PathLike) -> "ImageSearchEngine":
        """Replace this engine's index and ids with those saved in ``directory``; returns self."""
        import faiss

        folder = Path(directory)
        index_path, ids_path = folder / INDEX_FILE, folder / IDS_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"search index incomplete: {index_path} is missing")
        meta = _read_ids_file(ids_path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{ids_path}: not a search index written by this engine ({FORMAT})")
        index = faiss.deserialize_index(np.frombuffer(index_path.read_bytes(), dtype=np.uint8))
        ids = meta["ids"]
        if index.ntotal != len(ids) or index.ntotal != meta.get("count"):
            raise ValueError(f"{folder}: index holds {index.ntotal} vectors but ids.json lists {len(ids)}")
        if index.d != self.dim:
            raise ValueError(f"{folder}: index dimension {index.d} does not match the encoder's {self.dim}")
        self.index, self.ids = index, list(ids)
        return self

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, encoder: Any = None) -> "ImageSearchEngine":
        """Open a saved index; the dimension comes from the file when no encoder is given."""
        dim = None
        if encoder is None:
            meta = _read_ids_file(Path(directory) / IDS_FILE)
            dim = meta.get("dim") if isinstance(meta, dict) else None
        return cls(encoder, dim=dim).load(directory)


def _read_ids_file(path: Path) -> Any:
    """The parsed ids file of a saved engine; a missing or unparsable one says which file it is."""
    if not path.is_file():
        raise FileNotFoundError(f"search index incomplete: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e

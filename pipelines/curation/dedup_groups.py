"""Near-duplicate groups inside one k-means cluster: pure numpy, no Ray, no I/O.

Why blocks: a cluster's all-pairs cosine matrix grows with the square of its size, so a task
that held it whole would need memory set by the data. :func:`link_duplicates` instead visits
the upper triangle of block pairs (``block_rows`` rows each), so at most two blocks of vectors
and one ``block_rows x block_rows`` similarity tile are alive at a time, and merges each tile's
links into one union-find over the cluster's rows. Connected components do not depend on the
order in which links arrive, so the groups, and each row's best similarity, are exactly those
of the unblocked computation, whatever the block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def merge_links(labels: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Union-find over the links ``u[i] -- v[i]``, vectorized; returns the updated ``labels``.

    ``labels[i]`` is the root of row ``i``, and a root is its component's smallest row (so
    labels are canonical: the same components always give the same labels). Roots hook onto the
    smaller of two linked roots, then pointer jumping flattens every path; repeat until each
    link's ends share a root. ``labels`` must be flat on entry (``labels[labels] == labels``).
    """
    u, v = labels[u], labels[v]
    while len(u):
        low = np.minimum(u, v)
        np.minimum.at(labels, u, low)
        np.minimum.at(labels, v, low)
        while True:  # pointer jumping until every row points at a root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        u, v = labels[u], labels[v]
        apart = u != v
        u, v = u[apart], v[apart]
    return labels


def link_duplicates(n: int, block: Callable[[int], np.ndarray], block_rows: int,
                    threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Components of the graph "cosine similarity >= ``threshold``" over ``n`` normalized rows.

    ``block(j)`` returns the vectors of rows ``[j * block_rows, (j + 1) * block_rows)`` (float32,
    L2-normalized); it is called again for each block pair, so a caller may read blocks from
    disk instead of holding them. Returns ``(labels, max_similarity)``: each row's component
    root (its smallest row number) and its highest similarity to any other row (``-inf`` for a
    lone row).
    """
    labels = np.arange(n, dtype=np.int64)
    best = np.full(n, -np.inf, dtype=np.float32)
    blocks = -(-n // block_rows)
    for i in range(blocks):
        a, a0 = block(i), i * block_rows
        for j in range(i, blocks):
            b, b0 = (a, a0) if j == i else (block(j), j * block_rows)
            sim = a @ b.T  # [len(a), len(b)]: the one tile alive at a time
            if i == j:
                np.fill_diagonal(sim, -np.inf)
            np.maximum(best[a0:a0 + len(a)], sim.max(axis=1), out=best[a0:a0 + len(a)])
            np.maximum(best[b0:b0 + len(b)], sim.max(axis=0), out=best[b0:b0 + len(b)])
            ii, jj = np.nonzero(sim >= threshold)
            del sim
            labels = merge_links(labels, ii + a0, jj + b0)
    return labels, best


@dataclass
class Groups:
    """The decision for each row of one cluster."""

    representative: np.ndarray  # int64: position (in the cluster) of the row its group keeps
    size: np.ndarray  # int64: rows in its group

    @property
    def keep(self) -> np.ndarray:
        return self.representative == np.arange(len(self.representative))


def choose_representatives(labels: np.ndarray, centroid_similarity: np.ndarray, ids: np.ndarray) -> Groups:
    """Keep, in each group, the row most similar to its cluster's centroid; ties go to the smallest id.

    Why this rule: it needs only a number each row already has (no second pass over the
    vectors), it is deterministic, and the centroid is the average of the cluster, so the copy
    nearest to it is the one that strays least from what the cluster is about: a crop, a recolour
    or heavy recompression moves an embedding away from it, the original moves least.
    """
    n = len(labels)
    order = np.lexsort((ids, -centroid_similarity.astype(np.float64), labels))  # by group, best first
    sorted_labels = labels[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, n))
    group_of_sorted = np.cumsum(first) - 1
    representative = np.empty(n, dtype=np.int64)
    representative[order] = order[starts][group_of_sorted]
    size = np.empty(n, dtype=np.int64)
    size[order] = sizes[group_of_sorted]
    return Groups(representative, size)


__all__ = ["Groups", "choose_representatives", "link_duplicates", "merge_links"]

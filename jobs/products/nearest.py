"""Each row's most similar earlier row, over unit embeddings: exact, or within k-means buckets.

- ``exact``: every row against every earlier row, ``block_rows`` by ``block_rows`` (a float32
  similarity block of that size squared). Quadratic: at a million rows, hours on two cores
  (``bench/RESULTS.md``, section 14).
- ``buckets``: spherical k-means on a sample cuts the rows into buckets of about
  ``BUCKET_ROWS``; a row is stored in its nearest centroid's bucket and compared, exactly and
  blockwise, with the earlier rows of its ``PROBES`` nearest centroids' buckets (as an IVF
  index probes lists). Every similarity it reports is exact; a pair split between buckets the
  row does not probe is missed, so it may find fewer duplicates, never a false one. At a
  million rows it compares some 80 times fewer pairs (bench section 14: its time, and its
  recall of planted copies).

Both take the embeddings as an (N, D) array or ``numpy.memmap`` and read them a block at a
time; ties go to the earliest row.
"""

from __future__ import annotations

import numpy as np

SEARCHES = ("exact", "buckets")
BUCKET_ROWS = 1024  # rows per bucket on average: a bucket pair is one small block
# Buckets a row is compared in: its own centroid's and the next five nearest. On random 768-d
# embeddings (no clusters) at 1M rows, 6 find 96% of planted copies and 3 find 87%, in 1.6
# times the time (bench/RESULTS.md, section 14).
PROBES = 6
KMEANS_SAMPLE = 64  # rows sampled per bucket to train the centroids (k-means needs ~30+)
KMEANS_ROUNDS = 10  # Lloyd iterations: assignments barely move after a few
SEED = 0  # the sample and the first centroids: the same rows give the same buckets


def nearest_earlier(embeddings: np.ndarray, block_rows: int, search: str = "exact"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each row of (N, D) unit ``embeddings``: the index of its most similar earlier row
    (the earliest of equals) and that cosine similarity (-inf when none was compared)."""
    n = len(embeddings)
    best = np.zeros(n, np.int64)
    similarity = np.full(n, -np.inf, np.float32)
    if search == "exact":
        for start in range(0, n, block_rows):
            rows = np.arange(start, min(start + block_rows, n))
            for other in range(0, rows[-1] + 1, block_rows):
                _compare(embeddings, rows, np.arange(other, min(other + block_rows, n)),
                         best, similarity)
    elif search == "buckets":
        home, probed = _buckets(embeddings, block_rows)
        count = int(probed.max(initial=0)) + 1
        for members, queries in zip(_grouped(home, count), _grouped(probed, count)):
            for q in range(0, len(queries), block_rows):
                for s in range(0, len(members), block_rows):
                    _compare(embeddings, queries[q:q + block_rows], members[s:s + block_rows],
                             best, similarity)
    else:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    return best, similarity


def _compare(embeddings, rows: np.ndarray, others: np.ndarray, best: np.ndarray,
             similarity: np.ndarray) -> None:
    """Compare ``rows`` with the earlier of ``others`` (both ascending row indexes), keeping
    each row's best match in ``best`` and ``similarity``."""
    if not len(others) or others[0] >= rows[-1]:
        return
    block = _read(embeddings, rows) @ _read(embeddings, others).T
    if others[-1] >= rows[0]:  # only earlier rows count
        block[others[None, :] >= rows[:, None]] = -np.inf
    arg = block.argmax(axis=1)  # the first of equals: the earliest, as others ascend
    value = block[np.arange(len(rows)), arg]
    found = others[arg]
    better = (value > similarity[rows]) | ((value == similarity[rows]) & (found < best[rows]))
    best[rows[better]] = found[better]
    similarity[rows[better]] = value[better]


def _read(embeddings, rows: np.ndarray) -> np.ndarray:
    """Rows as float32; a contiguous run is one slice of the memmap, not a gather."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return np.asarray(embeddings[rows[0]:rows[-1] + 1], np.float32)
    return np.asarray(embeddings[rows], np.float32)


def _buckets(embeddings, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's bucket (its nearest centroid), and the ``PROBES`` buckets it is compared in
    (N, PROBES), from spherical k-means trained on a sample."""
    n = len(embeddings)
    k = max(1, round(n / BUCKET_ROWS))
    rng = np.random.default_rng(SEED)
    sample = np.sort(rng.choice(n, min(n, k * KMEANS_SAMPLE), replace=False))
    points = np.asarray(embeddings[sample], np.float32)
    centroids = points[rng.choice(len(points), k, replace=False)].copy()
    for _ in range(KMEANS_ROUNDS):
        nearest = (points @ centroids.T).argmax(axis=1)
        counts = np.bincount(nearest, minlength=k)
        present = counts > 0  # an empty bucket keeps its centroid
        starts = (np.cumsum(counts) - counts)[present]
        sums = np.add.reduceat(points[np.argsort(nearest, kind="stable")], starts, axis=0)
        centroids[present] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    probes = min(PROBES, k)
    probed = np.empty((n, probes), np.int64)
    for start in range(0, n, block_rows):
        scores = _read(embeddings, np.arange(start, min(start + block_rows, n))) @ centroids.T
        top = np.argpartition(-scores, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        probed[start:start + len(scores)] = np.take_along_axis(top, order, axis=1)
    return probed[:, 0].copy(), probed


def _grouped(buckets: np.ndarray, count: int) -> list[np.ndarray]:
    """Per bucket ``0 .. count - 1``, the ascending rows that name it (``buckets``: (N,) or
    (N, P) bucket numbers)."""
    rows = np.repeat(np.arange(len(buckets)), buckets.size // max(1, len(buckets)))
    flat = buckets.reshape(-1)
    order = np.argsort(flat, kind="stable")  # stable: rows stay ascending within a bucket
    cuts = np.searchsorted(flat[order], np.arange(count + 1))
    return [rows[order[a:b]] for a, b in zip(cuts[:-1], cuts[1:])]

"""A set of 64-bit row hashes in sorted numpy runs: about 8 bytes a member.

The driver must know which of millions of rows are already committed, and which ids it has
already seen, without holding millions of Python strings. Runs are merged as they grow (like a
log-structured merge tree), so lookups stay at a few binary searches.
"""

from __future__ import annotations

import hashlib

import numpy as np


def row_hash(row_id: str, occurrence: int = 0) -> int:
    """The 64-bit key of the ``occurrence``-th row carrying ``row_id`` (0 for the first)."""
    text = row_id if occurrence == 0 else f"{row_id}\x00{occurrence}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


def key_hashes(keys: list[bytes]) -> np.ndarray:
    """``row_hash`` of many first occurrences at once, from their ids' UTF-8 bytes.

    One digest per id is unavoidable; joining the digests and reading them as big-endian
    uint64 skips the Python ints, which is most of the cost at millions of rows.
    """
    blake2b = hashlib.blake2b
    joined = b"".join([blake2b(k, digest_size=8).digest() for k in keys])
    return np.frombuffer(joined, dtype=">u8").astype(np.uint64)


def row_hashes(table) -> np.ndarray:
    """``row_hash`` of every row of a manifest table (its ``id`` and ``occurrence`` columns):
    first occurrences (nearly all) at once, repeats one by one."""
    ids, occurrences = table["id"].to_pylist(), table["occurrence"].to_pylist()
    hashes = key_hashes([(i or "").encode("utf-8", "surrogatepass") for i in ids])
    for index, occurrence in enumerate(occurrences):
        if occurrence:
            hashes[index] = row_hash(ids[index] or "", occurrence)
    return hashes


# Runs stop merging at this many members (8 MB): merging two runs needs room for both and the
# result, so an unbounded last merge at 10 million rows would briefly hold 160 MB. Past the cap
# a lookup searches a few more runs, which costs little once its queries are sorted.
MAX_RUN_MEMBERS = 1 << 20


class HashSet:
    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @classmethod
    def of(cls, chunks: list[np.ndarray]) -> HashSet:
        """The hashes in ``chunks`` (emptied as they are taken), as one sorted run: for a set
        made whole before it is looked in, a lookup then searches one array rather than the
        dozen runs that ``add`` grows at millions. Briefly holds twice the hashes."""
        joined = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)
        chunks.clear()
        joined.sort()
        repeated = joined[1:] == joined[:-1]
        if repeated.any():
            joined = joined[np.concatenate(([True], ~repeated))]
        del repeated
        found = cls()
        found.add(joined, checked=True)
        return found

    def runs(self) -> list[np.ndarray]:
        """The members, as disjoint sorted runs."""
        return list(self._runs)

    def add(self, hashes: np.ndarray | list[int], checked: bool = False) -> None:
        """Add hashes (duplicates of present members are ignored).

        ``checked=True`` says the caller knows ``hashes`` are sorted, distinct and not members
        yet (it has just asked ``contains``), which saves sorting and searching them again.
        """
        new = np.asarray(hashes, dtype=np.uint64)
        if not checked:
            new = np.unique(new)
            new = new[~self.contains(new, presorted=True)]
        if len(new) == 0:
            return
        self._size += len(new)
        self._runs.append(new)
        # Keep run sizes roughly geometric so there are O(log n) runs to search. Runs are
        # disjoint, so a merge is a concatenation sorted in place.
        while (len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1])
               and len(self._runs[-2]) + len(self._runs[-1]) <= MAX_RUN_MEMBERS):
            last = self._runs.pop()
            merged = np.concatenate((self._runs.pop(), last))
            del last
            merged.sort(kind="stable")  # timsort: two sorted runs merge in linear time
            self._runs.append(merged)

    def contains(self, hashes: np.ndarray | list[int], presorted: bool = False) -> np.ndarray:
        """A boolean array: which of ``hashes`` are members.

        The queries are searched in sorted order: consecutive binary searches then walk the
        same few cache lines of a large run instead of jumping across all of it.
        """
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not self._runs or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        order = None if presorted else np.argsort(hashes)
        queries = hashes if order is None else hashes[order]
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            idx = np.searchsorted(run, queries)
            idx[idx == len(run)] = 0
            found |= run[idx] == queries
        if order is None:
            return found
        unsorted = np.empty_like(found)
        unsorted[order] = found
        return unsorted

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


class HashSet:
    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, hashes: np.ndarray | list[int]) -> None:
        """Add hashes (duplicates of present members are ignored)."""
        new = np.unique(np.asarray(hashes, dtype=np.uint64))
        if len(new) == 0:
            return
        new = new[~self.contains(new)]
        self._size += len(new)
        self._runs.append(new)
        # Keep run sizes roughly geometric so there are O(log n) runs to search. Runs are
        # disjoint, so a merge is a concatenation sorted in place: twice the members at the
        # peak, where np.union1d needs four times (it matters at 10 million rows).
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            last = self._runs.pop()
            merged = np.concatenate((self._runs.pop(), last))
            del last
            merged.sort()
            self._runs.append(merged)

    def contains(self, hashes: np.ndarray | list[int]) -> np.ndarray:
        """A boolean array: which of ``hashes`` are members."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            idx = np.searchsorted(run, hashes)
            idx[idx == len(run)] = 0
            found |= run[idx] == hashes
        return found

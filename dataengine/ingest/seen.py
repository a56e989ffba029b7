"""The photo ids an ingest has already stored, in about 8 bytes per id rather than a Python string each.

At YFCC100M's 99M lines a ``set[str]`` of photo ids takes ~10 GB (a 60-byte string object plus a set slot per
id); :class:`KeySet` holds the ids that are integers (YFCC photo ids; the 16-hex keys of image folders) in numpy
arrays, queried and filled a block of keys at a time, and keeps only other keys (a foreign webdataset's names)
in a Python set. Membership is exact: nothing is hashed away.

The integers live in a small open-addressing table (the recent ones) and, once it fills, in sorted runs of at
most ``run_cap`` values that are searched by bisection. A single hash table grown by doubling would hold 11-21
bytes per id and, while growing, the old and the new table at once: 1.6 GB on top of 1 GB at 50M ids. Runs hold
8 bytes per id, and merging two of them needs at most ``run_cap`` values' worth of extra memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

_DECIMAL = re.compile(r"[1-9][0-9]{0,18}|0")  # canonical, as YFCC photo ids are checked to be
_HEX16 = re.compile(r"[0-9a-f]{16}")  # dataengine.sources.folder_key
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive ids over the table
_EMPTY = np.uint64(2**64 - 1)  # a free table slot (the value itself is kept as a flag)

TABLE_BITS = 22
"""The table of recent ids grows up to ``2**TABLE_BITS`` slots (32 MiB) before its ids move to a sorted run."""
RUN_CAP = 1 << 24
"""Runs are merged pairwise while the result holds at most this many ids (128 MiB)."""


class _IntSet:
    """A set of uint64 values: a linear-probing table (grown at a load of 3/4 up to ``2**max_bits`` slots)
    whose values move to a sorted run whenever it is full; runs of similar length are merged up to ``run_cap``."""

    def __init__(self, max_bits: int = TABLE_BITS, run_cap: int = RUN_CAP) -> None:
        self._max_bits = max_bits
        self._run_cap = run_cap
        self._runs: list[np.ndarray] = []
        self._has_empty = False  # whether the value 2**64 - 1 (the free-slot marker) is in the set
        self.size = 0
        self._reset_table(min(10, max_bits))

    def _reset_table(self, bits: int) -> None:
        self._bits = bits
        self._table = np.full(1 << bits, _EMPTY, np.uint64)
        self._in_table = 0

    @property
    def nbytes(self) -> int:
        return self._table.nbytes + sum(run.nbytes for run in self._runs)

    def _home(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((values * _MIX) >> np.uint64(64 - self._bits)).astype(np.int64)

    def contains(self, values: np.ndarray) -> np.ndarray:
        found = values == _EMPTY
        if found.any():
            found &= self._has_empty
        for run in self._runs:
            position = np.searchsorted(run, values)
            np.minimum(position, len(run) - 1, out=position)
            found |= run[position] == values
        if self._in_table:
            slots = self._home(values)
            pending = np.flatnonzero(values != _EMPTY)
            mask = len(self._table) - 1
            while len(pending):
                slot = slots[pending]
                stored = self._table[slot]
                hit = stored == values[pending]
                found[pending[hit]] = True
                pending = pending[(stored != _EMPTY) & ~hit]  # a free slot ends the probe: absent
                slots[pending] = (slots[pending] + 1) & mask
        return found

    def add(self, values: np.ndarray) -> None:
        """Insert ``values`` (distinct, none of them present yet)."""
        empty = values == _EMPTY
        if empty.any():
            self._has_empty = True
            self.size += 1
            values = values[~empty]
        while len(values):
            room = (3 << self._bits) // 4 - self._in_table
            if room <= 0:
                self._make_room()
                continue
            self._insert(values[:room])
            values = values[room:]

    def _insert(self, values: np.ndarray) -> None:
        slots = self._home(values)
        pending = np.arange(len(values))
        mask = len(self._table) - 1
        while len(pending):
            slot = slots[pending]
            free = self._table[slot] == _EMPTY
            # Of several values probing the same free slot, the first takes it; the others probe on.
            taken_slots, first = np.unique(slot[free], return_index=True)
            self._table[taken_slots] = values[pending[free][first]]
            moved = np.ones(len(pending), bool)
            moved[np.flatnonzero(free)[first]] = False
            pending = pending[moved]
            slots[pending] = (slots[pending] + 1) & mask
        self._in_table += len(values)
        self.size += len(values)

    def _make_room(self) -> None:
        """Double the full table while it may grow; else move its values to a new sorted run."""
        stored = self._table[self._table != _EMPTY]
        if self._bits < self._max_bits:
            self._reset_table(self._bits + 1)
            self.size -= len(stored)
            self._insert(stored)
            return
        stored.sort()
        self._runs.append(stored)
        self._reset_table(self._bits)
        while len(self._runs) > 1 and len(self._runs[-2]) <= len(self._runs[-1]) + len(self._runs[-1]) // 2 \
                and len(self._runs[-2]) + len(self._runs[-1]) <= self._run_cap:
            last = self._runs.pop()
            merged = np.concatenate((self._runs.pop(), last))
            del last
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
            self._runs.append(merged)


class KeySet:
    """The set of sample keys seen so far; exact, and compact for integer keys."""

    def __init__(self, keys: Iterable[str] = (), max_bits: int = TABLE_BITS, run_cap: int = RUN_CAP) -> None:
        self._decimal = _IntSet(max_bits, run_cap)
        self._hex = _IntSet(max_bits, run_cap)
        self._other: set[str] = set()
        self.add_many(list(keys))

    @property
    def nbytes(self) -> int:
        """Bytes of the integer keys' arrays (the other keys' Python set not counted)."""
        return self._decimal.nbytes + self._hex.nbytes

    def __len__(self) -> int:
        return self._decimal.size + self._hex.size + len(self._other)

    def __contains__(self, key: str) -> bool:
        return bool(self.contains_many([key])[0])

    def add(self, key: str) -> None:
        if key not in self:
            self.add_many([key])

    def contains_many(self, keys: Sequence[str]) -> np.ndarray:
        """Whether each of ``keys`` is in the set (one vectorised query per kind of key)."""
        found = np.zeros(len(keys), bool)
        for table, index, values in self._split(keys):
            found[index] = table.contains(values)
        for i, key in enumerate(keys):
            if not (_DECIMAL.fullmatch(key) or _HEX16.fullmatch(key)):
                found[i] = key in self._other
        return found

    def add_many(self, keys: Sequence[str]) -> None:
        """Add ``keys`` (duplicates among them and keys already present are ignored)."""
        for table, _, values in self._split(keys):
            values = np.unique(values)
            table.add(values[~table.contains(values)])
        self._other.update(k for k in keys if not (_DECIMAL.fullmatch(k) or _HEX16.fullmatch(k)))

    def _split(self, keys: Sequence[str]) -> list[tuple[_IntSet, np.ndarray, np.ndarray]]:
        decimal, hex16 = [], []
        for i, key in enumerate(keys):
            if _DECIMAL.fullmatch(key):  # at most 19 digits: below 2**64
                decimal.append(i)
            elif _HEX16.fullmatch(key):
                hex16.append(i)
        parts = []
        if decimal:
            index = np.asarray(decimal)
            parts.append((self._decimal, index, np.array([int(keys[i]) for i in decimal], np.uint64)))
        if hex16:
            index = np.asarray(hex16)
            parts.append((self._hex, index, np.array([int(keys[i], 16) for i in hex16], np.uint64)))
        return parts

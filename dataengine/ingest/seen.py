"""The photo ids an ingest has already stored, in about 9 bytes per id rather than a Python string each.

At YFCC100M's 99M lines a ``set[str]`` of photo ids takes ~10 GB (a 60-byte string object plus a set slot per
id); :class:`KeySet` holds the ids that are integers (YFCC photo ids; the 16-hex keys of image folders) in
open-addressing hash tables of numpy arrays, queried and filled a block of keys at a time, and keeps only
other keys (a foreign webdataset's names) in a Python set. Membership is exact: nothing is hashed away.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

_DECIMAL = re.compile(r"[1-9][0-9]{0,18}|0")  # canonical, as YFCC photo ids are checked to be
_HEX16 = re.compile(r"[0-9a-f]{16}")  # dataengine.sources.folder_key
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive ids over the table


class _IntTable:
    """A set of uint64 values: linear probing over ``2**bits`` slots, grown at a load of 3/4."""

    def __init__(self, bits: int = 10) -> None:
        self._bits = bits
        self.values = np.zeros(1 << bits, np.uint64)
        self.used = np.zeros(1 << bits, bool)
        self.size = 0

    def _home(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((values * _MIX) >> np.uint64(64 - self._bits)).astype(np.int64)

    def contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), bool)
        slots = self._home(values)
        pending = np.arange(len(values))
        mask = len(self.values) - 1
        while len(pending):
            slot = slots[pending]
            used = self.used[slot]
            hit = used & (self.values[slot] == values[pending])
            found[pending[hit]] = True
            pending = pending[used & ~hit]  # an empty slot ends the probe: absent
            slots[pending] = (slots[pending] + 1) & mask
        return found

    def add(self, values: np.ndarray) -> None:
        """Insert ``values`` (distinct, none of them present yet)."""
        if (self.size + len(values)) * 4 > len(self.values) * 3:
            self._grow(self.size + len(values))
        slots = self._home(values)
        pending = np.arange(len(values))
        mask = len(self.values) - 1
        while len(pending):
            slot = slots[pending]
            free = ~self.used[slot]
            # Of several values probing the same free slot, the first takes it; the others probe on.
            taken_slots, first = np.unique(slot[free], return_index=True)
            winners = pending[free][first]
            self.values[taken_slots] = values[winners]
            self.used[taken_slots] = True
            moved = np.ones(len(pending), bool)
            moved[np.flatnonzero(free)[first]] = False
            pending = pending[moved]
            slots[pending] = (slots[pending] + 1) & mask
        self.size += len(values)

    def _grow(self, needed: int) -> None:
        old = self.values[self.used]
        bits = self._bits
        while needed * 4 > (3 << bits):
            bits += 1
        self.__init__(bits)
        self.add(old)


class KeySet:
    """The set of sample keys seen so far; exact, and compact for integer keys."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._decimal = _IntTable()
        self._hex = _IntTable()
        self._other: set[str] = set()
        self.add_many(list(keys))

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

    def _split(self, keys: Sequence[str]) -> list[tuple[_IntTable, np.ndarray, np.ndarray]]:
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

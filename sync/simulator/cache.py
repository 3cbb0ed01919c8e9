"""What the admin API rendered, kept between requests: each row's JSON bytes, and each
filtered, ordered listing.

Why: the simulator shares the benchmark's two cores with the sync it serves, so its CPU per
request shows up as the sync's latency. Rendering an attempt row (seeded draws, datetime
text, URLs) and serializing it cost ~25 µs: 5 ms a page of 200, every time it was asked for.

What is served stays byte for byte the same, however the data changes:
- A row is kept with its fingerprint: the objects and values it was rendered from,
  compared by identity (a `date` subclass equals the date yet prints otherwise; True == 1
  yet serializes otherwise). While the data set's edit count (data.EditCount: every
  change, by a method or by hand) stands still, every kept row is current; once it moved,
  each row is checked against its fingerprint the next time it is asked for, and rendered
  again if anything differs. The records a row is rendered from are adopted by the data
  set first (EditCount.adopt), so that setting any of their fields later moves its count,
  wherever the record was made.
- A listing is kept while the edit count and a token for the lists it was computed from
  are those it was computed under: the data set's attempts index (rebuilt whenever the
  exams or their attempts lists changed, by any means), or the users list as last seen.
What neither sees: a mutable value changed in place (a profile's `custom_fields` dict),
and an attempt of an exam's list replaced in place by another, the list's length
unchanged (the attempts index never saw that). Assign a new value or a new list instead,
as `Dataset.update_user` and `Dataset.delete_attempt` do.

Bounds: rows are kept for the last BASES base URLs (Host headers) asked with, and the rows
of items no longer served (deleted ones) are dropped once they could be many (`prune`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Container, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import orjson

from sync.simulator.data import EditCount

T = TypeVar("T")
Fingerprint = tuple[object, ...]


def same(one: Fingerprint, other: Fingerprint) -> bool:
    """Whether two fingerprints hold the very same objects, position by position."""
    return len(one) == len(other) and all(map(operator.is_, one, other))


# A kept row, as one tuple: (the edit count at which it was last known current, its JSON,
# *the fingerprint it was rendered from). One object per row, not three: W2 keeps 150,000,
# and every object that holds references is one more for the garbage collector to walk.
_Row = tuple[Any, ...]
_EDITS, _BODY, _FINGERPRINT = 0, 1, 2


class RowCache(Generic[T]):
    """One kind of row (attempt, exam, user, ...) of one data set as JSON bytes, by base
    URL and key.

    `edits` is the data set's edit count; `key` names an item (its id); `fingerprint`
    lists everything `render` reads of it; `render(item, base)` is the row as it is served."""

    BASES = 2  # a sync asks with one Host; a test may try another: more are not kept

    def __init__(
        self,
        edits: EditCount,
        key: Callable[[T], Hashable],
        fingerprint: Callable[[T], Fingerprint],
        render: Callable[[T, str], Any],
    ) -> None:
        self._edits = edits
        self._key = key
        self._fingerprint = fingerprint
        self._render = render
        self._by_base: dict[str, dict[Hashable, _Row]] = {}  # the last used last

    def bodies(self, items: Iterable[T], base: str) -> list[bytes]:
        """Each item's row, serialized, in order."""
        rows = self._rows(base)
        edits = self._edits.value
        bodies = []
        for item in items:
            key = self._key(item)
            row = rows.get(key)
            if row is None or row[_EDITS] != edits:
                row = rows[key] = self._current(row, item, base, edits)
            bodies.append(row[_BODY])
        return bodies

    def body(self, item: T, base: str) -> bytes:
        return self.bodies((item,), base)[0]

    def kept(self) -> dict[str, int]:
        """How many rows are kept, by base URL, least recently used first."""
        return {base: len(rows) for base, rows in self._by_base.items()}

    def prune(self, count: int, live: Callable[[], Container[Hashable]]) -> None:
        """Drops the rows of items no longer served (`live()`: the keys of those that are;
        `count`: how many), once they could be many: when a base keeps more rows than a
        quarter over `count`. Cheap to call on every request."""
        for rows in self._by_base.values():
            if len(rows) > count + count // 4 + 64:
                keys = live()
                for key in [key for key in rows if key not in keys]:
                    del rows[key]

    def _rows(self, base: str) -> dict[Hashable, _Row]:
        """The rows kept for `base`, made the last used; those of the least recently used
        base go once there are BASES."""
        by_base = self._by_base
        rows = by_base.get(base)
        if rows is None:
            if len(by_base) >= self.BASES:
                del by_base[next(iter(by_base))]
            rows = by_base[base] = {}
        elif next(reversed(by_base)) != base:
            by_base[base] = by_base.pop(base)
        return rows

    def _current(self, row: _Row | None, item: T, base: str, edits: int) -> _Row:
        """The row kept, if what it was rendered from is unchanged; else rendered again."""
        fingerprint = self._fingerprint(item)
        if row is not None and same(fingerprint, row[_FINGERPRINT:]):
            return (edits, row[_BODY], *fingerprint)  # its records were adopted when it was rendered
        self._edits.adopt_all(fingerprint)  # from now on, setting their fields is an edit
        # A copy, to keep: orjson writes into a buffer of several KB and shrinks it in
        # place, and each kept row would pin its buffer's whole span (W2's rows took
        # 1.2 GB, not 90 MB).
        body = bytes(memoryview(orjson.dumps(self._render(item, base))))
        return (edits, body, *fingerprint)


class Listings:
    """Filtered, ordered listings of one data set by their query, kept while its edit count
    and `token` (an object that stands for the lists they were computed from, compared by
    identity) are those they were computed under.

    A nightly walk asks for a `date_0` it never asks for again: the oldest listings go
    once there are LIMIT of them."""

    LIMIT = 32

    def __init__(self, edits: EditCount) -> None:
        self._edits = edits
        self._kept: dict[Hashable, tuple[int, object, Sequence[Any]]] = {}

    def get(self, key: Hashable, token: object, compute: Callable[[], Sequence[T]]) -> Sequence[T]:
        edits = self._edits.value
        kept = self._kept.get(key)
        if kept is not None and kept[0] == edits and kept[1] is token:
            return kept[2]
        listing = compute()  # raises for a malformed query: nothing is kept for it
        if key not in self._kept and len(self._kept) >= self.LIMIT:
            del self._kept[next(iter(self._kept))]
        self._kept[key] = (edits, token, listing)
        return listing

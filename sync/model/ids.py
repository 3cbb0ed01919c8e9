"""A set of integer ids that costs bits, not objects.

A walk keeps every id its listing showed until the listing is done: the writer marks the
stored rows it did not show as deleted. In a Python set each id is an int object of 32
bytes plus a slot of the hash table, ~60 bytes at 150,000 ids (~9 MB), and the objects
stay scattered among the pages' freed payloads, so the heap cannot shrink behind them.
Listed ids are dense (an institute's attempts are runs of consecutive ids), so here each
run of 1,024 ids is one integer used as a bitmask: ~170 bytes for up to 1,024 ids,
~90 bytes for a lone one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Set

_SHIFT = 10  # 1,024 ids a mask
_LOW = (1 << _SHIFT) - 1


class IdSet(Set[int]):
    """Integer ids (negative ones too): add, discard, `in`, len, and iteration in ascending order."""

    __slots__ = ("_masks", "_count")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        self._masks: dict[int, int] = {}  # id >> _SHIFT → a bit for each id of that run
        self._count = 0
        self.update(ids)

    def add(self, ident: int) -> None:
        high, bit = ident >> _SHIFT, 1 << (ident & _LOW)
        mask = self._masks.get(high, 0)
        if not mask & bit:
            self._masks[high] = mask | bit
            self._count += 1

    def update(self, ids: Iterable[int]) -> None:
        for ident in ids:
            self.add(ident)

    def discard(self, ident: int) -> None:
        high, bit = ident >> _SHIFT, 1 << (ident & _LOW)
        mask = self._masks.get(high, 0)
        if mask & bit:
            mask ^= bit
            if mask:
                self._masks[high] = mask
            else:
                del self._masks[high]
            self._count -= 1

    def __contains__(self, ident: object) -> bool:
        if type(ident) is not int:
            return isinstance(ident, int) and int(ident) in self
        return bool(self._masks.get(ident >> _SHIFT, 0) >> (ident & _LOW) & 1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for high in sorted(self._masks):
            base, mask = high << _SHIFT, self._masks[high]
            while mask:
                lowest = mask & -mask
                yield base + lowest.bit_length() - 1
                mask ^= lowest

    def __repr__(self) -> str:
        return f"IdSet({len(self)} ids)"

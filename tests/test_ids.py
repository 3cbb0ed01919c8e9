"""IdSet: the ids a walk saw, as bits; it must answer exactly as a set of ints would."""

from __future__ import annotations

import random

import pytest

from sync.model.ids import IdSet


@pytest.mark.parametrize("spread", [1, 7, 5_000, 2**40])  # dense runs to one id in a trillion
def test_it_answers_as_a_set_of_the_same_ids(spread: int) -> None:
    chooser = random.Random(spread)
    ids = [chooser.randrange(-50 * spread, 50_000 * spread) for _ in range(20_000)]
    ids += ids[:500]  # seen twice
    expected, ours = set(), IdSet()
    for ident in ids:
        ours.add(ident)
        expected.add(ident)
    assert len(ours) == len(expected)
    assert list(ours) == sorted(expected)  # ascending, each once
    probes = ids[:2000] + [chooser.randrange(-60 * spread, 60_000 * spread) for _ in range(5000)]
    assert [probe in ours for probe in probes] == [probe in expected for probe in probes]
    assert ours == expected and IdSet(ids) == ours
    for ident in ids[::3] + probes[-100:]:  # present or not, some twice
        ours.discard(ident)
        expected.discard(ident)
    assert len(ours) == len(expected) and list(ours) == sorted(expected)
    assert [probe in ours for probe in probes] == [probe in expected for probe in probes]


def test_boundaries_of_a_mask_and_odd_members() -> None:
    ids = IdSet([-1025, -1024, -1, 0, 1023, 1024, 2**63 - 1, -(2**63)])
    assert list(ids) == [-(2**63), -1025, -1024, -1, 0, 1023, 1024, 2**63 - 1]
    assert -1023 not in ids and 1 not in ids and 1025 not in ids
    assert True not in ids and False in ids  # as in a set of ints: False == 0
    assert "0" not in ids and None not in ids
    assert not IdSet() and len(IdSet([5, 5, 5])) == 1


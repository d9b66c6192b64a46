"""Tests for recgen.types: normalising constructors and catalog invariants."""

from __future__ import annotations

import pytest

from recgen.errors import DataError
from recgen.types import Catalog, Event, History, Item


def _catalog() -> Catalog:
    return Catalog(
        items=(
            Item(item_id="1", title="Heat (1995)", attributes={"genres": ("Action", "Crime")}),
            Item(item_id="2", title="Alien (1979)"),
            Item(item_id="3", title="Heat (1986)"),
        ),
        name="tiny",
    )


def test_catalog_lookup_and_positions() -> None:
    catalog = _catalog()
    assert len(catalog) == 3
    assert "2" in catalog
    assert "9" not in catalog
    assert catalog["3"].title == "Heat (1986)"
    assert [catalog.position(i) for i in ("1", "2", "3")] == [0, 1, 2]
    assert catalog.titles[1] == "Alien (1979)"


def test_catalog_refuses_duplicate_ids() -> None:
    with pytest.raises(DataError, match=r"duplicate item_id '1'.*positions 0 and 1"):
        Catalog(items=(Item(item_id="1", title="A"), Item(item_id="1", title="B")))


def test_fingerprint_changes_with_titles_and_order() -> None:
    a = _catalog()
    b = Catalog(items=(*a.items[:2], Item(item_id="3", title="Heat (1987)")))
    c = Catalog(items=tuple(reversed(a.items)))
    assert a.fingerprint() == _catalog().fingerprint()
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3


def test_history_create_accepts_loose_input() -> None:
    h = History.create(
        ["1", Event(item_id="2", rating=4.0), {"item_id": 3, "timestamp": "10", "rating": 5}],
        user_id="u",
    )
    assert h.item_ids == ("1", "2", "3")
    assert h.events[2] == Event(item_id="3", timestamp=10.0, rating=5.0)
    assert h.user_id == "u"
    assert History.create(h) is h
    assert h.head(2).item_ids == ("1", "2")


def test_history_create_rejects_bad_elements_by_position() -> None:
    with pytest.raises(DataError, match="history element 1"):
        History.create(["1", 42])  # type: ignore[list-item]
    with pytest.raises(DataError, match="history element 0"):
        History.create([{"title": "Heat"}])

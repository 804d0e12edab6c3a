"""Soft reconfiguration inbound: the routes a peer sent, before import policy.

A session keeps them when it is configured to (`soft_reconfiguration_inbound`) or when its peer
cannot refresh (no route refresh capability): a new import policy is then applied to this table
instead of to routes asked for again. The Adj-RIB-In keeps only what import accepted, rewritten.
What it costs: one dict entry per route, the attribute sets shared (interned) with the
Adj-RIB-In's (measured in docs/bgp.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from apsv.bgp.path_attributes import PathAttributes

Family = tuple[int, int]


class ReceivedRoutes:
    __slots__ = ("_by_family",)

    def __init__(self) -> None:
        self._by_family: dict[Family, dict[bytes, PathAttributes]] = {}

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_family.values())

    def learn(self, family: Family, keys: Iterable[bytes], attrs: PathAttributes) -> int:
        """Keep `keys` with `attrs`; returns how many routes the family holds now."""
        table = self._by_family.setdefault(family, {})
        table.update(dict.fromkeys(keys, attrs))
        return len(table)

    def forget(self, family: Family, keys: Iterable[bytes]) -> None:
        table = self._by_family.get(family)
        if table:
            for k in keys:
                table.pop(k, None)

    def drop(self, family: Family) -> None:
        self._by_family.pop(family, None)

    def clear(self) -> None:
        self._by_family.clear()

    def tables(self) -> list[tuple[Family, dict[bytes, PathAttributes]]]:
        return sorted(self._by_family.items())

    def groups(self, family: Family) -> Iterator[tuple[PathAttributes, list[bytes]]]:
        """The family's routes grouped by attribute set (one policy evaluation per set)."""
        by_attrs: dict[int, tuple[PathAttributes, list[bytes]]] = {}
        for k, pa in self._by_family.get(family, {}).items():
            by_attrs.setdefault(id(pa), (pa, []))[1].append(k)
        return iter(by_attrs.values())

    def load(self, family: Family, rows: dict[bytes, PathAttributes]) -> None:
        self._by_family[family] = rows

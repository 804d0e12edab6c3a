"""Adj-RIB-In / Loc-RIB and the RFC 4271 §9.1 decision process, by hand and on a real RIB dump."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from mrtparse import Reader

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import Attribute
from apsv.bgp.context import CodecContext
from apsv.bgp.nlri import encode_prefix, prefix_str
from apsv.bgp.path_attributes import PathAttributes
from apsv.bgp.rib import AdjRibIn, LocRib, Source
from apsv.mrt.replay import load_rib_dump, replay_updates
from tests.conftest import shared_data_dir

CTX = CodecContext()
P = encode_prefix("203.0.113.0/24")
FAM = C.IPV4_UNICAST


def attrs(
    path: tuple[int, ...], origin: int = 0, med: int | None = None, lp: int | None = None, ibgp: bool = False
) -> PathAttributes:
    items = [
        Attribute(0x40, 1, origin),
        Attribute(0x40, 2, ((2, path),) if path else ()),
        Attribute(0x40, 3, "198.51.100.9"),
    ]
    if med is not None:
        items.append(Attribute(0x80, 4, med))
    if lp is not None:
        items.append(Attribute(0x40, 5, lp))
    return PathAttributes.build(items, CodecContext(ibgp=ibgp))


def source(name: str, asn: int, rid: str, ip: str, local_as: int = 64500) -> Source:
    return Source(name, asn, local_as, rid, ip)


def best_name(loc: LocRib, prefix: bytes = P) -> str | None:
    bp = loc.best_path(prefix)
    return None if bp is None else bp[1].source.name


def setup(*peers: tuple[str, int, str, str]) -> tuple[LocRib, dict[str, AdjRibIn]]:
    loc = LocRib(FAM)
    ribs = {}
    for name, asn, rid, ip in peers:
        ribs[name] = AdjRibIn(source(name, asn, rid, ip), FAM)
        loc.add_source(ribs[name])
    return loc, ribs


def test_shortest_as_path_then_origin_then_router_id() -> None:
    loc, r = setup(
        ("a", 65001, "10.0.0.3", "192.0.2.3"),
        ("b", 65002, "10.0.0.2", "192.0.2.2"),
        ("c", 65003, "10.0.0.1", "192.0.2.1"),
    )
    loc.update(r["a"], [P], attrs((65001, 1, 2)))
    assert best_name(loc) == "a"
    loc.update(r["b"], [P], attrs((65002, 2)))
    assert best_name(loc) == "b"
    loc.update(r["c"], [P], attrs((65003, 2), origin=2))  # same length, worse ORIGIN
    assert best_name(loc) == "b"
    loc.update(r["c"], [P], attrs((65003, 2)))  # now a tie down to the BGP Identifier
    assert best_name(loc) == "c"
    ch = loc.withdraw(r["c"], [P])
    assert best_name(loc) == "b" and ch[0].source is not None and ch[0].source.name == "b"
    loc.withdraw(r["b"], [P])
    loc.withdraw(r["a"], [P])
    assert best_name(loc) is None and len(loc) == 0


def test_med_compared_only_within_the_same_neighbour_as() -> None:
    # b and c share neighbour AS 65002: c's lower MED beats b. a (AS 65001) has a higher MED but a
    # different neighbour AS, so MED does not remove it; the BGP Identifier decides between a and c.
    loc, r = setup(
        ("a", 65001, "10.0.0.1", "192.0.2.1"),
        ("b", 65002, "10.0.0.2", "192.0.2.2"),
        ("c", 65002, "10.0.0.3", "192.0.2.3"),
    )
    loc.update(r["b"], [P], attrs((65002, 9), med=50))
    loc.update(r["c"], [P], attrs((65002, 9), med=10))
    assert best_name(loc) == "c"
    loc.update(r["a"], [P], attrs((65001, 9), med=500))
    assert best_name(loc) == "a"
    loc.withdraw(r["c"], [P])  # now b (MED 50) is its group's best; a still wins on identifier
    assert best_name(loc) == "a"


def test_med_non_transitivity_is_handled_by_full_elimination() -> None:
    """The classic triangle: pairwise comparison would depend on arrival order; elimination does not."""
    order_results = set()
    for order in (["a", "b", "c"], ["c", "b", "a"], ["b", "a", "c"], ["a", "c", "b"]):
        loc, r = setup(
            ("a", 65001, "10.0.0.3", "192.0.2.3"),
            ("b", 65002, "10.0.0.1", "192.0.2.1"),
            ("c", 65002, "10.0.0.2", "192.0.2.2"),
        )
        paths = {"a": attrs((65001, 7)), "b": attrs((65002, 7), med=20), "c": attrs((65002, 7), med=10)}
        for n in order:
            loc.update(r[n], [P], paths[n])
        order_results.add(best_name(loc))
    assert order_results == {"c"}  # b is eliminated by c's MED, then c beats a on identifier


def test_local_pref_only_counts_from_ibgp_and_ebgp_beats_ibgp() -> None:
    loc = LocRib(FAM)
    ibgp_rib = AdjRibIn(source("i", 64500, "10.0.0.9", "192.0.2.9"), FAM)
    ebgp_rib = AdjRibIn(source("e", 65001, "10.0.0.1", "192.0.2.1"), FAM)
    loc.add_source(ibgp_rib)
    loc.add_source(ebgp_rib)
    loc.update(ebgp_rib, [P], attrs((65001,)))
    loc.update(ibgp_rib, [P], attrs((65001,), lp=200, ibgp=True))
    assert best_name(loc) == "i"  # higher degree of preference
    loc.update(ibgp_rib, [P], attrs((65001,), lp=100, ibgp=True))
    assert best_name(loc) == "e"  # equal preference: eBGP over iBGP (9.1.2.2 d)


def test_add_path_keeps_every_path_and_chooses_one() -> None:
    loc = LocRib(FAM)
    rib = AdjRibIn(source("ap", 65001, "10.0.0.1", "192.0.2.1"), FAM, add_path=True)
    loc.add_source(rib)
    k1, k2 = (1).to_bytes(4, "big") + P, (2).to_bytes(4, "big") + P
    loc.update(rib, [k1], attrs((65001, 5, 6)))
    loc.update(rib, [k2], attrs((65001, 5)))
    bp = loc.best_path(P)
    assert bp is not None and bp[0].as_path_len == 2
    loc.withdraw(rib, [k2])
    bp = loc.best_path(P)
    assert bp is not None and bp[0].as_path_len == 3
    loc.withdraw(rib, [k1])
    assert loc.best_path(P) is None


def test_no_change_no_event() -> None:
    loc, r = setup(("a", 65001, "10.0.0.1", "192.0.2.1"))
    a = attrs((65001,))
    assert len(loc.update(r["a"], [P], a)) == 1
    assert loc.update(r["a"], [P], a) == []  # the same path again is not a FIB change
    assert loc.withdraw(r["a"], [encode_prefix("198.18.0.0/15")]) == []


# ------------------------------------------------------------------------------------------------
# A real RIB dump: APSV's best path against one computed here from mrtparse's decoding.


def _independent_best(entries: list[dict[str, Any]], peers: list[dict[str, Any]], local_as: int) -> str:
    """RFC 4271 §9.1.2.2 written out on mrtparse's dicts (all peers here are eBGP to the collector)."""
    cands = []
    for e in entries:
        peer = peers[e["peer_index"]]
        path_len, origin, med, neighbor = 0, 2, 0, None
        for a in e["path_attributes"]:
            code = int(next(iter(a["type"])))
            if code == 1:
                origin = int(next(iter(a["value"])))
            elif code == 2:
                for seg in a["value"]:
                    st = int(next(iter(seg["type"])))
                    if st == 2:
                        path_len += len(seg["value"])
                        if neighbor is None:
                            neighbor = int(seg["value"][0])
                    elif st == 1:
                        path_len += 1
            elif code == 4:
                med = int(a["value"])
        ibgp = int(peer["peer_as"]) == local_as
        cands.append(
            {
                "ip": peer["peer_ip"],
                "pref": 100,
                "len": path_len,
                "origin": origin,
                "med": med,
                "nbr": neighbor if neighbor is not None else local_as,
                "ibgp": ibgp,
                "rid": int(ipaddress.ip_address(peer["peer_bgp_id"])),
                "ipkey": int(ipaddress.ip_address(peer["peer_ip"])),
            }
        )
    top = min((-c["pref"], c["len"], c["origin"]) for c in cands)
    cands = [c for c in cands if (-c["pref"], c["len"], c["origin"]) == top]
    best_med: dict[int, int] = {}
    for c in cands:
        best_med[c["nbr"]] = min(best_med.get(c["nbr"], c["med"]), c["med"])
    cands = [c for c in cands if c["med"] == best_med[c["nbr"]]]
    if any(not c["ibgp"] for c in cands):
        cands = [c for c in cands if not c["ibgp"]]
    winner = min(cands, key=lambda c: (c["rid"], c["ipkey"]))
    return str(winner["ip"])


def test_rib_dump_best_paths_match_an_independent_computation() -> None:
    path = shared_data_dir() / "mrt/pyasn-data/rib.20140523.0600_firstMB.complete-records.mrt.gz"
    local_as = 6447  # Route Views, which wrote this dump
    view = load_rib_dump(path, local_as=local_as)
    loc = view.loc_rib[FAM]
    assert view.errors == 0 and view.paths == 270005 and len(loc) == 9072
    rng = random.Random(4271)
    wanted = set(rng.sample(range(1, 9073), 400))
    peers: list[dict[str, Any]] = []
    checked = 0
    for i, rec in enumerate(Reader(str(path))):  # mrtparse reuses one object per record
        d = rec.data
        if i == 0:
            peers = list(d["peer_entries"])
            continue
        if i not in wanted:
            continue
        prefix = encode_prefix(f"{d['prefix']}/{d['length']}")
        bp = loc.best_path(prefix)
        assert bp is not None, prefix_str(prefix, 1)
        assert bp[1].source.peer_ip == _independent_best(d["rib_entries"], peers, local_as), d["prefix"]
        checked += 1
    assert checked == 400


def test_ipv6_and_add_path_rib_dumps_load() -> None:
    data = shared_data_dir() / "mrt"
    v6 = load_rib_dump(data / "pyasn-data/rib6.20151101.0600_firstMB.complete-records.mrt.gz")
    assert v6.paths == 149578 and len(v6.loc_rib[C.IPV6_UNICAST]) == 6870 and v6.errors == 0
    first = next(iter(v6.loc_rib[C.IPV6_UNICAST].items()))
    assert ":" in (first[1].next_hop or "")
    ap = load_rib_dump(data / "bgpdump-testdata/bview.ipv4_unicast_add_path.gz")
    assert ap.paths == 62 and len(ap.loc_rib[FAM]) == 31


def test_update_replay_matches_a_set_model() -> None:
    """Replaying a dump leaves exactly the prefixes some peer still announces."""
    from apsv.mrt.reader import MrtReader
    from apsv.mrt.records import BgpMessageRecord
    from apsv.mrt.sessions import RecordedSessions

    path = shared_data_dir() / "mrt/bgpdump-testdata/updates.20071015.1505.gz"
    view = replay_updates(path)
    rs = RecordedSessions()
    held: dict[tuple[str, int], set[bytes]] = {}
    with MrtReader(path) as r:
        for item in r:
            if isinstance(item, BgpMessageRecord) and item.msg_type == 2:
                m = rs.decode(item)
                s = held.setdefault((item.peer_ip, item.peer_as), set())
                s.difference_update(getattr(m, "withdrawn", []))
                s.update(getattr(m, "nlri", []))
    expect = set().union(*held.values())
    assert set(view.loc_rib[FAM].best) == expect

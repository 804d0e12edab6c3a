"""The TABLE_DUMP_V2 writer against real dumps: what it writes reads back - with APSV's reader,
with mrtparse, and with bgpdump - as the same prefixes, paths and attributes."""

from __future__ import annotations

import gzip
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import mrtparse
import pytest

from apsv.bgp import constants as C
from apsv.bgp.attributes import decode_attributes
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.context import CodecContext
from apsv.bgp.nlri import prefix_str
from apsv.bgp.path_attributes import PathAttributes, interner_for, with_mp_next_hop
from apsv.bgp.rib import LocRib
from apsv.bgp.session import BgpSession
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import PeerIndexTable, RibRecord
from apsv.mrt.replay import CollectorView, load_rib_dump
from apsv.mrt.writer import (
    DumpEntry,
    DumpPeer,
    TableDumpV2Writer,
    peer_index_table,
    rib_entry_attributes,
    write_loc_ribs,
)
from apsv.runtime.recorded_sessions import Stream, load_streams
from tests.conftest import manifest, manifest_counts

RIB4 = "mrt/pyasn-data/rib.20140523.0600_firstMB.complete-records.mrt.gz"  # RouteViews, TDv2 IPv4
RIB6 = "mrt/pyasn-data/rib6.20151101.0600_firstMB.complete-records.mrt.gz"  # TDv2 IPv6, full MP_REACH
QUAGGA = "mrt/mrtparse-samples/quagga_rib"  # IPv4 + IPv6, 4-octet ASes, LOCAL_PREF from eBGP
BVIEW_2002 = "mrt/bgpdump-testdata/bview.20020722.2337.gz"  # TABLE_DUMP (v1): 2-octet ASes
ADDPATH = ["mrt/bgpdump-testdata/bview.ipv4_unicast_add_path.gz", "mrt/bgpdump-testdata/bview.ipv6_unicast_add_path.gz"]
UPDATES_MIXED = "mrt/bgpdump-testdata/updates.20100722.2015.gz"  # AS4 and 2-octet sessions
TS = 1_700_000_000

# Attributes a RIB does not keep from an external peer (RFC 7606 §7.5, §7.9, §7.10: discarded).
IBGP_ONLY = {C.ATTR_LOCAL_PREF, C.ATTR_ORIGINATOR_ID, C.ATTR_CLUSTER_LIST}


def _paths(view: CollectorView) -> dict[tuple[Any, ...], PathAttributes]:
    """Every path of a collector view: (family, prefix, peer ip, peer AS, path id) -> attributes."""
    out = {}
    for (ip, asn, fam, _ap), rib in view.adj_in.items():
        for key, pa in rib.routes.items():
            pid, prefix = (None, key) if rib.by_prefix is None else (int.from_bytes(key[:4], "big"), key[4:])
            out[(fam, prefix, ip, asn, pid)] = pa
    return out


def _mrtparse_entries(path: Path) -> dict[tuple[Any, ...], list[tuple[int, int, Any]]]:
    """mrtparse's reading of a RIB dump: (afi, prefix/len, peer ip, peer AS, path id) ->
    [(flags, type, value), ...] with MP_REACH_NLRI reduced to its (first, global) next hop."""
    out: dict[tuple[Any, ...], list[tuple[int, int, Any]]] = {}
    peers: list[dict[str, Any]] = []
    for m in mrtparse.Reader(str(path)):
        d = m.data
        assert not d.get("err"), d
        if "peer_entries" in d:
            peers = d["peer_entries"]
            continue
        if "rib_entries" in d:
            afi = 2 if ":" in d["prefix"] else 1
            for e in d["rib_entries"]:
                p = peers[e["peer_index"]]
                k = (afi, f"{d['prefix']}/{d['length']}", p["peer_ip"], int(p["peer_as"]), e.get("path_id"))
                assert k not in out
                out[k] = _norm(e["path_attributes"])
        elif "path_attributes" in d:  # TABLE_DUMP (v1): one path per record
            afi = 2 if ":" in d["prefix"] else 1
            k = (afi, f"{d['prefix']}/{d['length']}", d["peer_ip"], int(d["peer_as"]), None)
            out[k] = _norm(d["path_attributes"])
    return out


def _norm(attrs: list[dict[str, Any]]) -> list[tuple[int, int, Any]]:
    out = []
    for a in attrs:
        (t,) = a["type"]
        v = a["value"]
        if t == C.ATTR_MP_REACH_NLRI:
            v = v["next_hop"][0]
        out.append((a["flag"] & ~C.FLAG_EXTENDED_LENGTH, t, v))
    return out


def _drop_ibgp_only(attrs: list[tuple[int, int, Any]], peer_as: int, local_as: int) -> list[tuple[int, int, Any]]:
    if peer_as == local_as:
        return attrs
    return [a for a in attrs if a[1] not in IBGP_ONLY]


def _round_trip(data_dir: Path, tmp_path: Path, name: str, local_as: int = 65535) -> tuple[CollectorView, Path]:
    view = load_rib_dump(data_dir / name, local_as=local_as)
    assert view.errors == 0 and view.skipped == 0
    out = tmp_path / (Path(name).name + ".tdv2.gz")
    stats = write_loc_ribs(out, view.loc_rib.values(), all_paths=True, collector_id="192.0.2.1", timestamp=TS)
    assert stats.entries == view.paths and stats.prefixes == view.prefixes()
    return view, out


@pytest.mark.parametrize(
    "name",
    [QUAGGA, *ADDPATH, pytest.param(RIB6, marks=pytest.mark.slow), pytest.param(BVIEW_2002, marks=pytest.mark.slow)],
)
def test_collector_rib_reads_back_the_same(data_dir: Path, tmp_path: Path, name: str) -> None:
    """A collector's RIB (every path of every peer) written and read back with APSV's reader and
    with mrtparse: the same prefixes, the same paths per peer, the same attributes."""
    view, out = _round_trip(data_dir, tmp_path, name)
    counts = manifest_counts(manifest()[name])
    # APSV's reader: every path, attribute set for attribute set (next hop and true AS path included).
    back = load_rib_dump(out, local_as=view.local_as)
    assert back.errors == 0 and back.skipped == 0
    a, b = _paths(view), _paths(back)
    assert len(a) == counts.get("rib_entries", counts.get("recs"))
    assert a.keys() == b.keys()
    for k, pa in a.items():
        pb = b[k]
        assert (pb.as_path, pb.next_hop, pb.origin, pb.med, pb.local_pref) == (
            pa.as_path,
            pa.next_hop,
            pa.origin,
            pa.med,
            pa.local_pref,
        ), k
        if pa.asn4:  # a 4-octet set is written with its exact bytes
            assert pb.wire == pa.wire, k
    for fam, loc in view.loc_rib.items():
        assert back.loc_rib[fam].table() == loc.table()  # the same best paths
    # mrtparse: the original and the dump, entry by entry.
    orig, dump = _mrtparse_entries(data_dir / name), _mrtparse_entries(out)
    assert orig.keys() == dump.keys()
    for k, attrs in orig.items():
        want = _drop_ibgp_only(attrs, k[3], view.local_as)
        if name == BVIEW_2002:  # 2-octet ASes widened: the same numbers, AS4 form
            assert all(t not in (C.ATTR_AS4_PATH, C.ATTR_AS4_AGGREGATOR) for _f, t, _v in want)
        assert dump[k] == want, k


def test_exact_bytes_of_a_routeviews_dump(data_dir: Path, tmp_path: Path) -> None:
    """Where the reader keeps every attribute (4-octet ASes, NEXT_HOP, no iBGP-only attributes),
    each RIB entry is written with exactly the bytes it was read from."""
    _view, out = _round_trip(data_dir, tmp_path, RIB4, local_as=6447)

    def entries(path: Path) -> dict[tuple[Any, ...], bytes]:
        got = {}
        with MrtReader(path) as r:
            for item in r:
                if isinstance(item, RibRecord):
                    for e in item.entries:
                        assert e.peer is not None
                        got[(item.afi, item.safi, item.prefix, e.peer.ip, e.peer.asn, e.peer.bgp_id)] = e.attributes
        return got

    orig, dump = entries(data_dir / RIB4), entries(out)
    assert len(orig) == manifest_counts(manifest()[RIB4])["rib_entries"]
    assert orig == dump


def test_session_loc_rib_from_replayed_updates(data_dir: Path, tmp_path: Path) -> None:
    """One BGP session per recorded peer, fed its real UPDATEs (2-octet and 4-octet peers): each
    session's Loc-RIB dumped and read back - its rows, AS4-form true paths, every attribute."""
    streams = load_streams([data_dir / UPDATES_MIXED], min_messages=5)
    assert {s.asn4 for s in streams} == {True, False}
    widened = 0
    for i, s in enumerate(streams):
        session = _replayed(s)
        out = tmp_path / f"s{i}.mrt"
        stats = write_loc_ribs(out, session.loc_rib.values(), view_name="1/1", timestamp=TS)
        rows = {fam: session.loc_rib_table(fam) for fam in session.loc_rib}
        assert stats.prefixes == sum(len(r) for r in rows.values())
        got: dict[tuple[int, int], list[tuple[str, str | None, str]]] = {}
        table: PeerIndexTable | None = None
        ctx = CodecContext(asn4=True, rib_dump=True)
        with MrtReader(out) as r:
            for item in r:
                if isinstance(item, PeerIndexTable):
                    table = item
                    continue
                assert isinstance(item, RibRecord) and len(item.entries) == 1
                e = item.entries[0]
                parsed = decode_attributes(e.attributes, 0, len(e.attributes), ctx, interner_for(ctx))
                pa = parsed.attributes
                if parsed.mp_reach is not None:
                    pa = with_mp_next_hop(pa, parsed.mp_reach.next_hop, ctx)
                fam = (item.afi, item.safi)
                best = session.loc_rib[fam].best_path(item.prefix)
                assert best is not None
                want = best[0]
                assert (pa.as_path, pa.next_hop, pa.origin, pa.med) == (
                    want.as_path,
                    want.next_hop,
                    want.origin,
                    want.med,
                )
                assert _other_attrs(pa) == _other_attrs(want)
                widened += not want.asn4 and want.get(C.ATTR_AS4_PATH) is not None
                got.setdefault(fam, []).append((prefix_str(item.prefix, item.afi), pa.next_hop, session.source.name))
        assert table is not None and table.view_name == "1/1"
        assert [(p.ip, p.asn) for p in table.peers] == [(s.peer_ip, s.peer_as)]
        assert {f: sorted(v) for f, v in got.items()} == {f: v for f, v in rows.items() if v}
        # mrtparse agrees on the prefixes and the AS paths.
        seen = {}
        for m in mrtparse.Reader(str(out)):
            d = m.data
            assert not d.get("err"), d
            for e in d.get("rib_entries", []):
                path = next(a["value"] for a in e["path_attributes"] if 2 in a["type"])
                seen[f"{d['prefix']}/{d['length']}"] = [int(x) for seg in path for x in seg["value"]]
        for fam, loc in session.loc_rib.items():
            for prefix in loc.best:
                bp = loc.best_path(prefix)
                assert bp is not None
                p = ipaddress.ip_network(prefix_str(prefix, fam[0]))
                assert seen[f"{p.network_address}/{p.prefixlen}"] == [a for _st, seg in bp[0].as_path for a in seg]
    assert widened > 0  # some 2-octet path really had an AS4_PATH to fold in


def _replayed(s: Stream) -> BgpSession:
    cfg = BgpSessionConfig.model_validate(
        {
            "local_as": 65535,
            "router_id": "192.0.2.254",
            "peer_as": s.peer_as,
            "peer_address": s.peer_ip,
            "families": ["ipv4-unicast", "ipv6-unicast"],
            "hold_time": 0,
            "enforce_first_as": False,
        }
    )
    session = BgpSession.established(cfg, asn4=s.asn4)
    for msg, ts in zip(s.messages, s.times, strict=True):
        session.data_received(msg, ts)
    return session


def _other_attrs(pa: PathAttributes) -> list[tuple[int, int, Any]]:
    """Every attribute but those the 4-octet form rewrites or drops, and the next hop."""
    skip = {C.ATTR_AS_PATH, C.ATTR_AGGREGATOR, C.ATTR_AS4_PATH, C.ATTR_AS4_AGGREGATOR, C.ATTR_MP_REACH_NLRI, 256}
    return [(a.flags, a.type_code, a.value) for a in pa.attrs if a.type_code not in skip]


def test_as4_conversion_of_a_two_octet_set() -> None:
    """RFC 6793 §4.2.3 on the way out: AS_TRANS replaced from AS4_PATH, AGGREGATOR from
    AS4_AGGREGATOR, the AS4_* attributes gone; a stale AS4_AGGREGATOR is ignored."""
    ctx2 = CodecContext(asn4=False)

    def tlv(flags: int, code: int, value: bytes) -> bytes:
        return bytes((flags, code, len(value))) + value

    as_path2 = bytes((2, 3)) + (65001).to_bytes(2, "big") + C.AS_TRANS.to_bytes(2, "big") + (65003).to_bytes(2, "big")
    as4_path = bytes((2, 2)) + (4_200_000_001).to_bytes(4, "big") + (65003).to_bytes(4, "big")
    wire = (
        tlv(0x40, C.ATTR_ORIGIN, b"\x00")
        + tlv(0x40, C.ATTR_AS_PATH, as_path2)
        + tlv(0x40, C.ATTR_NEXT_HOP, bytes((192, 0, 2, 1)))
        + tlv(0xC0, C.ATTR_AGGREGATOR, C.AS_TRANS.to_bytes(2, "big") + bytes((192, 0, 2, 9)))
        + tlv(0xC0, C.ATTR_AS4_PATH, as4_path)
        + tlv(0xC0, C.ATTR_AS4_AGGREGATOR, (4_200_000_001).to_bytes(4, "big") + bytes((192, 0, 2, 9)))
    )
    pa = decode_attributes(wire, 0, len(wire), ctx2, interner_for(ctx2)).attributes
    out = rib_entry_attributes(pa)
    ctx4 = CodecContext(asn4=True)
    back = decode_attributes(out, 0, len(out), ctx4, interner_for(ctx4)).attributes
    # The merged path keeps its segments: AS_PATH's leading ASes, then AS4_PATH.
    assert back.as_path == ((2, (65001,)), (2, (4_200_000_001, 65003)))
    assert back.as_path_len == 3
    assert back.get(C.ATTR_AGGREGATOR) == (4_200_000_001, "192.0.2.9")
    assert back.get(C.ATTR_AS4_PATH) is None and back.get(C.ATTR_AS4_AGGREGATOR) is None
    assert back.next_hop == "192.0.2.1" and back.origin == 0
    # An AGGREGATOR that is not AS_TRANS makes AS4_AGGREGATOR (and AS4_PATH) stale.
    stale = (
        tlv(0x40, C.ATTR_ORIGIN, b"\x00")
        + tlv(0x40, C.ATTR_AS_PATH, as_path2)
        + tlv(0xC0, C.ATTR_AGGREGATOR, (65009).to_bytes(2, "big") + bytes((192, 0, 2, 9)))
        + tlv(0xC0, C.ATTR_AS4_AGGREGATOR, (4_200_000_001).to_bytes(4, "big") + bytes((192, 0, 2, 9)))
    )
    pa = decode_attributes(stale, 0, len(stale), ctx2, interner_for(ctx2)).attributes
    out = rib_entry_attributes(pa)
    back = decode_attributes(out, 0, len(out), ctx4, interner_for(ctx4)).attributes
    assert back.get(C.ATTR_AGGREGATOR) == (65009, "192.0.2.9")
    assert back.as_path == ((2, (65001, C.AS_TRANS, 65003)),)


def test_peer_table_and_limits(tmp_path: Path) -> None:
    peers = [DumpPeer("192.0.2.1", 64500, "192.0.2.1"), DumpPeer("2001:db8::1", 4_200_000_000, "192.0.2.2")]
    body = peer_index_table(peers, "198.51.100.1", "tenant-1/vr-2")
    path = tmp_path / "p.mrt"
    with path.open("wb") as f:
        w = TableDumpV2Writer(f, peers, collector_id="198.51.100.1", view_name="tenant-1/vr-2", timestamp=TS)
        with pytest.raises(ValueError, match="peer index 2"):
            w.write_prefix(1, 1, b"\x18\xc0\x00\x02", [DumpEntry(2, _one_attr_set(), TS)])
    with MrtReader(path) as r:
        (table,) = list(r)
    assert isinstance(table, PeerIndexTable)
    assert (table.collector_id, table.view_name) == ("198.51.100.1", "tenant-1/vr-2")
    assert [(p.ip, p.asn, p.bgp_id) for p in table.peers] == [(p.ip, p.asn, p.bgp_id) for p in peers]
    assert body[4 + 2 + len("tenant-1/vr-2") + 2] == 0  # 2-octet AS, IPv4 address
    with pytest.raises(ValueError, match="65535"):
        peer_index_table([DumpPeer("192.0.2.1", 1)] * 0x10000)
    # A dump with nothing in it is still a valid file: just its peer table.
    out = tmp_path / "empty.mrt.gz"
    stats = write_loc_ribs(out, [LocRib(C.IPV4_UNICAST)], timestamp=TS)
    assert (stats.records, stats.prefixes) == (1, 0)
    assert gzip.decompress(out.read_bytes())[4:8] == bytes((0, 13, 0, 1))  # TABLE_DUMP_V2 / PEER_INDEX_TABLE
    assert not list(tmp_path.glob("*.tmp"))


def _one_attr_set() -> PathAttributes:
    ctx = CodecContext()
    wire = bytes((0x40, 1, 1, 0, 0x40, 2, 0, 0x40, 3, 4, 192, 0, 2, 1))
    return decode_attributes(wire, 0, len(wire), ctx, interner_for(ctx)).attributes


@pytest.mark.peer
def test_bgpdump_reads_the_dump_like_the_original(data_dir: Path, tmp_path: Path) -> None:
    """bgpdump (Debian's, from RIPE NCC's libbgpdump) prints the same routes for the dump as for
    the collector's own file - every field but the times."""
    exe = shutil.which("bgpdump")
    if exe is None:
        pytest.fail("bgpdump is not installed (apt-get install bgpdump); this test must not be skipped")
    for name in (RIB6, QUAGGA):
        _view, out = _round_trip(data_dir, tmp_path, name)

        def lines(path: Path) -> list[str]:
            text = subprocess.run([exe, "-m", str(path)], capture_output=True, text=True, check=True).stdout
            # TABLE_DUMP2|time|B|peer ip|peer AS|prefix|path|origin|next hop|local pref|MED|communities|...
            rows = [re.sub(r"^TABLE_DUMP2\|\d+\|", "", x) for x in text.splitlines() if x]
            return sorted(rows)

        want = lines(data_dir / name)
        if name == QUAGGA:  # LOCAL_PREF from an external peer is not kept (RFC 7606 §7.5): bgpdump prints 0
            want = sorted(re.sub(r"^((?:[^|]*\|){7})\d+\|", r"\g<1>0|", x) for x in want)
        assert lines(out) == want and len(want) == manifest_counts(manifest()[name])["rib_entries"]

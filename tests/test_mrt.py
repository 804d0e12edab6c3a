"""MRT decoding against real dumps and the independent counts in shared/data/MANIFEST.tsv."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import pytest

from apsv.mrt.framing import iter_raw_records
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import BgpMessageRecord, MrtError, RibRecord
from apsv.mrt.stats import mrt_stats
from tests.conftest import manifest, manifest_counts, shared_data_dir
from tests.refcount import count_file

# Files where mrtparse (the reference of MANIFEST.tsv) failed, and what APSV does instead.
# Each is checked below against the independent walker in tests/refcount.py or by structure.
MRTPARSE_FAILED = {
    # mrtparse errors on the KEEPALIVE-only BGP4MP records ("Insufficient buffer"); APSV reads them all.
    "mrt/bgpdump-testdata/updates.20020722.2238.gz",
    # Old Zebra wrote state changes and messages without interface/AFI/addresses; APSV reads that form.
    "mrt/bgpkit-ripe-fixtures/updates.20001104.0124.gz",
    # The NLRI field really is cut short: both fail. APSV reports RFC 7606 §5.3 session reset (3/10).
    "mrt/bgpdump-testdata/updates.nlri_mask_trailing_bits.gz",
    # OpenBGPD's deprecated BGP4MP_ENTRY subtype: APSV decodes it as RIB entries.
    "mrt/mrtparse-samples/openbgpd_rib_table-mp",
    # Deprecated MRT type 5 (BGP) records and the batched 1999 TABLE_DUMP: mrtparse raises KeyError.
    "mrt/bgpkit-ripe-fixtures/bview.20000111.0032.gz",
    "mrt/bgpkit-ripe-fixtures/updates.19990903.1041.gz",
    "mrt/bgpkit-ripe-fixtures/updates.19991214.1621.gz",
    "mrt/bgpkit-ripe-fixtures/updates.20000102.2014.gz",
    "mrt/bgpkit-ripe-fixtures/updates.20000325.0345.gz",
}
TRUNCATED_ORIGINALS = {  # cut mid-record upstream; the .complete-records.mrt.gz beside each is whole
    "mrt/pyasn-data/rib.20080501.0644_firstMB.bz2",
    "mrt/pyasn-data/rib.20140523.0600_firstMB.bz2",
    "mrt/pyasn-data/rib6.20151101.0600_firstMB.bz2",
}


def _mrt_rows() -> list[tuple[str, str]]:
    rows = [(p, m) for p, m in manifest().items() if p.startswith("mrt/")]
    assert len(rows) >= 40, "MANIFEST.tsv lists fewer MRT files than expected"
    # Where the reference failed, the dedicated tests below say what APSV does instead.
    return [(p, m) for p, m in rows if p not in MRTPARSE_FAILED and p not in TRUNCATED_ORIGINALS]


@pytest.mark.parametrize(("path", "measured"), _mrt_rows(), ids=lambda v: str(v).split("/")[-1][:40])
def test_counts_match_independent_parser(path: str, measured: str) -> None:
    data = shared_data_dir()
    s = mrt_stats(data / path)
    exp = manifest_counts(measured)
    assert s.errors == 0, s.error_samples
    assert s.records == exp["recs"]
    if "UPDATE" in exp:
        assert (s.updates, s.announced, s.withdrawn) == (exp["UPDATE"], exp["ann"], exp["wd"])
    if "rib_entries" in exp:
        assert (s.rib_prefixes, s.rib_entries) == (exp["rib_prefixes"], exp["rib_entries"])


def test_every_bgp4mp_record_decodes(data_dir: Path) -> None:
    """Every BGP4MP message record in shared/data/mrt decodes, except the one the RFC says cannot."""
    for f in sorted((data_dir / "mrt").rglob("*")):
        if not f.is_file() or f.name in ("SOURCE.txt", "LICENSE.upstream", "README.fixtures.md"):
            continue
        if str(f.relative_to(data_dir)) in TRUNCATED_ORIGINALS:
            continue
        s = mrt_stats(f, recover=True)
        if f.name == "updates.nlri_mask_trailing_bits.gz":
            assert s.errors == 1 and "Invalid Network Field (3/10)" in s.error_samples[0]
        elif f.name == "updates.20000325.0345.gz":
            # Two damaged MRT boundaries: the record whose length swallowed its neighbours, and
            # the garbage header after it; everything else is recovered.
            assert s.errors == 2 and s.resyncs == 2
        else:
            assert s.errors == 0, (f.name, s.error_samples)


@pytest.mark.parametrize(
    "name",
    [
        "bgpdump-testdata/updates.20020722.2238.gz",
        "bgpkit-ripe-fixtures/updates.20001104.0124.gz",
        "bgpkit-ripe-fixtures/updates.19990903.1041.gz",
        "bgpkit-ripe-fixtures/updates.19991214.1621.gz",
        "bgpkit-ripe-fixtures/updates.20000102.2014.gz",
    ],
)
def test_where_mrtparse_fails_apsv_matches_the_independent_walker(data_dir: Path, name: str) -> None:
    ref = count_file(data_dir / "mrt" / name)
    s = mrt_stats(data_dir / "mrt" / name)
    assert s.errors == 0
    assert (s.records, s.updates, s.announced, s.withdrawn) == (ref.records, ref.updates, ref.announced, ref.withdrawn)
    assert s.updates > manifest_counts(manifest().get(f"mrt/{name}", "")).get("UPDATE", 0)


def test_zebra_short_records(data_dir: Path) -> None:
    items = list(MrtReader(data_dir / "mrt/bgpkit-ripe-fixtures/updates.20001104.0124.gz"))
    assert not [i for i in items if isinstance(i, MrtError)]
    short = [i for i in items if isinstance(i, BgpMessageRecord) and i.peer_ip == ""]
    assert short, "the fixture's shortened records were not recognised"


def test_batched_table_dump_1999(data_dir: Path) -> None:
    """Early RIPE TABLE_DUMP: many entries per record, each record 4 octets longer than declared."""
    path = data_dir / "mrt/bgpkit-ripe-fixtures/bview.20000111.0032.gz"
    raw = gzip.decompress(path.read_bytes())
    # Independent walk: view+seq once per record, then entries of 18 octets plus attributes.
    off = recs = entries = 0
    while off < len(raw):
        length = struct.unpack_from("!I", raw, off + 8)[0]
        i, end = off + 16, off + 12 + length
        while i < end:
            i += 18 + struct.unpack_from("!H", raw, i + 16)[0]
            entries += 1
        assert i == end + 4
        off, recs = i, recs + 1
    s = mrt_stats(path)
    assert (s.records, s.rib_entries, s.errors) == (recs, entries, 0) == (2490, 452018, 0)


def test_bgp4mp_entry(data_dir: Path) -> None:
    items = list(MrtReader(data_dir / "mrt/mrtparse-samples/openbgpd_rib_table-mp"))
    ribs = [i for i in items if isinstance(i, RibRecord)]
    assert len(ribs) == 31 and all(len(r.entries) == 1 and r.entries[0].next_hop for r in ribs)


def test_damaged_framing_is_reported_then_recovered_on_request(data_dir: Path) -> None:
    path = data_dir / "mrt/bgpkit-ripe-fixtures/updates.20000325.0345.gz"
    strict = mrt_stats(path)
    assert strict.errors >= 1 and strict.records == 5  # stops at the damage, says where
    assert any("damaged MRT framing" in e for e in strict.error_samples)
    recovered = mrt_stats(path, recover=True)
    assert recovered.records > 2500 and recovered.updates > 2200


def test_truncated_compressed_file_reports_the_tail(data_dir: Path) -> None:
    s = mrt_stats(data_dir / "mrt/pyasn-data/rib.20140523.0600_firstMB.bz2")
    whole = mrt_stats(data_dir / "mrt/pyasn-data/rib.20140523.0600_firstMB.complete-records.mrt.gz")
    # the record cut in the middle, and the compressed stream that ends early
    assert s.errors == 2 and "remain" in s.error_samples[0] and "compressed stream ends early" in s.error_samples[1]
    # every whole record before the cut is read: what the complete-records file holds
    assert s.records == whole.records and s.rib_entries == whole.rib_entries > 0


def test_garbage_is_an_error_not_an_exception() -> None:
    for blob in (b"", b"\x00" * 5, b"hello world, not MRT at all" * 10, b"\xff" * 100):
        items = list(MrtReader(io.BytesIO(blob)))
        assert all(isinstance(i, MrtError) for i in items)


def test_record_offsets_are_exact(data_dir: Path) -> None:
    path = data_dir / "mrt/ryu-mrt/updates.20161101.0000.bz2"
    raw = __import__("bz2").decompress(path.read_bytes())
    for rec in iter_raw_records(io.BytesIO(raw), chunk=1000):
        assert not isinstance(rec, MrtError)
        assert struct.unpack_from("!HH", raw, rec.offset + 4) == (rec.type, rec.subtype)


def test_stats_json_keys(data_dir: Path) -> None:
    j = mrt_stats(data_dir / "mrt/ryu-mrt/updates.20161101.0000.bz2").to_json()
    json.dumps(j)
    assert {"records", "updates", "announced", "withdrawn", "errors"} <= set(j)

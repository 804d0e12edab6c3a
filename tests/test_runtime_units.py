"""The runtime's pure parts, without Ray: the session host, placement, the policy, the buffer pool."""

from __future__ import annotations

import random
import threading
import time

import pytest

from apsv.frame import Frame, FrameKind, ProtocolId, decode_batch, encode_batch
from apsv.runtime.buffer_pool import SHM_PREFIX, BufferPool, PoolExhausted
from apsv.runtime.host import HostLimits, SessionHost
from apsv.runtime.placement import InstanceLoad, choose_instance, least_used, rebalance_moves
from apsv.runtime.shm import SegmentCache
from apsv.scaling.policy import ScalingContext, get_policy, reactive

ECHO = int(ProtocolId.ECHO)
K = (1, 2, ECHO, 3)


def frame(seq: int, payload: bytes = b"hi", key: tuple[int, int, int, int] = K) -> Frame:
    return Frame(FrameKind.DATA, key[2], key[0], key[1], key[3], seq, 1, 2, payload)


def test_host_applies_each_frame_once_in_order() -> None:
    h = SessionHost("echo")
    h.open(K, {}, 0.0)
    out = h.process(encode_batch([frame(1, b"a"), frame(2, b"b")]), None, 1.0)
    assert [bytes(f.payload) for f in decode_batch(out)] == [b"a", b"b"]
    assert [f.seq for f in decode_batch(out)] == [1, 2]
    # A redelivery of 2 and a new 3: 2 is dropped and counted, 3 applied.
    out = h.process(encode_batch([frame(2, b"b"), frame(3, b"c")]), None, 2.0)
    assert [bytes(f.payload) for f in decode_batch(out)] == [b"c"]
    info = h.session_info(K)
    assert (info["last_seq"], info["frames"], info["duplicates"], info["gaps"]) == (3, 3, 1, 0)


def test_host_counts_gaps_and_unknown_sessions() -> None:
    h = SessionHost("echo")
    h.open(K, {}, 0.0)
    h.process(encode_batch([frame(1), frame(5), frame(1, key=(9, 9, ECHO, 9))]), None, 1.0)
    assert h.session_info(K)["gaps"] == 1 and h.counters.unknown_session == 1


def test_host_move_carries_sequence_state() -> None:
    a, b = SessionHost("echo"), SessionHost("echo")
    a.open(K, {}, 0.0)
    a.process(encode_batch([frame(i) for i in range(1, 11)]), None, 1.0)
    blob, st = a.detach(K)
    assert (st.last_seq, st.out_seq, st.applied) == (10, 10, 10) and K not in a.sessions
    b.restore(K, blob, st)
    out = b.process(encode_batch([frame(10), frame(11)]), None, 2.0)
    assert [f.seq for f in decode_batch(out)] == [11]  # output numbering continues too
    info = b.session_info(K)
    assert (info["frames"], info["duplicates"], info["messages"]) == (11, 1, 11)


def test_host_periodic_snapshots_and_limits() -> None:
    h = SessionHost("echo", HostLimits(max_sessions=2, snapshot_every=4))
    h.open(K, {}, 0.0)
    h.process(encode_batch([frame(i) for i in range(1, 10)]), None, 1.0)
    snaps = h.take_snapshots()
    assert snaps[K][0].last_seq == 8 and h.take_snapshots() == {}
    h.open((1, 2, ECHO, 4), {}, 0.0)
    with pytest.raises(OverflowError):
        h.open((1, 2, ECHO, 5), {}, 0.0)
    with pytest.raises(ValueError):
        h.open(K, {}, 0.0)
    with pytest.raises(ValueError, match="delay_ms"):
        SessionHost("echo").open((1, 2, ECHO, 6), {"delay_ms": -1}, 0.0)


def test_host_survives_a_failing_stack() -> None:
    h = SessionHost("bgp")
    h.open(K, {"local_as": 1, "router_id": "192.0.2.1", "peer_as": 2, "replay": {"asn4": True}}, 0.0)
    # Garbage to an Established replay session: a NOTIFICATION and a close, not an exception.
    out = h.process(encode_batch([frame(1, b"\x00" * 40)]), None, 1.0)
    kinds = [f.kind for f in decode_batch(out)]
    assert FrameKind.SEND in kinds and FrameKind.CLOSE in kinds and h.counters.errors == 0


def test_power_of_two_choices_balances() -> None:
    rng = random.Random(1)
    loads = {i: InstanceLoad(str(i), 0, 1000, 0, 1 << 20, 0.0) for i in range(8)}
    for _ in range(4000):
        iid = choose_instance(list(loads.values()), rng)
        assert iid is not None
        loads[int(iid)].sessions += 1
    counts = sorted(v.sessions for v in loads.values())
    assert counts[-1] - counts[0] <= 10  # within a few of perfectly even (500 each)


def test_placement_respects_capacity_and_draining() -> None:
    rng = random.Random(0)
    full = InstanceLoad("a", 10, 10, 0, 1, 0.0)
    draining = InstanceLoad("b", 0, 10, 0, 1, 0.0, accepting=False)
    assert choose_instance([full, draining], rng) is None
    ok = InstanceLoad("c", 9, 10, 0, 1, 0.0)
    assert choose_instance([full, draining, ok], rng) == "c"
    assert least_used([InstanceLoad("x", 5, 9, 0, 1, 0.0), InstanceLoad("y", 5, 9, 0, 1, 0.0)]) == "x"


def test_rebalance_moves_even_out_sessions() -> None:
    cands = [InstanceLoad(n, c, 100, 0, 1, 0.0) for n, c in (("a", 10), ("b", 0), ("c", 0), ("d", 0))]
    moves = rebalance_moves(cands, {"a": list(range(10)), "b": [], "c": [], "d": []})
    dst = [d for _, d in moves]
    assert len(moves) == 7 and sorted(dst.count(x) for x in "bcd") == [2, 2, 3]


def ctx(**kw: object) -> ScalingContext:
    base: dict[str, object] = {
        "protocol": "bgp",
        "now": 0.0,
        "current_instances": 2,
        "load": 0.0,
        "inflight": 0.0,
        "sessions": 10,
        "capacity_per_instance": 1000.0,
        "min_instances": 1,
        "max_instances": 8,
    }
    base.update(kw)
    return ScalingContext(**base)  # type: ignore[arg-type]


def test_reactive_waits_out_the_delays_then_scales() -> None:
    cfg = {"target_utilization": 0.5, "upscale_delay_s": 5, "downscale_delay_s": 20}
    d = reactive(ctx(load=3000.0, config=cfg))  # wants 6 (3000 / (1000 * 0.5))
    assert d.instances == 2 and d.state["direction"] == 1
    d = reactive(ctx(now=3.0, load=3000.0, config=cfg, state=d.state))
    assert d.instances == 2  # still inside the up delay
    d = reactive(ctx(now=6.0, load=3000.0, config=cfg, state=d.state))
    assert d.instances == 6
    # Down: only after the (longer) down delay, and never below the minimum.
    d1 = reactive(ctx(current_instances=6, now=10.0, load=0.0, config=cfg))
    d2 = reactive(ctx(current_instances=6, now=20.0, load=0.0, config=cfg, state=d1.state))
    d3 = reactive(ctx(current_instances=6, now=31.0, load=0.0, config=cfg, state=d2.state))
    assert (d1.instances, d2.instances, d3.instances) == (6, 6, 3)  # smoothing 0.5 halves the gap


def test_reactive_no_flapping_on_noise_and_bounds() -> None:
    cfg = {"target_utilization": 0.5, "upscale_delay_s": 5, "downscale_delay_s": 20}
    state: dict[str, object] = {}
    n = 4
    rng = random.Random(7)
    changes = 0
    for t in range(300):
        load = 2000 * (1 + rng.uniform(-0.15, 0.15))  # ~2 instances' worth, with noise
        d = reactive(ctx(current_instances=n, now=float(t), load=load, config=cfg, state=state))
        changes += d.instances != n
        n, state = d.instances, d.state
    assert changes <= 2
    assert (
        reactive(
            ctx(current_instances=2, load=1e9, config={"upscale_delay_s": 0}, state={"direction": 1, "since": -1.0})
        ).instances
        == 8
    )
    assert get_policy("fixed")(ctx(config={"instances": 99})).instances == 8
    with pytest.raises(ValueError, match="known"):
        get_policy("nope")


def test_buffer_pool_bounds_and_backpressure() -> None:
    pool = BufferPool(slots=2, slot_bytes=1024)
    a, b = pool.acquire(), pool.acquire()
    with pytest.raises(PoolExhausted):
        pool.acquire(timeout=0.05)
    assert pool.stats.exhausted == 1 and pool.stats.waits == 1
    threading.Timer(0.05, pool.release, args=(a,)).start()
    t0 = time.perf_counter()
    c = pool.acquire(timeout=5)
    assert time.perf_counter() - t0 >= 0.04 and c.index == a.index  # the same memory, reused
    assert b.append(FrameKind.DATA, ECHO, 1, 1, 1, 1, 0, b"x" * 900)
    assert not b.append(FrameKind.DATA, ECHO, 1, 1, 1, 2, 0, b"x" * 100)  # full: send and take another
    (f,) = decode_batch(bytes(b.filled()))
    assert f.seq == 1 and bytes(f.payload) == b"x" * 900
    assert pool.stats.max_in_use == 2


def test_shared_pool_is_read_in_place_and_guarded() -> None:
    """A shared pool's frames are visible, in place, to whoever maps the segment - and only
    segments of APSV pools are mapped; the host refuses frames of sessions it was not given."""
    pool = BufferPool(slots=2, slot_bytes=4096, shared=True)
    assert pool.shm_name is not None and pool.shm_name.startswith(SHM_PREFIX)
    cache = SegmentCache(max_segments=1)
    try:
        buf = pool.acquire()
        other = (2, 2, ECHO, 2)
        assert buf.append(FrameKind.DATA, ECHO, K[0], K[1], K[3], 1, 0, b"mine")
        assert buf.append(FrameKind.DATA, ECHO, other[0], other[1], other[3], 1, 0, b"theirs")
        start = buf.index * pool.slot_bytes
        view = cache.view(pool.shm_name, start, buf.used)
        assert [bytes(f.payload) for f in decode_batch(view)] == [b"mine", b"theirs"]
        buf.array[start + 56] = ord("M")  # the writer changes its buffer: the mapping sees it
        assert bytes(view[56:60]) == b"Mine"
        h = SessionHost("echo")
        h.open(K, {}, 0.0)
        h.open(other, {}, 0.0)
        out = h.process(view, buf.offsets, 1.0, allowed={K})
        assert [bytes(f.payload) for f in decode_batch(out)] == [b"Mine"]
        assert h.counters.foreign == 1 and h.session_info(other)["frames"] == 0
        del view
        with pytest.raises(ValueError, match="not an APSV buffer pool"):
            cache.view("psm_something_else", 0, 1)
        with pytest.raises(ValueError, match="outside segment"):
            cache.view(pool.shm_name, 0, 1 << 20)
    finally:
        cache.drop(pool.shm_name or "")
        pool.close()


def test_host_reports_the_tables_peers_will_resend() -> None:
    """A BGP session whose peer drops: the host's load carries the table it expects back (what the
    VPSM provisions for before the storm); an echo host has none."""
    from apsv.bgp.config import Announcement, BgpSessionConfig
    from apsv.bgp.session import BgpSession
    from apsv.stack import Send

    bgp = int(ProtocolId.BGP)
    key = (1, 2, bgp, 3)
    speaker = BgpSession.established(
        BgpSessionConfig(
            local_as=2, router_id="192.0.2.2", peer_as=1, peer_address="127.0.0.1", next_hop_self="198.51.100.2"
        )
    )
    updates = [
        e.data
        for i in range(3)
        for e in speaker.originate(Announcement(prefixes=[f"10.{i}.{j}.0/24" for j in range(100)]), 0.0)
        if isinstance(e, Send)
    ]
    h = SessionHost("bgp")
    h.open(key, {"local_as": 1, "router_id": "192.0.2.1", "peer_as": 2, "replay": {"asn4": True}}, 0.0)
    now = time.time_ns()  # the agents stamp frames with the wall clock; the host reads it too

    def fr(seq: int, kind: int, payload: bytes = b"") -> Frame:
        return Frame(kind, bgp, key[0], key[1], key[3], seq, now, now, payload)

    # the agent read all three UPDATEs at once: one frame
    h.process(encode_batch([fr(1, FrameKind.DATA, b"".join(updates))]), None, now / 1e9)
    assert h.session_info(key)["frames"] == 1 and h.load()["table_backlog"] == 0
    h.process(encode_batch([fr(2, FrameKind.DISCONNECTED, b"peer reset")]), None, now / 1e9)
    # 300 prefixes, 100 per UPDATE: 3 UPDATEs, in frames as this peer's arrive (2 frames / 3 UPDATEs)
    assert h.load()["table_backlog"] == 2
    echo = SessionHost("echo")
    echo.open(K, {}, 0.0)
    assert echo.load()["table_backlog"] == 0

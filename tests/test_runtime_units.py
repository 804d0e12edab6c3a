"""The runtime's pure parts, without Ray: the session host, placement, the policy, the buffer pool."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from apsv.frame import Frame, FrameKind, ProtocolId, decode_batch, encode_batch
from apsv.runtime.buffer_pool import SHM_PREFIX, BufferPool, PoolExhausted
from apsv.runtime.host import GAP, MOVED, PENDING, STALE, UNKNOWN, HostLimits, SeqState, SessionHost
from apsv.runtime.shm import SegmentCache
from apsv.scaling.clock import IDENTITY
from apsv.scaling.placement import InstanceLoad, choose_instance, least_used, rebalance_moves
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


def test_host_refuses_a_gap_and_unknown_sessions() -> None:
    """A frame after a gap is not applied (the client re-sends from the gap): frames are applied
    strictly in sequence, so never out of order."""
    h = SessionHost("echo")
    h.open(K, {}, 0.0)
    h.process(encode_batch([frame(1), frame(5), frame(6), frame(1, key=(9, 9, ECHO, 9))]), None, 1.0)
    assert h.session_info(K)["gaps"] == 0 and h.session_info(K)["last_seq"] == 1
    assert h.counters.out_of_order == 2 and h.counters.unknown_session == 1
    assert sorted(h.refusals) == [(K, GAP, 2, 0, ""), ((9, 9, ECHO, 9), UNKNOWN, 1, 0, "")]


def test_host_move_carries_sequence_state() -> None:
    a, b = SessionHost("echo"), SessionHost("echo")
    a.open(K, {}, 0.0)
    a.process(encode_batch([frame(i) for i in range(1, 11)]), None, 1.0)
    blob, st = a.detach(K, "b", 1)
    assert (st.last_seq, st.out_seq, st.applied) == (10, 10, 10) and K not in a.sessions
    a.process(encode_batch([frame(11)]), None, 2.0)  # sent to where it was: refused, naming where it went
    assert a.refusals == [(K, MOVED, 11, 1, "b")] and a.counters.departed == 1
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


def test_vpsm_gives_the_policy_its_decision_interval_on_the_contexts_clock() -> None:
    """The VPSM decides every `interval_s` wall seconds: the policy's config carries that
    interval in the context's time (trace seconds on a replay clock) where it sets none."""
    from collections import deque

    import numpy as np

    from apsv.runtime.vpsm.actor import VPSM
    from apsv.runtime.vpsm.plan import ProtocolPlan
    from apsv.scaling.clock import ReplayClock

    plan = ProtocolPlan("echo", policy="threshold", policy_config={"target_cpu": 0.6})
    vpsm = object.__new__(VPSM)  # no actor: only the state a context is built from
    state = {"interval_s": 2.0, "plans": {"echo": plan}, "clocks": {}, "managed": {}, "forecasts": {}}
    state |= {"history": {"echo": deque([100.0])}, "policy_state": {"echo": {}}, "_starting": {}}
    state |= {"start_latencies": {}, "_imbalances": {}, "_policy_configs": {}}
    vpsm.__dict__.update(state)

    def config(now: float = 10.0) -> Any:
        return vpsm._context("echo", plan, [], np.zeros(0), now, vpsm.clocks.get("echo", IDENTITY)).config

    live = config()
    assert live == {"target_cpu": 0.6, "interval_s": 2.0} and plan.policy_config == {"target_cpu": 0.6}
    assert config(11.0) is live  # built once: its settings are parsed once
    vpsm.clocks["echo"] = ReplayClock(origin=0.0, speed=10.0)
    assert config()["interval_s"] == 20.0  # 10 trace seconds per wall second
    plan.policy_config = {"interval_s": 5.0}
    assert config() is plan.policy_config  # the user's value stands


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
        h.open(K, {}, 0.0, owner="me")
        h.open(other, {}, 0.0, owner="them")
        out = h.process(view, buf.offsets, 1.0, owner="me")
        assert [bytes(f.payload) for f in decode_batch(out)] == [b"Mine"]
        # another owner's session: dropped and counted, and nothing said to the sender about it
        assert h.counters.foreign == 1 and h.session_info(other)["frames"] == 0 and h.refusals == []
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
    from apsv.stacks.interface import Send

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


def test_host_fences_by_owner_and_epoch() -> None:
    """Applied only at the session's epoch and from its owner; a frame of an older epoch is
    refused (STALE, naming the current one), another owner's is dropped unseen."""
    h = SessionHost("echo")
    h.open(K, {}, 0.0, owner="c1", epoch=3)
    ok = Frame(FrameKind.DATA, ECHO, K[0], K[1], K[3], 1, 1, 2, b"a", epoch=3)
    old = Frame(FrameKind.DATA, ECHO, K[0], K[1], K[3], 2, 1, 2, b"b", epoch=2)
    assert len(decode_batch(h.process(encode_batch([ok, old]), None, 1.0, owner="c1"))) == 1
    assert h.refusals == [(K, STALE, 2, 3, "")] and h.counters.stale == 1
    h.process(
        encode_batch([Frame(FrameKind.DATA, ECHO, K[0], K[1], K[3], 2, 1, 2, b"x", epoch=3)]), None, 1.0, owner="c2"
    )
    assert h.refusals == [] and h.counters.foreign == 1 and h.session_info(K)["last_seq"] == 1


def test_host_holds_a_place_until_its_client_restores_it() -> None:
    """A session placed on a new instance after its own died: frames wait (PENDING) until the
    client restores it from custody - afresh from its configuration, or from its snapshot."""
    src = SessionHost("echo")
    src.open(K, {}, 0.0, owner="c", epoch=1)
    src.process(
        encode_batch([Frame(FrameKind.DATA, ECHO, K[0], K[1], K[3], i, 1, 2, b"m", epoch=1) for i in (1, 2)]),
        None,
        1.0,
        owner="c",
    )
    blob, st = src.snapshot(K)
    h = SessionHost("echo")
    h.expect(K, "c", 2)
    f3 = Frame(FrameKind.DATA, ECHO, K[0], K[1], K[3], 3, 1, 2, b"n", epoch=2)
    h.process(encode_batch([f3]), None, 1.0, owner="c")
    assert h.refusals == [(K, PENDING, 3, 2, "")] and h.counters.pending == 1
    with pytest.raises(LookupError):
        h.restore_pending(K, "intruder", 2, (blob, st), {}, 0, 1.0)
    h.restore_pending(K, "c", 2, (blob, st), {}, 0, 1.0)
    out = h.process(encode_batch([f3]), None, 1.0, owner="c")
    assert [f.seq for f in decode_batch(out)] == [3] and h.session_info(K)["messages"] == 3
    fresh = SessionHost("echo")
    fresh.expect(K, "c", 5)
    fresh.restore_pending(K, "c", 5, None, {"max_message": 10}, 0, 1.0)
    assert fresh.sessions[K].session.max_message == 10 and fresh.session_info(K)["last_seq"] == 0  # type: ignore[attr-defined]
    assert fresh.sessions_report() == [(K, "c", 5, False)]


def test_host_checks_every_offset_of_a_batch_its_sender_can_still_write() -> None:
    h = SessionHost("echo")
    h.open(K, {}, 0.0)
    data = encode_batch([frame(1), frame(2)])
    h.process(data, [0, 3, 10_000, -4, len(data) - 10], 1.0)
    assert h.counters.bad_frames == 4 and h.session_info(K)["last_seq"] == 1


def test_custody_keeps_what_no_snapshot_covers() -> None:
    """Batches are copied into custody; a session's snapshot frees what it covers, and the frames
    after it come back in order, each once, for a resend or a restore."""
    from apsv.runtime.custody import Custody

    c = Custody(max_bytes=1 << 20, session_bytes=300)
    other = (1, 2, ECHO, 4)
    c.add(K)
    c.add(other)
    b1 = encode_batch([frame(1), frame(1, key=other), frame(2)])
    b2 = encode_batch([frame(3), frame(2, key=other)])
    c.retain(b1, [(K, 1, 2, 116), (other, 1, 1, 58)])
    c.retain(b2, [(K, 3, 3, 58), (other, 2, 2, 58)])
    assert c.stats.chunks == 2 and c.stats.bytes == len(b1) + len(b2)
    assert [int.from_bytes(f[24:32], "big") for f in c.frames_from(K, 2)] == [2, 3]
    assert c.restore_point(K) == (None, 1)
    c.snapshot(K, SeqState(2, 2, 2, 0), b"state")
    assert c.restore_point(K) == ((b"state", SeqState(2, 2, 2, 0)), 3)
    assert [int.from_bytes(f[24:32], "big") for f in c.frames_from(K, 1)] == [3]  # 1-2 covered
    assert c.stats.chunks == 2  # b1 still holds `other`'s frame 1
    c.snapshot(other, SeqState(2, 2, 2, 0), b"s2")
    c.snapshot(K, SeqState(1, 1, 1, 0), b"older")  # an older snapshot never replaces a newer one
    assert c.restore_point(K)[0] == (b"state", SeqState(2, 2, 2, 0))
    assert c.stats.chunks == 1 and c.stats.bytes == len(b2)
    c.retain(encode_batch([frame(4, b"x" * 400)]), [(K, 4, 4, 458)])
    assert c.wants_snapshot(0.0) == [K] and c.wants_snapshot(0.5) == []  # asked at most once a second
    c.remove(K)
    c.remove(other)
    assert c.stats.bytes == 0 and c.stats.chunks == 0


def test_channel_messages_round_trip() -> None:
    from apsv.errors import DecodeError
    from apsv.runtime import channel

    reply = channel.Reply(
        7,
        b"out",
        [channel.Refusal(K, MOVED, 5, 2, "bgp-3")],
        [channel.Snapshot(K, SeqState(4, 3, 4, 0), b"blob")],
    )
    r = channel.Reader(64)
    stream = (
        channel.hello("c1", b"k" * 32, "apsv-pool-x")
        + channel.batch(9, 4096, 100, channel.offsets_bytes([4096, 4200], 4096), [K])
        + channel.reply(reply)
        + channel.restore(3, K, 2, 1, None, {"a": 1})
        + channel.restored(3, K, "")
    )
    for i in range(0, len(stream), 5):  # in pieces, as a socket may deliver it
        r.feed(stream[i : i + 5])
    msgs = [channel.decode(m) for m in r.messages()]
    assert msgs[0] == channel.Hello(channel.VERSION, "c1", b"k" * 32, "apsv-pool-x")
    assert msgs[1] == channel.Batch(9, 4096, 100, channel.offsets_bytes([4096, 4200], 4096), [K])
    assert isinstance(msgs[1], channel.Batch) and channel.offsets_list(msgs[1].offsets) == [0, 104]
    assert msgs[2] == reply
    assert msgs[3] == channel.Restore(3, K, 2, 1, None, {"a": 1})
    assert msgs[4] == channel.Restored(3, K, "")
    with pytest.raises(DecodeError):
        channel.decode(b"\x02\x00")
    with pytest.raises(DecodeError):
        channel.decode(bytes([99]))
    with pytest.raises(DecodeError):
        r.feed(b"\xff\xff\xff\xff")
        r.messages()


def test_a_reply_too_large_for_one_message_goes_in_parts() -> None:
    from apsv.runtime import channel

    frames = [
        Frame(FrameKind.SEND, int(ProtocolId.ECHO), 1, 2, 3, seq, 0, 0, bytes([seq % 251]) * (100 + seq * 7))
        for seq in range(1, 201)
    ]
    out = encode_batch(frames)
    snaps = [channel.Snapshot(K, SeqState(9, 200, 9, 0), b"s" * 3000), channel.Snapshot(K, SeqState(1, 1, 1, 0), b"t")]
    reply = channel.Reply(7, out, [channel.Refusal(K, STALE, 3, 4)], snaps)
    assert channel.reply_messages(reply) == ([channel.reply(reply)], 0)  # (small: one REPLY)
    msgs, dropped = channel.reply_messages(reply, limit=10_000)
    assert dropped == 0 and len(msgs) > 5 and all(len(m) <= 10_000 + 4096 for m in msgs)
    got = [channel.decode(m[4:]) for m in msgs]
    assert all(isinstance(g, channel.Reply) for g in got)
    parts = [g for g in got if isinstance(g, channel.Reply)]
    # the parts ahead carry no batch id; the last completes the batch with its refusals
    assert [p.batch for p in parts] == [-1] * (len(parts) - 1) + [7]
    assert parts[-1].refusals == reply.refusals and all(not p.refusals for p in parts[:-1])
    assert b"".join(p.output for p in parts) == out  # every frame once, in order, none split
    assert [f.seq for p in parts for f in decode_batch(p.output)] == list(range(1, 201))
    assert [s for p in parts for s in p.snapshots] == snaps
    # unsolicited output is cut the same way
    cut = [channel.decode(m[4:]) for m in channel.output_messages(out)]
    assert b"".join(c.output for c in cut if isinstance(c, channel.Reply)) == out
    assert channel.output_messages(b"") == []


def test_offered_load_follows_each_clients_own_counter() -> None:
    from apsv.runtime.offered import OfferedLoad

    o = OfferedLoad()
    assert o.rates(100.0, {"a": {"bgp": 1000}}) == {}  # the first call sets the baseline
    assert o.rates(101.0, {"a": {"bgp": 1500}, "b": {"bgp": 200, "bfd": 10}}) == {"bgp": 700.0, "bfd": 10.0}
    # the multiplexer restarted: "a" has not reported again yet, "b" has - no drop, no jump
    assert o.rates(102.0, {"b": {"bgp": 300, "bfd": 10}}) == {"bgp": 100.0, "bfd": 0.0}
    # "a" reports again: only what it offered since its last report counts
    assert o.rates(104.0, {"a": {"bgp": 1900}, "b": {"bgp": 300, "bfd": 10}}) == {"bgp": 200.0, "bfd": 0.0}
    # a counter never goes back (a late, older report changes nothing)
    assert o.rates(105.0, {"a": {"bgp": 1800}}) == {"bgp": 0.0}
    assert o.rates(106.0, {"a": {"bgp": 1901}}) == {"bgp": 1.0}


SIGPIPE_DEFAULT = r"""
import signal, socket, sys, tempfile, time
from pathlib import Path
import mrtparse  # restores SIGPIPE's default action on import, as any library may
assert signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL
from apsv.runtime import channel, wire
from apsv.runtime.credentials import credential
from apsv.runtime.dataplane import DataPlaneServer
from apsv.runtime.links import LinkDown, ShmLink

class Handler:
    def dp_batch(self, owner, data, offsets, snapshot_keys):
        raise AssertionError("no batch is sent")
    def dp_restore(self, owner, msg):
        return ""

key = b"k" * 32
server = DataPlaneServer("i-1", Path(tempfile.mkdtemp()) / "dp", key, Handler(), 1 << 20)
server.start()
# The instance side: a client that said HELLO and stopped reading (shut its side for reading:
# the instance's next write fails, as one to a client gone away does).
gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
gone.connect(str(server.path))
gone.sendall(channel.hello("gone", credential(key, "gone"), ""))
time.sleep(0.3)
gone.shutdown(socket.SHUT_RD)
for _ in range(50):
    server.send_output("gone", channel.output(b"x" * 4096))
    time.sleep(0.002)
assert server._thread.is_alive()
gone.close()
# The client side: an instance that went away under a link.
link = ShmLink("i-1", str(server.path), "c", credential(key, "c"), "")
server.stop()
time.sleep(0.1)
for _ in range(50):
    link.send_restore(b"y" * 65536)
try:
    while True:
        link.read()
        time.sleep(0.01)
except LinkDown:
    pass
b1, b2 = socket.socketpair()
b2.close()
try:
    wire.send(b1, wire.OK, {})
except BrokenPipeError:
    pass
print("alive")
"""


def test_a_peer_gone_is_an_error_not_sigpipe() -> None:
    """A library in the process (mrtparse, on import) may restore SIGPIPE's default action,
    which ends a process that writes to a closed socket. The data plane's writes on both sides
    and the container wire use MSG_NOSIGNAL: the write fails, the link is down, the process lives."""
    r = subprocess.run(
        [sys.executable, "-c", SIGPIPE_DEFAULT], check=False, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "alive", (r.returncode, r.stderr[-2000:])


def test_host_tells_the_client_when_a_session_next_needs_a_timer() -> None:
    """DEADLINE frames, outside the session's output order: one when a timer comes earlier than
    what the client was told, none while it only moves later, a new one once the told one passed."""
    from apsv.frame import decode_deadline

    bgp = int(ProtocolId.BGP)
    key = (1, 2, bgp, 1)
    h = SessionHost("bgp")
    config = {"local_as": 65001, "peer_as": 65002, "router_id": "10.0.0.1", "peer_address": "127.0.0.2"}
    h.open(key, {**config, "passive": True}, 0.0)

    def step(kind: FrameKind, seq: int, at: float) -> list[Frame]:
        out = h.process(encode_batch([Frame(kind, bgp, 1, 2, 1, seq, int(at * 1e9), 0, b"")]), None, at)
        return [f for f in decode_batch(out) if f.kind == FrameKind.DEADLINE]

    [told] = step(FrameKind.CONNECTED, 1, 100.0)  # OPEN sent, the hold timer at its large value
    assert told.seq == 0 and told.rx_ns == 0
    first = decode_deadline(told.payload)
    assert 100.0 < first == h.sessions[key].session.next_deadline()
    assert step(FrameKind.TIMER, 2, 101.0) == []  # nothing due, nothing new: no frame
    [after] = step(FrameKind.TIMER, 3, first + 1)  # the hold timer expired: what comes next, if anything
    assert decode_deadline(after.payload) > first  # infinity: no timer


def test_host_tells_a_deadline_once_per_session_and_batch() -> None:
    """A batch of many frames for two sessions: at most one DEADLINE frame each, the last one's."""
    from apsv.frame import decode_deadline

    bgp = int(ProtocolId.BGP)
    h = SessionHost("bgp")
    config = {"local_as": 65001, "peer_as": 65002, "router_id": "10.0.0.1", "peer_address": "127.0.0.2"}
    for sid in (1, 2):
        h.open((1, 2, bgp, sid), {**config, "passive": True}, 0.0)
    frames = [Frame(FrameKind.CONNECTED, bgp, 1, 2, sid, 1, int(100e9), 0, b"") for sid in (1, 2)]
    frames += [
        Frame(FrameKind.TIMER, bgp, 1, 2, sid, seq, int((100 + seq) * 1e9), 0, b"")
        for seq in (2, 3, 4)
        for sid in (1, 2)
    ]
    out = decode_batch(h.process(encode_batch(frames), None, 104.0))
    told = [f for f in out if f.kind == FrameKind.DEADLINE]
    assert sorted(f.session for f in told) == [1, 2]
    for f in told:
        assert decode_deadline(f.payload) == h.sessions[(1, 2, bgp, f.session)].session.next_deadline()


def test_host_applies_the_frames_before_a_malformed_one_and_counts_it() -> None:
    """A batch sent without offsets (the Docker and object-store paths) whose third frame is
    corrupt: the two before it are applied, the corrupt one is counted, nothing raises."""
    from apsv.errors import DecodeError
    from apsv.frame import frame_offsets

    h = SessionHost("echo")
    h.open(K, {}, 0.0)
    good = encode_batch([frame(1), frame(2)])
    bad = good + b"AF\xa2" + bytes(60)
    with pytest.raises(DecodeError):
        frame_offsets(bad)
    assert frame_offsets(bad, strict=False) == [*frame_offsets(good), -1]
    out = h.process(bad, None, 1.0)
    assert [f.seq for f in decode_batch(out)] == [1, 2]
    assert h.counters.bad_frames == 1 and h.session_info(K)["last_seq"] == 2


def test_socket_directories_of_gone_containers_are_reaped(tmp_path: Path) -> None:
    from apsv.runtime.docker_backend import CONTAINER_MARKER, reap_socket_dirs

    class Engine:
        class containers:
            @staticmethod
            def list(all: bool, filters: dict[str, str]) -> list[Any]:
                return [type("C", (), {"id": "alive"})()]

    for name, marker in (("apsv-bgp-1-a", "alive"), ("apsv-bgp-2-b", "gone"), ("apsv-other", None)):
        (tmp_path / name).mkdir()
        if marker is not None:
            (tmp_path / name / CONTAINER_MARKER).write_text(marker)
    assert reap_socket_dirs(Engine(), tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apsv-bgp-1-a", "apsv-other"]  # unmarked: untouched

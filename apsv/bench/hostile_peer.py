"""A hostile BGP peer against a running agent's listener: what the wire gets, and what it costs.

The attacker is plain sockets on loopback. It plays a configured peer (`attacker`) and sends
malformed OPENs and headers, maximal and over-long messages, a whole session split at every
byte boundary, an UPDATE at one byte a second after the session is up (slowloris), and, from
addresses no session expects, thousands of held connections and a flood of connection
attempts. Each case has the answer RFC 4271 (with RFC 6608's FSM subcodes) prescribes: a
NOTIFICATION (code, subcode), a closed socket, or an established session that stays up.

Meanwhile a well-behaved peer (`bystander`, another configured session) asks for a route
refresh every 50 ms and times the End-of-RIB that answers it (RFC 2918 / RFC 4724): the offload
path's round trip, under each case. `run` returns the outcome of every case, those latencies,
and the agent's memory before and after (from a callback the caller gives). The messages and
the connection it reads them from are in hostile_wire.py.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from apsv.bench.hostile_wire import (
    END_OF_RIB,
    KEEPALIVE,
    NOTIFICATION,
    OPEN,
    UPDATE,
    Target,
    connect_until_open,
    establish,
    maximal_update,
    message,
    open_message,
    route_refresh,
    update_message,
)

# -- the well-behaved peer ---------------------------------------------------------------------


class Bystander(threading.Thread):
    """Keeps its session up and times route refresh -> End-of-RIB, labelled by the phase running."""

    def __init__(self, target: Target, every: float = 0.05) -> None:
        super().__init__(daemon=True, name="apsv-bystander")
        self.target, self.every = target, every
        self.phase = "quiet"
        self.rtts: dict[str, list[float]] = {}
        self.unanswered: dict[str, int] = {}
        self.notifications: list[str] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            p = establish(self.target, self.target.bystander)
        except Exception as e:
            self.error = repr(e)
            self.ready.set()
            return
        self.ready.set()
        last_keepalive = time.monotonic()
        while not self.stop.is_set():
            # an End-of-RIB already here (the one after the session came up) answers no probe
            for t, body in p.drain():
                if t == NOTIFICATION:
                    self.notifications.append(body[:2].hex())
            phase, sent = self.phase, time.monotonic()
            if sent - last_keepalive > 1.0:
                p.send(message(KEEPALIVE))
                last_keepalive = sent
            p.send(route_refresh())
            answered = False
            for t, body in p.messages(sent + 2.0):
                if t == NOTIFICATION:
                    self.notifications.append(body[:2].hex())
                if t == UPDATE and message(UPDATE, body) == END_OF_RIB:
                    self.rtts.setdefault(phase, []).append(time.monotonic() - sent)
                    answered = True
                    break
            if not answered:
                self.unanswered[phase] = self.unanswered.get(phase, 0) + 1
            if p.closed:
                self.notifications.append("closed")
                return
            time.sleep(max(0.0, self.every - (time.monotonic() - sent)))
        p.close()

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for phase, xs in self.rtts.items():
            s = sorted(xs)
            out[phase] = {
                "samples": len(s),
                "p50_ms": round(1000 * s[len(s) // 2], 2),
                "p99_ms": round(1000 * s[min(len(s) - 1, int(len(s) * 0.99))], 2),
                "max_ms": round(1000 * s[-1], 2),
                "unanswered": self.unanswered.get(phase, 0),
            }
        return out


# -- the cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    expected: Any
    run: Callable[[Target], Any]
    slow: bool = False  # minutes at the rates the issue names: the benchmark, not the test


def _malformed(raw: bytes) -> Callable[[Target], Any]:
    def go(t: Target) -> Any:
        p = connect_until_open(t, t.attacker)
        try:
            p.send(raw)
            return list(p.answer(10.0))
        finally:
            p.close()

    return go


def _established_then(raw: bytes, within: float = 10.0) -> Callable[[Target], Any]:
    def go(t: Target) -> Any:
        p = establish(t, t.attacker)
        try:
            p.send(raw)
            return list(p.answer(within))
        finally:
            p.close()

    return go


def _byte_split(t: Target) -> Any:
    """A whole session - OPEN, KEEPALIVE, a maximal UPDATE, another, a route refresh - one octet
    per segment; the answer must be the End-of-RIB and no NOTIFICATION."""
    p = connect_until_open(t, t.attacker)
    try:
        big = maximal_update(t.peer_as, 0)
        stream = (
            open_message(t.peer_as, t.hold_time, "10.0.0.99")
            + message(KEEPALIVE)
            + big
            + update_message(t.peer_as, ["192.0.2.1", "192.0.2.2"])
            + route_refresh()
        )
        for i in range(len(stream)):
            if not p.send(stream[i : i + 1]):
                break
        for typ, body in p.messages(time.monotonic() + 10):
            if typ == NOTIFICATION:
                return ["notification", [body[0], body[1]]]
            if typ == UPDATE and message(UPDATE, body) == END_OF_RIB:
                return ["established", len(stream)]
        return ["closed" if p.closed else "open", None]
    finally:
        p.close()


def _slowloris(rate_s: float) -> Callable[[Target], Any]:
    """After Established (hold time 3 s): an UPDATE at one octet per `rate_s` seconds. Bytes that
    are no whole message do not restart the hold timer (RFC 4271 §8.2.2: KEEPALIVE or UPDATE
    messages do): the answer is Hold Timer Expired, no sooner than the hold time."""

    def go(t: Target) -> Any:
        p = establish(t, t.attacker, hold=3)
        start = time.monotonic()
        try:
            msg = update_message(t.peer_as, ["192.0.2.9"])
            for b in msg:
                if not p.send(bytes([b])):
                    break
                kind, got = p.answer(rate_s)
                if kind != "open":
                    return [kind, got, round(time.monotonic() - start, 2)]
            return ["open", None, round(time.monotonic() - start, 2)]
        finally:
            p.close()

    return go


def _slow_open(rate_s: float) -> Callable[[Target], Any]:
    """An OPEN at one octet per `rate_s` seconds: the session establishes once it is whole (the
    OpenSent hold timer is 4 minutes, RFC 4271 §8.2.2)."""

    def go(t: Target) -> Any:
        p = connect_until_open(t, t.attacker)
        try:
            for b in open_message(t.peer_as, t.hold_time, "10.0.0.99"):
                if not p.send(bytes([b])):
                    return ["closed", None]
                time.sleep(rate_s)
            p.send(message(KEEPALIVE))
            for typ, body in p.messages(time.monotonic() + 10):
                if typ == KEEPALIVE:
                    return ["established", None]
                if typ == NOTIFICATION:
                    return ["notification", [body[0], body[1]]]
            return ["closed" if p.closed else "open", None]
        finally:
            p.close()

    return go


def _raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _stray(t: Target, i: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", t.stray_net + 1 + i % 65000))


def held_connections(t: Target, n: int, hold_s: float = 5.0) -> dict[str, Any]:
    """`n` connections from addresses no session expects, opened and held: the agent closes
    each at once (`connections_refused`), so none holds anything there."""
    n = min(n, _raise_fd_limit(n + 512) - 256)
    socks: list[socket.socket] = []
    failed = 0
    started = time.monotonic()
    try:
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((_stray(t, i), 0))
                s.settimeout(5)
                s.connect(t.agent)
                s.setblocking(False)
                socks.append(s)
            except OSError:
                failed += 1
                s.close()
        opened = time.monotonic() - started
        time.sleep(hold_s)
        closed = 0
        for s in socks:
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass  # still open: the agent has not closed it
            except OSError:
                closed += 1  # reset
        return {
            "attempted": n,
            "opened": len(socks),
            "connect_failed": failed,
            "closed_by_agent": closed,
            "open_seconds": round(opened, 2),
        }
    finally:
        for s in socks:
            s.close()


def connection_flood(t: Target, seconds: float, batch: int = 256) -> dict[str, Any]:
    """Connection attempts for `seconds`, `batch` at a time (non-blocking connects from
    addresses no session expects, each closed once its handshake is done or 2 s passed)."""
    import selectors

    attempts = connected = failed = 0
    stop = time.monotonic() + seconds
    i = 0
    while time.monotonic() < stop:
        sel = selectors.DefaultSelector()
        socks = []
        for _ in range(batch):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.bind((_stray(t, i), 0))
            except OSError:
                s.close()
                failed += 1
                continue
            i += 1
            attempts += 1
            s.connect_ex(t.agent)
            sel.register(s, selectors.EVENT_WRITE)
            socks.append(s)
        pending = set(socks)
        deadline = time.monotonic() + 2.0
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj  # type: ignore[assignment]
                sel.unregister(s)
                pending.discard(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected += 1
                else:
                    failed += 1
        failed += len(pending)
        sel.close()
        for s in socks:
            s.close()
    return {"attempts": attempts, "connected": connected, "failed": failed, "per_s": round(attempts / seconds)}


def cases(slowloris_s: float = 1.0) -> list[Case]:
    def bad_open(**change: Any) -> Callable[[Target], Any]:
        def go(t: Target) -> Any:
            fields: dict[str, Any] = {"asn": t.peer_as, "hold": t.hold_time, "router_id": "10.0.0.99", **change}
            return _malformed(open_message(**fields))(t)

        return go

    out = [
        Case("open_bad_version", ["notification", [2, 1]], bad_open(version=5)),
        Case("open_bad_peer_as", ["notification", [2, 2]], bad_open(asn=65099)),
        Case("open_bad_bgp_identifier", ["notification", [2, 3]], bad_open(router_id="0.0.0.0")),
        Case("open_unsupported_optional_parameter", ["notification", [2, 4]], bad_open(params=bytes([99, 2, 1, 2]))),
        Case("open_unacceptable_hold_time", ["notification", [2, 6]], bad_open(hold=1)),
    ]
    out += [
        Case("open_truncated", ["notification", [1, 2]], _malformed(message(OPEN, b"\x04"))),
        Case("bad_marker", ["notification", [1, 1]], _malformed(b"\xfe" + message(KEEPALIVE)[1:])),
        Case("bad_message_type", ["notification", [1, 3]], _malformed(message(9))),
        Case("update_before_open", ["notification", [5, 1]], _malformed(END_OF_RIB)),
        Case("over_long_4097", ["notification", [1, 2]], _established_then(message(UPDATE, length=4097))),
        Case(
            "over_long_65535",
            ["notification", [1, 2]],
            _established_then(message(UPDATE, b"\x00" * (65535 - 19))),
        ),
        Case(
            "maximal_update",
            ["open", None],  # accepted: no NOTIFICATION, the connection stays
            lambda t: _established_then(maximal_update(t.peer_as, 1 << 16), within=3.0)(t),
        ),
        Case("split_at_every_byte", ["established"], _byte_split),
        Case("slowloris_established", ["notification", [4, 0]], _slowloris(slowloris_s)),
        Case("slowloris_open", ["established"], _slow_open(slowloris_s), slow=True),
    ]
    return out


def _matches(expected: list[Any], got: list[Any]) -> bool:
    return got[: len(expected)] == expected


@dataclass
class Report:
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    held: dict[str, Any] = field(default_factory=dict)
    flood: dict[str, Any] = field(default_factory=dict)


def run(
    target: Target,
    *,
    held: int = 10_000,
    flood_s: float = 10.0,
    slow: bool = True,
    slowloris_s: float = 1.0,
    agent_rss_mb: Callable[[], float] | None = None,
    agent_counters: Callable[[], dict[str, Any]] | None = None,
    slo_ms: float = 100.0,
) -> dict[str, Any]:
    """Every case against `target`, with the bystander timing the offload path throughout."""
    rss = agent_rss_mb or (lambda: 0.0)
    by = Bystander(target)
    by.start()
    if not by.ready.wait(30) or by.error:
        raise RuntimeError(f"the bystander could not establish its session: {by.error}")
    time.sleep(2.0)  # a quiet baseline
    rss_before = rss()
    report = Report()
    for case in cases(slowloris_s):
        if case.slow and not slow:
            continue
        by.phase = case.name
        try:
            got = case.run(target)
        except Exception as e:  # a case that could not run is a failed case, not a crash
            got = ["error", repr(e)]
        report.cases[case.name] = {"expected": case.expected, "got": got, "ok": _matches(case.expected, got)}
    by.phase = "held_connections"
    report.held = held_connections(target, held)
    report.held["ok"] = report.held["opened"] > 0 and report.held["closed_by_agent"] == report.held["opened"]
    by.phase = "connection_flood"
    report.flood = connection_flood(target, flood_s)
    by.phase = "after"
    time.sleep(2.0)
    rss_after = rss()
    by.stop.set()
    by.join(10)
    latency = by.summary()
    worst = max((v["p99_ms"] for v in latency.values()), default=float("inf"))
    out = {
        "cases": report.cases,
        "cases_ok": sum(c["ok"] for c in report.cases.values()),
        "cases_total": len(report.cases),
        "held_connections": report.held,
        "connection_flood": report.flood,
        "bystander": {
            "latency": latency,
            "worst_p99_ms": worst,
            "slo_ms": slo_ms,
            "within_slo": worst <= slo_ms,
            "notifications": by.notifications,
        },
        "agent": {
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1),
            "counters": agent_counters() if agent_counters else {},
        },
    }
    out["ok"] = (
        out["cases_ok"] == out["cases_total"]
        and report.held["ok"]
        and not by.notifications
        and sum(v["unanswered"] for v in latency.values()) == 0
    )
    return out


# -- against a deployment ------------------------------------------------------------------------


@contextlib.contextmanager
def deployed_agent(target: Target, suffix: str = "-hostile") -> Iterator[dict[str, Callable[[], Any]]]:
    """A deployment (two BGP instances) and an agent actor listening on `target.agent`, with
    the attacker's and the bystander's sessions; yields the callbacks `run` takes. Ray must be
    initialised."""
    import psutil
    import ray

    from apsv.agent.actor import create_agent_actor
    from apsv.agent.config import parse_config
    from apsv.runtime.cluster import NAMESPACE, deploy
    from apsv.runtime.vpsm import ProtocolPlan

    def session(peer: str, n: int) -> dict[str, Any]:
        return {
            "session": n,
            "listen": f"{target.agent[0]}:{target.agent[1]}",
            "peer": peer,
            "local_as": target.apsv_as,
            "peer_as": target.peer_as,
            "router_id": "10.0.0.10",
            "hold_time": target.hold_time,
            "idle_hold_time": 0.2,
            "max_idle_hold_time": 0.4,  # the cases reset the attacker's session on purpose
            "ebgp_requires_policy": False,
            "events": "state",
        }

    dep = deploy([ProtocolPlan("bgp", min_instances=2, max_instances=2, policy="fixed")], suffix=suffix, run_loop=False)
    agent = None
    try:
        cfg = parse_config(
            {"tenant": 3, "vrouters": [{"id": 1, "bgp": [session(target.attacker, 1), session(target.bystander, 2)]}]}
        )
        agent = create_agent_actor(cfg, multiplexer_name=dep.multiplexer_name, namespace=NAMESPACE)
        ray.get(agent.start.remote(), timeout=60)
        proc = psutil.Process(ray.get(agent.pid.remote()))
        yield {
            "agent_rss_mb": lambda: proc.memory_info().rss / 2**20,
            "agent_counters": lambda: ray.get(agent.status.remote(), timeout=30)["counters"],
            "mux_stats": lambda: ray.get(dep.multiplexer.stats.remote(), timeout=30),
        }
    finally:
        if agent is not None:
            with contextlib.suppress(Exception):
                ray.get(agent.stop.remote(), timeout=20)
            ray.kill(agent)
        dep.stop()

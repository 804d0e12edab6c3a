"""What runs inside a stack container: a SessionHost served over a Unix socket.

    python -m apsv.runtime.container_worker --socket /run/apsv/worker.sock --protocol bgp

It serves its instance actor's one connection, call after call, in order, and exits when told
to or when that connection closes (the actor's process is gone); the engine then removes it.
It needs no network and writes nothing but its socket.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from apsv.runtime import wire
from apsv.runtime.host import HostLimits, SessionHost

Reply = tuple[dict[str, Any], list[bytes]]  # (meta, blobs), as `wire` sends them


def _ping(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    return {"pid": os.getpid(), "protocol": host.protocol}, []


def _open(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    host.open(
        wire.key_from_json(meta["key"]),
        meta["config"],
        now,
        emit_events=int(meta.get("emit", 0)),
        owner=str(meta.get("owner", "")),
        epoch=int(meta.get("epoch", 0)),
    )
    return {}, []


def _process(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    keys = [wire.key_from_json(k) for k in meta.get("snapshot_keys", [])]
    out = host.process(blobs[0], meta.get("offsets"), now, str(meta.get("owner", "")), keys)
    snap_meta, snap_blobs = wire.snapshots_to_json(host.take_snapshots())
    refusals = [[list(k), reason, seq, epoch, inst] for k, reason, seq, epoch, inst in host.refusals]
    return {"refusals": refusals, **snap_meta}, [out, *snap_blobs]


def _restore(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    host.restore(
        wire.key_from_json(meta["key"]),
        blobs[0],
        wire.seq_from_json(meta["seq"]),
        emit_events=int(meta.get("emit", 0)),
        owner=str(meta.get("owner", "")),
        epoch=int(meta.get("epoch", 0)),
    )
    return {}, []


def _expect(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    host.expect(wire.key_from_json(meta["key"]), str(meta["owner"]), int(meta["epoch"]))
    return {}, []


def _restore_pending(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    snapshot = (blobs[0], wire.seq_from_json(meta["seq"])) if meta.get("has_snapshot") else None
    host.restore_pending(
        wire.key_from_json(meta["key"]),
        str(meta["owner"]),
        int(meta["epoch"]),
        snapshot,
        meta.get("config") or {},
        int(meta.get("emit", 0)),
        now,
    )
    return {}, []


def _holding(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    e = host.sessions.get(wire.key_from_json(meta["key"]))
    return ({"owner": e.owner, "epoch": e.epoch, "emit": e.emit_events} if e is not None else {}), []


def _detach(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    blob, st = host.detach(wire.key_from_json(meta["key"]), str(meta.get("moved_to", "")), int(meta.get("epoch", 0)))
    return {"seq": wire.seq_to_json(st)}, [blob]


def _snapshot(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    blob, st = host.snapshot(wire.key_from_json(meta["key"]))
    return {"seq": wire.seq_to_json(st)}, [blob]


def _depart(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    host.depart(wire.key_from_json(meta["key"]), str(meta["moved_to"]), int(meta["epoch"]))
    return {}, []


def _close(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    host.close(wire.key_from_json(meta["key"]), now)
    return {}, []


def _collect(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    by_owner = host.collect()
    owners = list(by_owner)
    return {"owners": owners}, [by_owner[o] for o in owners]


def _load(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    load = host.load()
    load["latency_ns"], host.counters.latency_ns = host.counters.latency_ns[:4096], []
    return load, []


def _session_table(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    rows = host.session_table(wire.key_from_json(meta["key"]), str(meta["family"]), bool(meta.get("detail", False)))
    return {"rows": rows}, []


def _session_info(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    return host.session_info(wire.key_from_json(meta["key"]), bool(meta.get("digest", True))), []


def _sessions_report(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    return {"sessions": [[list(k), owner, epoch, pending] for k, owner, epoch, pending in host.sessions_report()]}, []


def _session_weights(host: SessionHost, meta: dict[str, Any], blobs: list[bytes], now: float) -> Reply:
    items = list(host.sessions.items())
    return {"keys": [list(k) for k, _ in items], "frames": [e.frames for _, e in items]}, []


# The calls the instance actor makes (apsv.runtime.docker_backend), by operation name
# (apsv.runtime.wire.OP_NAMES); each gets the clock read once, as the call arrives.
OPERATIONS: dict[str, Callable[[SessionHost, dict[str, Any], list[bytes], float], Reply]] = {
    "ping": _ping,
    "open": _open,
    "process": _process,
    "restore": _restore,
    "expect": _expect,
    "restore_pending": _restore_pending,
    "holding": _holding,
    "detach": _detach,
    "snapshot": _snapshot,
    "depart": _depart,
    "close": _close,
    "collect": _collect,
    "load": _load,
    "session_table": _session_table,
    "session_info": _session_info,
    "sessions_report": _sessions_report,
    "session_weights": _session_weights,
}


def handle(host: SessionHost, op: str, meta: dict[str, Any], blobs: list[bytes]) -> Reply:
    now = time.time()
    operation = OPERATIONS.get(op)
    if operation is None:
        raise ValueError(f"unknown operation {op!r}")
    return operation(host, meta, blobs, now)


def serve(path: str, protocol: str, limits: HostLimits) -> int:
    host = SessionHost(protocol, limits)
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    while True:
        conn, _ = srv.accept()
        with conn:
            while True:
                try:
                    code, meta, blobs = wire.recv(conn)
                except wire.WireError:
                    # the actor went away (its process died): nothing connects again - a new
                    # actor makes a new container - so this one ends (and the engine removes it)
                    return 0
                name = wire.OP_NAMES.get(code, "?")
                if name == "shutdown":
                    wire.send(conn, wire.OK, {})
                    return 0
                try:
                    rmeta, rblobs = handle(host, name, meta, blobs)
                except Exception as e:  # report it; one bad call does not end the container
                    wire.send(conn, wire.ERROR, {"error": f"{type(e).__name__}: {e}"})
                    continue
                wire.send(conn, wire.OK, rmeta, rblobs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="APSV stack container worker")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--max-sessions", type=int, default=10_000)
    ap.add_argument("--snapshot-every", type=int, default=256)
    args = ap.parse_args(argv)
    return serve(
        args.socket, args.protocol, HostLimits(max_sessions=args.max_sessions, snapshot_every=args.snapshot_every)
    )


if __name__ == "__main__":
    sys.exit(main())

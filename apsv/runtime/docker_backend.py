"""The Docker backend: a stack instance's sessions run in a locked-down container.

The container runs the stack image (`apsv.runtime.stack_image`) with no network, every
capability dropped, a read-only root, no-new-privileges, as user nobody, with the CPU and
memory limits of the instance's allocation and a PID limit. The only writable path is the
bind-mounted directory holding the Unix socket the instance actor talks through
(`apsv.runtime.wire`) to the container's worker (`apsv.runtime.container_worker`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from apsv.runtime import wire
from apsv.runtime.host import HostLimits, Key, Refused, SeqState
from apsv.runtime.stack_image import PY_ROOT, SITE, SOCKET_DIR, docker_client, ensure_image


class InstanceFailed(RuntimeError):
    """The container behind an instance is gone: the multiplexer must recover its sessions."""


CONTAINER_MARKER = ".apsv-container"  # in a socket directory: the id of the container it serves


def reap_socket_dirs(client: Any, root: Path = Path("/tmp")) -> int:
    """Remove the socket directories whose container is gone: an instance whose process was
    killed never ran its shutdown. Only directories this module marked are touched."""
    live = {c.id for c in client.containers.list(all=True, filters={"label": "apsv.instance"})}
    reaped = 0
    for d in root.glob("apsv-*"):
        try:
            cid = (d / CONTAINER_MARKER).read_text().strip()
        except OSError:
            continue
        if cid and cid not in live:
            shutil.rmtree(d, ignore_errors=True)
            reaped += 1
    return reaped


def container_user() -> tuple[int, int]:
    """The uid:gid a stack container runs as: nobody when APSV runs as root, else its own user
    (never root inside the container either way)."""
    return (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())


class DockerBackend:
    kind = "docker"

    def __init__(
        self,
        instance_id: str,
        protocol: str,
        limits: HostLimits,
        allocation: Any,
        start_timeout: float = 30.0,
        image: str | None = None,
    ):
        self._wire_lock = threading.Lock()  # one request/response on the socket at a time
        self._snapshots: dict[Key, tuple[SeqState, bytes]] = {}  # came back with a process()
        self.on_failure: Callable[[str], None] | None = None
        self.client = docker_client()
        self.image = ensure_image(self.client, image)
        reap_socket_dirs(self.client)
        self.sockdir = Path(tempfile.mkdtemp(prefix=f"apsv-{instance_id}-", dir="/tmp"))  # 0700
        # The container's user creates its socket here, and only it and this process may enter:
        # as root, the directory is handed to nobody (root enters any directory); otherwise the
        # container runs as this process's own user.
        uid, gid = container_user()
        if os.geteuid() == 0:
            os.chown(self.sockdir, uid, gid)
        self.path = self.sockdir / "worker.sock"
        self.container = self.client.containers.run(
            self.image,
            [
                f"{PY_ROOT}/bin/python3",
                "-m",
                "apsv.runtime.container_worker",
                "--socket",
                f"{SOCKET_DIR}/worker.sock",
                "--protocol",
                protocol,
                "--max-sessions",
                str(limits.max_sessions),
                "--snapshot-every",
                str(limits.snapshot_every),
            ],
            detach=True,
            auto_remove=True,  # gone once its worker exits: shut down, or its actor died
            name=f"apsv-{instance_id}-{uuid.uuid4().hex[:6]}",
            labels={"apsv.instance": instance_id, "apsv.protocol": protocol},
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            user=f"{uid}:{gid}",
            mem_limit=int(allocation.memory_bytes),
            memswap_limit=int(allocation.memory_bytes),
            nano_cpus=int(allocation.cpu * 1e9),
            pids_limit=64,
            volumes={str(self.sockdir): {"bind": SOCKET_DIR, "mode": "rw"}},
            environment={"PYTHONPATH": SITE, "PYTHONHOME": PY_ROOT, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        (self.sockdir / CONTAINER_MARKER).write_text(self.container.id)  # for reap_socket_dirs
        self.sock = self._connect(start_timeout)
        # a container that does not answer within its deadline (paused, hung) has failed: the
        # call raises, the instance ends and its sessions are restored elsewhere
        self.sock.settimeout(allocation.call_deadline_s)
        self._cgroup = self._find_cgroup()

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        polls = 0
        while time.monotonic() < deadline:
            if self.path.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.path))
                    wire.call(s, "ping")
                    return s
                except OSError as e:
                    last = e
                    s.close()
            polls += 1
            if polls % 10 == 0:  # asking the engine costs more than looking for the socket
                self.container.reload()
                if self.container.status in ("exited", "dead"):
                    logs = self.container.logs(tail=20).decode(errors="replace")
                    raise InstanceFailed(f"stack container exited during start: {logs}")
            time.sleep(0.01)
        raise InstanceFailed(f"stack container did not open its socket in {timeout}s ({last})")

    def _call(
        self, op: str, meta: dict[str, Any] | None = None, blobs: list[bytes | memoryview] | None = None
    ) -> tuple[dict[str, Any], list[bytes]]:
        try:
            with self._wire_lock:  # load() comes from the instance's control thread
                return wire.call(self.sock, op, meta, blobs)
        except (OSError, wire.WireError) as e:
            why = f"stack container {self.container.name} is gone: {e}"
            if self.on_failure is not None:
                self.on_failure(why)  # the instance ends: its sessions are restored elsewhere
            raise InstanceFailed(why) from None

    def open(self, key: Key, config: Mapping[str, Any], now: float, emit_events: int, owner: str, epoch: int) -> None:
        self._call(
            "open", {"key": list(key), "config": dict(config), "emit": emit_events, "owner": owner, "epoch": epoch}
        )

    def process(
        self, data: bytes | memoryview, offsets: Sequence[int], now: float, owner: str, snapshot_keys: Sequence[Key]
    ) -> tuple[bytes, list[Refused]]:
        """One round trip: the frames (one copy, into the socket), back the output, the refusals
        and the snapshots taken (kept for `take_snapshots`)."""
        meta: dict[str, Any] = {"offsets": list(offsets), "owner": owner}
        if snapshot_keys:
            meta["snapshot_keys"] = [list(k) for k in snapshot_keys]
        rmeta, blobs = self._call("process", meta, [data])
        self._snapshots.update(wire.snapshots_from_json(rmeta, blobs[1:]))
        refused = [(wire.key_from_json(k), int(r), int(q), int(e), str(i)) for k, r, q, e, i in rmeta["refusals"]]
        return blobs[0], refused

    def restore(self, key: Key, blob: bytes, seq: SeqState, emit_events: int, owner: str, epoch: int) -> None:
        meta = {"key": list(key), "seq": wire.seq_to_json(seq), "emit": emit_events, "owner": owner, "epoch": epoch}
        self._call("restore", meta, [blob])

    def expect(self, key: Key, owner: str, epoch: int) -> None:
        self._call("expect", {"key": list(key), "owner": owner, "epoch": epoch})

    def restore_pending(
        self,
        key: Key,
        owner: str,
        epoch: int,
        snapshot: tuple[bytes, SeqState] | None,
        config: Mapping[str, Any],
        emit_events: int,
        now: float,
    ) -> None:
        meta: dict[str, Any] = {"key": list(key), "owner": owner, "epoch": epoch, "emit": emit_events}
        if snapshot is None:
            self._call("restore_pending", {**meta, "config": dict(config)})
        else:
            self._call(
                "restore_pending", {**meta, "has_snapshot": True, "seq": wire.seq_to_json(snapshot[1])}, [snapshot[0]]
            )

    def holding(self, key: Key) -> tuple[str, int, int] | None:
        meta = self._call("holding", {"key": list(key)})[0]
        return (str(meta["owner"]), int(meta["epoch"]), int(meta["emit"])) if meta else None

    def detach(self, key: Key, moved_to: str, epoch: int) -> tuple[bytes, SeqState]:
        meta, blobs = self._call("detach", {"key": list(key), "moved_to": moved_to, "epoch": epoch})
        self._snapshots.pop(key, None)
        return blobs[0], wire.seq_from_json(meta["seq"])

    def depart(self, key: Key, moved_to: str, epoch: int) -> None:
        self._call("depart", {"key": list(key), "moved_to": moved_to, "epoch": epoch})

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]:
        meta, blobs = self._call("snapshot", {"key": list(key)})
        return blobs[0], wire.seq_from_json(meta["seq"])

    def snapshots_waiting(self) -> bool:
        return bool(self._snapshots)

    def take_snapshots(self) -> dict[Key, tuple[SeqState, bytes]]:
        """Those a process() brought back (the container takes them there: nothing else makes any)."""
        snaps, self._snapshots = self._snapshots, {}
        return snaps

    def close(self, key: Key, now: float) -> None:
        self._call("close", {"key": list(key)})

    def collect(self) -> dict[str, bytes]:
        meta, blobs = self._call("collect")
        return dict(zip(meta["owners"], blobs, strict=True))

    def load(self) -> dict[str, Any]:
        return self._call("load")[0]

    def session_info(self, key: Key, digest: bool = True) -> dict[str, Any]:
        try:
            return self._call("session_info", {"key": list(key), "digest": digest})[0]
        except wire.RemoteError as e:
            if str(e).startswith("KeyError"):
                raise KeyError(key) from None
            raise

    def session_table(self, key: Key, family: str, detail: bool = False) -> list[tuple[Any, ...]]:
        rows = self._call("session_table", {"key": list(key), "family": family, "detail": detail})[0]["rows"]
        return [tuple(r) for r in rows]

    def sessions_report(self) -> list[tuple[Key, str, int, bool]]:
        rows = self._call("sessions_report")[0]["sessions"]
        return [(wire.key_from_json(k), str(o), int(e), bool(p)) for k, o, e, p in rows]

    def session_weights(self) -> dict[Key, int]:
        meta = self._call("session_weights")[0]
        return {wire.key_from_json(k): int(n) for k, n in zip(meta["keys"], meta["frames"], strict=True)}

    def _find_cgroup(self) -> dict[str, Path]:
        cid = self.container.id
        found = {}
        for name, rel in (("memory", "memory.usage_in_bytes"), ("cpu", "cpuacct.usage")):
            for base in (
                f"/sys/fs/cgroup/{name}/docker/{cid}",
                f"/sys/fs/cgroup/{'cpu,cpuacct' if name == 'cpu' else name}/docker/{cid}",
            ):
                p = Path(base) / rel
                if p.exists():
                    found[name] = p
                    break
        v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope")
        if not found and v2.exists():
            found = {"memory_v2": v2 / "memory.current", "cpu_v2": v2 / "cpu.stat"}
        return found

    def usage(self) -> dict[str, float]:
        """The container's CPU seconds and memory, from its cgroup (or the engine's stats)."""
        cg = self._cgroup
        try:
            if "memory" in cg and "cpu" in cg:
                return {
                    "cpu_seconds": int(cg["cpu"].read_text()) / 1e9,
                    "rss_bytes": float(int(cg["memory"].read_text())),
                }
            if "memory_v2" in cg:
                usec = next(
                    int(line.split()[1])
                    for line in cg["cpu_v2"].read_text().splitlines()
                    if line.startswith("usage_usec")
                )
                return {"cpu_seconds": usec / 1e6, "rss_bytes": float(int(cg["memory_v2"].read_text()))}
        except (OSError, ValueError, StopIteration):
            pass
        st = self.container.stats(stream=False)
        return {
            "cpu_seconds": st["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9,
            "rss_bytes": float(st["memory_stats"].get("usage", 0)),
        }

    def shutdown(self) -> None:
        with contextlib.suppress(OSError, wire.WireError, wire.RemoteError):
            self.sock.settimeout(2.0)  # a paused or hung container answers nothing: it is removed
            wire.call(self.sock, "shutdown")
        try:
            self.sock.close()
            self.container.reload()
            if self.container.status == "running":
                self.container.stop(timeout=2)
        except Exception:  # already gone
            pass
        with contextlib.suppress(Exception):
            self.container.remove(force=True)
        shutil.rmtree(self.sockdir, ignore_errors=True)

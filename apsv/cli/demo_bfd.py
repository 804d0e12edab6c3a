"""The demo's BFD peers: remote ends played in this process against BFD sessions offloaded to
the cluster (the wire and the agent between them)."""

from __future__ import annotations

import threading
import time
from typing import Any


class BfdPairs:
    """BFD sessions offloaded to the cluster, each facing a remote peer played here.

    The remote ends are the same sans-I/O `BfdSession` run in this process; this class is the
    wire and the agent between them: every transmit interval it delivers each remote end's
    current packet to its cluster session, and it hands each cluster session's transmission
    program (what the agent would send) to the remote end. Both sides come Up by RFC 5880's
    three-way handshake, through the offload path to a BFD stack instance."""

    def __init__(self, im: Any, n: int, tx_ms: float = 300.0) -> None:
        from apsv.bfd.session import BfdSession, BfdSessionConfig
        from apsv.frame import ProtocolId
        from apsv.runtime.client import OffloadClient

        self.n, self.tx = n, tx_ms / 1000.0
        self.keys = [(1, 1000 + i // 10, int(ProtocolId.BFD), i + 1) for i in range(n)]  # 10 per router
        self.client = OffloadClient(im, on_output=self._output, max_batch_delay_s=0.005, metrics_label="demo-bfd")
        now = time.time()
        self.remote = []
        self.packet: list[bytes] = []
        for i in range(n):
            peer = BfdSession(
                BfdSessionConfig(
                    peer_address=f"127.0.1.{i % 250 + 1}",
                    local_address=f"127.0.2.{i % 250 + 1}",
                    local_discriminator=100_000 + i,
                    desired_min_tx_ms=tx_ms,
                    required_min_rx_ms=tx_ms,
                )
            )
            self.remote.append(peer)
            self.packet.append(self._program_packet(peer.start(now)) or b"")
        specs = [
            (
                k,
                "bfd",
                {
                    "peer_address": f"127.0.2.{i % 250 + 1}",
                    "local_address": f"127.0.1.{i % 250 + 1}",
                    "local_discriminator": i + 1,
                    "desired_min_tx_ms": tx_ms,
                    "required_min_rx_ms": tx_ms,
                },
                0,
            )
            for i, k in enumerate(self.keys)
        ]
        refused = [v for v in self.client.open_sessions(specs).values() if v.startswith("error")]
        if refused:
            raise RuntimeError(f"{len(refused)} BFD sessions refused: {refused[0]}")
        self.programs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-bfd", daemon=True)

    @staticmethod
    def _program_packet(events: list[Any]) -> bytes | None:
        from apsv.bfd.program import TxProgram as Program
        from apsv.stacks.interface import TxProgram

        packet = None
        for ev in events:
            if isinstance(ev, TxProgram):
                packet = Program.decode(ev.data).packet
        return packet

    def _output(self, f: Any) -> None:
        from apsv.bfd.program import TxProgram as Program
        from apsv.frame import FrameKind

        if f.kind != FrameKind.TX_PROGRAM:
            return
        self.programs += 1
        prog = Program.decode(f.payload)
        peer = self.remote[f.session - 1]
        for pkt in (prog.once, prog.packet):
            if pkt:
                got = self._program_packet(peer.data_received(pkt, time.time()))
                if got is not None:
                    self.packet[f.session - 1] = got

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.time()
            for k, pkt in zip(self.keys, self.packet, strict=True):
                if pkt:
                    self.client.send(k, pkt)
            self.client.flush()
            while time.time() - t0 < self.tx and not self._stop.is_set():
                self.client.service()
                self.client.poll()
                time.sleep(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop transmitting; the state of both ends of every pair."""
        from apsv.bfd.packet import State

        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()
        up = sum(1 for p in self.remote if p.state is State.UP)
        return {"sessions": self.n, "remote_up": up, "programs": self.programs, "tx_ms": self.tx * 1000}

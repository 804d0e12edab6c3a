"""What every part of `OffloadClient` may use: its counters, its state, and the helpers other
parts define. The parts (replies.py, routes.py) derive from `Parts`, and `OffloadClient` from
them; the declarations are for the type checker only (at run time `Parts` is empty), and it
checks that the definitions match them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apsv.runtime.buffer_pool import Buffer, BufferPool
from apsv.runtime.custody import Custody
from apsv.runtime.delivery import OutputOrder
from apsv.runtime.host import Key
from apsv.runtime.links import Link
from apsv.runtime.metrics import ClientMetrics
from apsv.runtime.outbox import Outbox, Session
from apsv.runtime.routefeed import RouteFeed
from apsv.runtime.tenancy import TokenBucket


@dataclass
class ClientStats:
    outputs: int = 0  # output frames handed over (counted by the client's OutputOrder)
    repeated_outputs: int = 0  # regenerated after a restore and dropped
    reordered_outputs: int = 0  # arrived before an earlier one of their session, held until it came
    output_gaps: int = 0  # output frames given up on (too many waiting for an earlier one)
    frames_sent: int = 0
    payload_bytes: int = 0
    batches: int = 0
    payload_copies: int = 0  # whole-payload copies made on the way to the stack decoder
    inflight_waits: int = 0
    window_waits: int = 0  # batches that waited for an instance's window
    refused: int = 0  # refusals (one per session and batch) from instances
    frames_resent: int = 0  # from custody, after refusals or restores
    restores: int = 0  # sessions restored from custody on a new instance
    relocations: int = 0  # sessions whose route the multiplexer was asked for
    links_lost: int = 0  # instances whose connection broke (died, or closed it)
    custody_waits: int = 0  # sends held back until snapshots freed custody
    rate_waits: int = 0  # sends held back by the tenant's message rate (`can_send` said no)
    longest_reply_gap_s: float = 0.0  # the longest wait for any reply while batches were out
    custody_copy_bytes: int = 0  # batches copied into custody (off the path to the decoder)


class Parts:
    im: Any
    node_id: str
    pool: BufferPool
    client_id: str
    credential: bytes
    rate: TokenBucket | None
    force: str | None
    max_inflight: int
    stats: ClientStats
    order: OutputOrder
    custody: Custody
    sessions: dict[Key, Session]
    links: dict[str, Link]
    endpoints: dict[str, dict[str, Any]]
    feed: RouteFeed
    max_batch_delay_s: float | None
    eager_inflight: int
    batch_latencies: list[float]
    _buf: Buffer | None
    outbox: Outbox
    _open_parts: dict[int, int]
    _buffers_out: int
    _batch_ids: int
    _mark: int
    _batch_started: float
    _last_poll: float
    _last_reply: float
    _resends: dict[Key, Session]
    _locating: dict[Key, Session]
    _control: list[tuple[str, Any]]
    _restore_ids: int
    _waiting_offers: dict[int, int]
    _closed_offers: dict[int, int]
    _offered_reported: dict[str, int]
    _protocols: dict[int, str]
    _report_ref: Any
    _last_report: float
    _last_metrics: float
    _latencies_exported: int
    metrics: ClientMetrics

    if TYPE_CHECKING:

        @staticmethod
        def _call_mux(make: Callable[[], Any], timeout: float) -> Any: ...
        def _link_to(self, iid: str) -> Link | None: ...
        def _route(self, s: Session, iid: str, epoch: int, state: str) -> None: ...
        def _hold(self, s: Session) -> None: ...
        def _restore(self, s: Session) -> None: ...
        @property
        def offered(self) -> dict[int, int]: ...
        def _take_buffer(self) -> Buffer: ...
        def flush(self) -> None: ...
        def _on_routes(self, update: dict[str, Any]) -> None: ...
        def _relocate(self) -> None: ...
        def _check_control(self) -> None: ...
        def _report(self, now: float, wait: bool = False) -> None: ...

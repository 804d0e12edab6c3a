"""Route maps: loaded from the configuration, changed at run time (re-import from what the peer
sent, re-export of what this speaker announces)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from apsv.bgp import constants as C
from apsv.bgp.config import FAMILY_CODES, BgpSessionConfig
from apsv.bgp.events import (
    PolicyChanged,
    RoutesChanged,
)
from apsv.bgp.fsm import State
from apsv.bgp.message import (
    RouteRefresh,
    encode_message,
)
from apsv.bgp.path_attributes import PathAttributes
from apsv.bgp.policy import RouteMapEngine
from apsv.bgp.rib import BestPathChange
from apsv.bgp.session import adj_rib_out, updates
from apsv.bgp.session.common import Family
from apsv.errors import field_path
from apsv.stacks.interface import (
    StackEvent,
)

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def set_policy(s: BgpSession, change: Mapping[str, Any], now: float) -> list[StackEvent]:
    """`{"op": "policy", "policy": {...}, "import_policy": ..., "export_policy": ...,
    "ebgp_requires_policy": ...}` (the keys given replace the configuration's). Import
    applies to routes received from now on, so each family's routes are asked for again
    with ROUTE-REFRESH (RFC 2918) where the peer supports it; export is re-applied to what
    the session originates at once. Raises ValueError (naming the field) on a bad policy."""
    s._now = now
    keys = ("policy", "import_policy", "export_policy", "ebgp_requires_policy")
    update = {k: change[k] for k in keys if k in change}
    try:
        cfg = BgpSessionConfig.model_validate({**s.config.model_dump(mode="json"), **update})
    except ValidationError as e:
        raise ValueError("; ".join(f"{field_path(x['loc'])}: {x['msg']}" for x in e.errors())) from None
    s.config = cfg
    load_policy(s, cfg)
    refreshed: list[str] = []
    needs_reset: list[str] = []
    announced = withdrawn = 0
    n = s.negotiated
    if s.state is State.ESTABLISHED and n is not None:
        for fam in sorted(n.families):
            if s.received is not None and fam in s.adj_in:
                reimport(s, fam)  # soft reconfiguration: from what the peer sent
                refreshed.append(C.family_name(fam))
            elif n.route_refresh:
                s._write(encode_message(RouteRefresh(fam[0], fam[1])))
                s.counters["route_refresh_sent"] += 1
                refreshed.append(C.family_name(fam))
            else:
                needs_reset.append(C.family_name(fam))
    announced, withdrawn = reexport(s)
    s._out.append(PolicyChanged(refreshed, needs_reset, announced, withdrawn))
    return s._flush()


def load_policy(s: BgpSession, cfg: BgpSessionConfig) -> None:
    """The route maps `cfg` names, compiled, and whether RFC 8212 applies."""
    s.route_maps = {}
    for direction in ("import", "export"):
        for name in cfg.families:
            rm = cfg.route_map(direction, name)
            if rm is not None:
                s.route_maps[(direction, FAMILY_CODES[name])] = RouteMapEngine(rm, cfg.policy)
    s._rfc8212 = cfg.ebgp_requires_policy and not cfg.ibgp


def reimport(s: BgpSession, fam: Family) -> None:
    """The family's routes as the peer sent them, through the import policy now in force."""
    assert s.received is not None
    rib = s.adj_in[fam]
    changes: list[BestPathChange] = []
    for pa, keys in list(s.received.groups(fam)):
        changes += updates.import_routes(s, fam, rib, keys, pa)
    s.counters["soft_reconfigurations"] += 1
    if changes:
        s._out.append(RoutesChanged(changes))


def reexport(s: BgpSession) -> tuple[int, int]:
    """What the session originates, through the export policy in force: announce what is
    new or changed, withdraw what it no longer lets out. (announced, withdrawn)."""
    fresh: dict[Family, dict[bytes, PathAttributes]] = {}
    for fam, pa, keys in adj_rib_out.exported(s, s.announcements):
        fresh.setdefault(fam, {}).update(dict.fromkeys(keys, pa))
    announced = withdrawn = 0
    up = s.state is State.ESTABLISHED and s.negotiated is not None
    for fam in sorted(set(fresh) | set(s.adj_out)):
        old, new = s.adj_out.get(fam, {}), fresh.get(fam, {})
        gone = [k for k in old if k not in new]
        changed: dict[PathAttributes, list[bytes]] = {}
        for k, pa in new.items():
            if old.get(k) is not pa:
                changed.setdefault(pa, []).append(k)
        if up and s.negotiated is not None and fam in s.negotiated.families:
            if gone:
                adj_rib_out.send_withdrawals(s, fam, gone)
            for pa, ks in changed.items():
                adj_rib_out.send_announcements(s, fam, pa, ks)
        withdrawn += len(gone)
        announced += sum(len(ks) for ks in changed.values())
    s.adj_out = fresh
    return announced, withdrawn

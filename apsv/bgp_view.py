"""An operator's view of the BGP sessions of a running deployment, in FRR's JSON shapes.

`summary` is `show bgp vrf all summary json`: per virtual router (FRR's VRF), per family, each
neighbour with `remoteAs`, `localAs`, `state`, `peerUptime` / `peerUptimeMsec`, `msgRcvd`,
`msgSent`, `pfxRcd` (prefixes accepted: in the Adj-RIB-In after import policy, as FRR counts
them), `pfxSnt`. `routes` is `show bgp vrf NAME ipv4 unicast json`: `routes` keyed by prefix,
each a list of paths with `valid`, `bestpath`, `network`, `peerId`, `path`, `origin`,
`metric` (MED), `locPrf`, `nexthops`, and `community` / `largeCommunity` strings. Fields APSV
adds are named apart (`apsvSession`, `stale`, `policyRefused`).

The shaping is pure (session infos and route rows in, JSON out); `collect_*` asks the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

Key = tuple[int, int, int, int]
BGP = 1  # ProtocolId.BGP
FAMILIES = {"1/1": ("ipv4Unicast", "ipv4-unicast"), "2/1": ("ipv6Unicast", "ipv6-unicast")}
ORIGIN = {"igp": "IGP", "egp": "EGP", "incomplete": "incomplete"}
CALL_TIMEOUT_S = 30.0


def vrf_name(key: Key) -> str:
    """A virtual router's name in these views: tenant/vrouter."""
    return f"{key[0]}/{key[1]}"


def _uptime(ms: int) -> str:
    s = ms // 1000
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h:02d}:{m:02d}:{s:02d}"


def _messages(info: Mapping[str, Any]) -> tuple[int, int]:
    rcvd = sum(int(v) for k, v in info.items() if k.startswith("messages_in_"))
    sent = int(info.get("opens_sent", 0)) + int(info.get("keepalives_sent", 0)) + int(info.get("updates_out", 0))
    sent += sum(int(v) for k, v in info.items() if k.startswith("notifications_sent_"))
    return rcvd, sent


def summary(infos: Mapping[Key, Mapping[str, Any]], now: float) -> dict[str, Any]:
    """FRR's `show bgp vrf all summary json` for APSV's BGP sessions (infos: session_info)."""
    out: dict[str, Any] = {}
    for key in sorted(k for k in infos if k[2] == BGP):
        info = infos[key]
        up_ms = int(max(0.0, now - info["established_at"]) * 1000) if info.get("established_at") else 0
        rcvd, sent = _messages(info)
        vrf = out.setdefault(vrf_name(key), {})
        ribs: Mapping[str, int] = info.get("loc_rib", {})
        for fam_key, (fam_name, _) in FAMILIES.items():
            if fam_key not in ribs and not (fam_key == "1/1" and not ribs):
                continue
            table = vrf.setdefault(
                fam_name,
                {"routerId": info.get("router_id"), "as": info.get("local_as"), "peers": {}, "totalPeers": 0},
            )
            table["peers"][str(info.get("peer_address"))] = {
                "remoteAs": info.get("peer_as"),
                "localAs": info.get("local_as"),
                "version": 4,
                "msgRcvd": rcvd,
                "msgSent": sent,
                "peerUptime": _uptime(up_ms) if up_ms else "never",
                "peerUptimeMsec": up_ms,
                "peerUptimeEstablishedEpoch": int(info["established_at"]) if info.get("established_at") else None,
                "pfxRcd": int(ribs.get(fam_key, 0)),
                "pfxSnt": int(info.get("prefixes_advertised", 0)),
                "state": info.get("state"),
                "connectionsEstablished": int(info.get("established", 0)),
                "apsvSession": list(key),
                "policyRefused": int(info.get("policy_refused_in", 0)),
                "stale": int(info.get("stale_routes", 0)),
            }
            table["totalPeers"] = len(table["peers"])
    return out


def routes(
    rows_by_session: Mapping[Key, list[tuple[Any, ...]]],
    infos: Mapping[Key, Mapping[str, Any]],
    prefix: str | None = None,
) -> dict[str, Any]:
    """FRR's `show bgp ipv4 unicast json` of one virtual router: every session's best paths
    (rows: BgpSession.route_rows), one list per prefix."""
    out: dict[str, Any] = {"routes": {}}
    for key, rows in sorted(rows_by_session.items()):
        info = infos.get(key, {})
        out.setdefault("vrfName", vrf_name(key))
        out.setdefault("routerId", info.get("router_id"))
        out.setdefault("localAS", info.get("local_as"))
        for p, nh, origin, path, med, lp, comms, large, stale in rows:
            if prefix is not None and p != prefix:
                continue
            entry: dict[str, Any] = {
                "valid": True,
                "bestpath": True,
                "network": p,
                "peerId": info.get("peer_address"),
                "path": path,
                "origin": ORIGIN.get(origin, origin),
                "nexthops": [{"ip": nh, "afi": "ipv6" if nh and ":" in nh else "ipv4", "used": True}],
                "apsvSession": list(key),
            }
            if med is not None:
                entry["metric"] = med
            if lp is not None:
                entry["locPrf"] = lp
            if comms:
                entry["community"] = {"string": comms}
            if large:
                entry["largeCommunity"] = {"string": large}
            if stale:
                entry["stale"] = True
            out["routes"].setdefault(p, []).append(entry)
    return out


def collect_summary(im: Any) -> dict[str, Any]:
    """Ask the multiplexer for every session's info (it asks the instances holding them)."""
    import ray

    infos = ray.get(im.session_infos.remote(), timeout=CALL_TIMEOUT_S)
    return summary({tuple(k): v for k, v in infos.items()}, time.time())


def collect_routes(im: Any, vpsm: Any, vrouter: str, family: str, prefix: str | None) -> dict[str, Any]:
    """`vrouter`: "TENANT/VROUTER" or a virtual router id (any tenant)."""
    import ray

    tenant, _, vr = vrouter.rpartition("/")
    want = int(vr)
    routes_table: dict[str, list[Key]] = ray.get(im.routes_table.remote(), timeout=CALL_TIMEOUT_S)
    handles = ray.get(vpsm.instance_handles.remote(), timeout=CALL_TIMEOUT_S)
    keys: dict[Key, str] = {
        (k[0], k[1], k[2], k[3]): iid
        for iid, ks in routes_table.items()
        for k in ks
        if k[2] == BGP and k[1] == want and (not tenant or k[0] == int(tenant))
    }
    if not keys:
        raise LookupError(f"no BGP session of virtual router {vrouter}")
    infos = ray.get(im.session_infos.remote(list(keys)), timeout=CALL_TIMEOUT_S)
    rows = {
        k: ray.get(handles[iid].session_table.remote(k, family, True), timeout=CALL_TIMEOUT_S)
        for k, iid in keys.items()
        if iid in handles
    }
    return routes(rows, {tuple(k): v for k, v in infos.items()}, prefix)

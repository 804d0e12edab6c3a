"""Routing policy as FRR writes it: the lists' semantics one by one, then route maps applied by
a session on import and export, RFC 8212, and configuration errors that name their place."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from apsv.bgp import constants as C
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.fsm import State
from apsv.bgp.policy import Policy
from apsv.bgp.policy_lists import (
    CommunityList,
    CompiledCommunityList,
    PrefixList,
    as_path_text,
    ext_community_text,
    frr_regex,
    parse_ext_community,
)
from apsv.bgp.session import BgpSession
from tests.test_session import A, B, pair


def prefix_list(*entries: dict[str, Any]) -> Any:
    return PrefixList.model_validate({"entries": list(entries)}).compiled()


def permits(pl: Any, prefix: str) -> bool:
    import ipaddress

    net = ipaddress.ip_network(prefix)
    return bool(pl.permits(net.version, int(net.network_address), net.prefixlen))


def test_prefix_lists_follow_frr_ge_le_and_the_implicit_deny() -> None:
    exact = prefix_list({"action": "permit", "prefix": "10.0.0.0/8"})
    assert permits(exact, "10.0.0.0/8") and not permits(exact, "10.1.0.0/16")
    le = prefix_list({"action": "permit", "prefix": "10.0.0.0/8", "le": 24})
    assert permits(le, "10.0.0.0/8") and permits(le, "10.1.2.0/24") and not permits(le, "10.1.2.0/25")
    assert not permits(le, "11.0.0.0/16") and not permits(le, "2001:db8::/32")
    ge = prefix_list({"action": "permit", "prefix": "10.0.0.0/8", "ge": 30})
    assert permits(ge, "10.0.0.4/30") and permits(ge, "10.0.0.1/32") and not permits(ge, "10.0.0.0/29")
    ordered = prefix_list(
        {"seq": 20, "action": "permit", "prefix": "0.0.0.0/0", "le": 32},
        {"seq": 10, "action": "deny", "prefix": "10.0.0.0/8", "le": 32},
    )
    assert not permits(ordered, "10.9.0.0/16") and permits(ordered, "192.0.2.0/24")
    v6 = prefix_list({"action": "permit", "prefix": "2001:db8::/32", "ge": 48, "le": 64})
    assert permits(v6, "2001:db8:1::/48") and not permits(v6, "2001:db8::/32")


def test_as_path_regular_expressions_as_frr_reads_them() -> None:
    path = ((C.AS_SEQUENCE, (65001, 65002)), (C.AS_SET, (65003, 65004)))
    text = as_path_text(path)
    assert text == "65001 65002 {65003,65004}"
    assert frr_regex("^65001_").search(text) and not frr_regex("^6500_").search(text)
    assert frr_regex("_65002_").search(text) and frr_regex("_65004}$").search(text)
    assert not frr_regex("^65002_").search(text) and frr_regex("^$").search("")
    assert not frr_regex("_650011_").search("650011 1".replace("650011", "65001"))


def test_community_lists_standard_expanded_large_and_extended() -> None:
    std = CompiledCommunityList(
        CommunityList.model_validate({"entries": [{"action": "permit", "communities": ["65001:1", "65001:2"]}]}),
        "standard",
    )
    assert std.permits(((65001 << 16) | 1, (65001 << 16) | 2, 7)) and not std.permits(((65001 << 16) | 1,))
    exp = CompiledCommunityList(
        CommunityList.model_validate(
            {"entries": [{"action": "deny", "regex": "^65001:66"}, {"action": "permit", "regex": "_65001:"}]}
        ),
        "standard",
    )
    assert exp.permits(((65001 << 16) | 5,)) and not exp.permits(((65001 << 16) | 66,))
    named = CompiledCommunityList(
        CommunityList.model_validate({"entries": [{"action": "permit", "communities": ["no-export"]}]}), "standard"
    )
    assert named.permits((0xFFFFFF01,)) and not named.permits((0xFFFFFF02,))
    large = CompiledCommunityList(
        CommunityList.model_validate({"entries": [{"action": "permit", "communities": ["65001:1:2"]}]}), "large"
    )
    assert large.permits(((65001, 1, 2),)) and not large.permits(((65001, 1, 3),))
    rt = parse_ext_community("rt 65001:100")
    assert ext_community_text(rt) == "rt 65001:100"
    assert ext_community_text(parse_ext_community("soo 192.0.2.1:7")) == "soo 192.0.2.1:7"
    assert ext_community_text(parse_ext_community("rt 4200000000:1")) == "rt 4200000000:1"
    ext = CompiledCommunityList(
        CommunityList.model_validate({"entries": [{"action": "permit", "communities": ["rt 65001:100"]}]}),
        "extended",
    )
    assert ext.permits((rt,)) and not ext.permits((parse_ext_community("soo 65001:100"),))


POLICY = {
    "prefix_lists": {
        "FIRST50": {"entries": [{"action": "permit", "prefix": "10.0.0.0/10", "le": 16}]},  # 10.0-63
        "ANY": {"entries": [{"action": "permit", "prefix": "0.0.0.0/0", "le": 32}]},
    },
    "as_path_lists": {"FROM_A": {"entries": [{"action": "permit", "regex": "^65001$"}]}},
    "community_lists": {"SEVEN": {"entries": [{"action": "permit", "communities": ["65001:7"]}]}},
    "route_maps": {
        "IN": {
            "entries": [
                {"seq": 10, "action": "deny", "match": {"prefix_list": "FIRST50"}},
                {
                    "seq": 20,
                    "action": "permit",
                    "match": {"as_path": "FROM_A", "community": "SEVEN", "origin": "igp", "med": 5},
                    "set": {
                        "local_preference": 300,
                        "med": 0,
                        "community": ["65002:1"],
                        "community_additive": True,
                        "community_delete": "SEVEN",
                        "large_community": ["65002:3:4"],
                        "as_path_prepend": [65099],
                    },
                },
                {"seq": 30, "action": "permit"},  # the IPv6 routes (no community, no MED)
            ]
        },
        "OUT": {
            "entries": [
                {
                    "action": "permit",
                    "match": {"prefix_list": "FIRST50"},
                    "set": {"med": 77, "as_path_prepend": [65001, 65001], "next_hop": "198.51.100.99"},
                }
            ]
        },
        "ALL": {"entries": [{"action": "permit"}]},
    },
}


def test_an_import_route_map_filters_and_rewrites_what_the_loc_rib_gets() -> None:
    b_cfg = B.model_copy(update={"policy": Policy.model_validate(POLICY), "import_policy": "IN"})
    _, b, _, _ = pair(A, BgpSessionConfig.model_validate(b_cfg.model_dump()))
    v4 = b.loc_rib_table((1, 1))
    # 10.0-63.0.0/16 refused; 10.64-199 accepted and rewritten; IPv6 accepted unchanged
    assert len(v4) == 136 and len(b.loc_rib_table((2, 1))) == 2
    assert b.counters["policy_refused_in"] == 64
    best = b.loc_rib[(1, 1)].best_path(next(k for k in b.loc_rib[(1, 1)].best))
    assert best is not None
    attrs, _ = best
    assert attrs.local_pref == 300 and attrs.med == 0
    assert attrs.get(C.ATTR_COMMUNITIES) == ((65002 << 16) | 1,)  # 65001:7 deleted, 65002:1 added
    assert attrs.get(C.ATTR_LARGE_COMMUNITIES) == ((65002, 3, 4),)
    assert attrs.as_path == ((C.AS_SEQUENCE, (65099, 65001)),)
    # the rewritten routes survive a snapshot (the policy is in the configuration)
    r = BgpSession.restore(b.snapshot())
    assert r.loc_rib_table((1, 1)) == v4


def test_an_export_route_map_filters_and_rewrites_what_is_announced() -> None:
    a_cfg = A.model_copy(update={"policy": Policy.model_validate(POLICY), "export_policy": {"ipv4-unicast": "OUT"}})
    a, b, _, _ = pair(BgpSessionConfig.model_validate(a_cfg.model_dump()), B)
    v4 = b.loc_rib_table((1, 1))
    assert len(v4) == 64 and {row[1] for row in v4} == {"198.51.100.99"}
    assert len(b.loc_rib_table((2, 1))) == 2  # no export policy for IPv6
    best = b.loc_rib[(1, 1)].best_path(next(k for k in b.loc_rib[(1, 1)].best))
    assert best is not None
    attrs, _ = best
    # our AS first, then the prepends (FRR adds its own AS after its outbound route map)
    assert attrs.med == 77 and attrs.as_path == ((C.AS_SEQUENCE, (65001, 65001, 65001)),)
    assert a.counters["policy_refused_out"] == 136


def test_rfc_8212_an_ebgp_session_without_policy_takes_and_sends_nothing() -> None:
    strict_b = B.model_copy(update={"ebgp_requires_policy": True})
    a, b, _, _ = pair(A, strict_b)
    assert a.state is b.state is State.ESTABLISHED
    # refused before the decision process (the Adj-RIB-In keeps what the policy accepted)
    assert b.prefix_count() == 0 and b.loc_rib_table((1, 1)) == []
    assert b.counters["policy_refused_in"] == 202
    strict_a = A.model_copy(update={"ebgp_requires_policy": True})
    a, b, _, _ = pair(strict_a, B)
    assert b.prefix_count() == 0 and a.counters["policy_refused_out"] == 202
    # a policy in that direction lets routes through
    ok = strict_b.model_copy(update={"policy": Policy.model_validate(POLICY), "import_policy": "ALL"})
    _, b, _, _ = pair(A, BgpSessionConfig.model_validate(ok.model_dump()))
    assert len(b.loc_rib_table((1, 1))) == 200


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"import_policy": "NOPE"}, "import_policy: no route map 'NOPE'"),
        (
            {"export_policy": {"ipv6-unicast": "ALL"}, "families": ["ipv4-unicast"], "policy": POLICY},
            "export_policy: family ipv6-unicast is not in 'families'",
        ),
        (
            {"policy": {"route_maps": {"X": {"entries": [{"action": "permit", "match": {"prefix_list": "P"}}]}}}},
            "route_maps.X.entries[0]: no prefix_lists entry named 'P'",
        ),
        (
            {"policy": {"prefix_lists": {"P": {"entries": [{"action": "permit", "prefix": "10.0.0.0/8", "le": 4}]}}}},
            "needs 8 <= ge <= le <= 32",
        ),
        (
            {"policy": {"prefix_lists": {"P": {"entries": [{"action": "permit", "prefix": "10.0.0.1/8"}]}}}},
            "has host bits set",
        ),
        ({"policy": {"as_path_lists": {"L": {"entries": [{"action": "permit", "regex": "(["}]}}}}, "not a regular"),
        (
            {"policy": {"community_lists": {"C": {"entries": [{"action": "permit", "communities": ["1:2:3"]}]}}}},
            "is not a community",
        ),
        (
            {"policy": {"route_maps": {"X": {"entries": [{"action": "deny", "set": {"med": 1}}]}}}},
            "would never apply",
        ),
        (
            {"policy": {"route_maps": {"X": {"entries": [{"action": "permit", "set": {"next_hop": "me"}}]}}}},
            "'self' or 'peer-address'",
        ),
        ({"policy": {"route_maps": {"X": {"entries": [{"action": "permit", "set": {"weight": 5}}]}}}}, "weight"),
    ],
)
def test_policy_configuration_errors_name_their_place(change: dict[str, Any], message: str) -> None:
    data = {**B.model_dump(), **change}
    with pytest.raises(ValidationError) as ei:
        BgpSessionConfig.model_validate(data)
    assert message in str(ei.value), str(ei.value)


def test_the_documented_agent_policy_parses_and_compiles() -> None:
    import tomllib
    from pathlib import Path

    from apsv.agent.config import parse_config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "bgp.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    fields = ["session = 1", 'listen = "127.0.0.10:1790"', 'peer = "127.0.0.3"', "local_as = 65010"]
    session = "\n".join([*fields, "peer_as = 65001", 'router_id = "10.0.0.10"'])
    text = "[[vrouters]]\nid = 1\n" + block.replace("# ... the session ...", session)
    cfg = parse_config(tomllib.loads(text))
    assert cfg.warnings() == []
    ((_key, _proto, stack_cfg, _v, _p),) = cfg.sessions()
    s = BgpSession(BgpSessionConfig.model_validate(stack_cfg))
    assert set(s.route_maps) == {("import", (1, 1)), ("export", (1, 1))}


def talk(x: BgpSession, y: BgpSession, out: list[Any], now: float = 5.0) -> None:
    """Deliver x's output to y and back until both are quiet."""
    from tests.test_session import wire

    for _ in range(10):
        back = y.data_received(wire(out), now) if wire(out) else []
        out = x.data_received(wire(back), now) if wire(back) else []
        if not out and not back:
            break


def test_a_policy_change_is_applied_without_a_reset() -> None:
    from apsv.bgp.events import PolicyChanged

    accept = B.model_copy(update={"policy": Policy.model_validate(POLICY), "import_policy": "ALL"})
    a, b, _, _ = pair(A, BgpSessionConfig.model_validate(accept.model_dump()))
    assert len(b.loc_rib_table((1, 1))) == 200 and b.counters["established"] == 1
    # import: B asks A for its routes again (ROUTE-REFRESH) and applies the new route map to them
    ev = b.control({"op": "policy", "import_policy": "IN"}, 5.0)
    (pc,) = [e for e in ev if isinstance(e, PolicyChanged)]
    assert pc.refreshed == ["ipv4-unicast", "ipv6-unicast"] and pc.needs_reset == []
    talk(b, a, ev)
    assert len(b.loc_rib_table((1, 1))) == 136 and b.counters["route_refresh_sent"] == 2
    talk(b, a, b.control({"op": "policy", "import_policy": "ALL"}, 5.5))  # and back
    assert len(b.loc_rib_table((1, 1))) == 200
    # export: A re-applies at once; B gets the withdrawals and the rewritten routes
    ev = a.control({"op": "policy", "policy": POLICY, "export_policy": {"ipv4-unicast": "OUT"}}, 6.0)
    (pc,) = [e for e in ev if isinstance(e, PolicyChanged)]
    assert (pc.announced, pc.withdrawn) == (64, 136)
    talk(a, b, ev)
    v4 = b.loc_rib_table((1, 1))
    assert {r[1] for r in v4} == {"198.51.100.99"} and len(v4) == 64
    assert a.state is b.state is State.ESTABLISHED and b.counters["established"] == 1  # never reset
    # the changed configuration moves with the session
    assert BgpSession.restore(a.snapshot()).config.export_policy == {"ipv4-unicast": "OUT"}
    # a bad policy is refused with its field named, and changes nothing
    with pytest.raises(ValueError, match="no route map 'NOPE'") as ei:
        a.control({"op": "policy", "import_policy": "NOPE"}, 7.0)
    assert "\n" not in str(ei.value)  # one line, for the refused event
    assert a.config.import_policy is None


def test_soft_reconfiguration_applies_a_new_import_policy_to_what_the_peer_sent() -> None:
    """A peer without route refresh: the routes it sent are kept before policy, and a new import
    policy applies to them at once; configured, the same without asking a refreshing peer."""
    from apsv.bgp.events import PolicyChanged, RoutesChanged

    for a_cfg, b_cfg in (
        (A.model_copy(update={"route_refresh": False}), B),
        (A, B.model_copy(update={"soft_reconfiguration_inbound": True})),
    ):
        _, b, _, _ = pair(a_cfg, b_cfg)
        assert b.received is not None and len(b.received) == 202
        ev = b.control({"op": "policy", "policy": POLICY, "import_policy": "IN"}, 5.0)
        (pc,) = [e for e in ev if isinstance(e, PolicyChanged)]
        assert pc.refreshed == ["ipv4-unicast", "ipv6-unicast"] and pc.needs_reset == []
        assert b.counters["route_refresh_sent"] == 0 and len(b.loc_rib_table((1, 1))) == 136
        gone = sum(1 for e in ev if isinstance(e, RoutesChanged) for c in e.changes if c.attributes is None)
        assert gone == 64 and len(b.received) == 202  # the refused ones are still kept
        # and back: the refused routes return from the kept table, no message exchanged
        b.control({"op": "policy", "import_policy": "ALL"}, 6.0)
        assert len(b.loc_rib_table((1, 1))) == 200
        r = BgpSession.restore(b.snapshot())
        assert r.received is not None and len(r.received) == 202
    # a refreshing peer without the setting: nothing kept
    _, b, _, _ = pair(A, B)
    assert b.received is None
    # what is kept is bounded like the Adj-RIB-In, refused routes included (RFC 8212 refuses all)
    bounded = B.model_copy(
        update={"soft_reconfiguration_inbound": True, "ebgp_requires_policy": True, "max_prefixes": 100}
    )
    _, b, _, _ = pair(A, bounded)
    assert b.state is State.IDLE and b.prefix_count() == 0 and b.counters["prefix_limit_ceased"] == 1

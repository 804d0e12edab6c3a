"""BGP-4 protocol numbers (RFC 4271 and the extensions APSV speaks).

Plain integer constants, not enums, because the codec compares them in its hot loops.
"""

from __future__ import annotations

from typing import Final

MARKER: Final = b"\xff" * 16
HEADER_LEN: Final = 19
MAX_MESSAGE_LEN: Final = 4096  # RFC 4271 §4.1
MAX_EXTENDED_MESSAGE_LEN: Final = 65535  # RFC 8654
BGP_VERSION: Final = 4
AS_TRANS: Final = 23456  # RFC 6793

# Message types (RFC 4271 §4.1, RFC 2918)
MSG_OPEN: Final = 1
MSG_UPDATE: Final = 2
MSG_NOTIFICATION: Final = 3
MSG_KEEPALIVE: Final = 4
MSG_ROUTE_REFRESH: Final = 5
MESSAGE_NAMES: Final = {1: "OPEN", 2: "UPDATE", 3: "NOTIFICATION", 4: "KEEPALIVE", 5: "ROUTE-REFRESH"}

# Address families (IANA)
AFI_IPV4: Final = 1
AFI_IPV6: Final = 2
SAFI_UNICAST: Final = 1
SAFI_MULTICAST: Final = 2
IPV4_UNICAST: Final = (AFI_IPV4, SAFI_UNICAST)
IPV6_UNICAST: Final = (AFI_IPV6, SAFI_UNICAST)
# Address-family names used in configuration and APIs.
FAMILY_CODES: Final[dict[str, tuple[int, int]]] = {"ipv4-unicast": IPV4_UNICAST, "ipv6-unicast": IPV6_UNICAST}
AFI_NAMES: Final = {1: "ipv4", 2: "ipv6", 25: "l2vpn", 16388: "bgp-ls"}
SAFI_NAMES: Final = {
    1: "unicast",
    2: "multicast",
    4: "labeled-unicast",
    5: "mvpn",
    70: "evpn",
    71: "bgp-ls",
    72: "bgp-ls-vpn",
    73: "sr-policy",
    128: "vpn",
    132: "rtc",
    133: "flow",
    134: "flow-vpn",
}


def family_name(family: tuple[int, int]) -> str:
    """A family's name, ipv4-unicast for (1, 1); numbers where a code has no name."""
    afi, safi = family
    return f"{AFI_NAMES.get(afi, str(afi))}-{SAFI_NAMES.get(safi, str(safi))}"


ADDRESS_BITS: Final = {AFI_IPV4: 32, AFI_IPV6: 128}

# Path attribute flags (RFC 4271 §4.3)
FLAG_OPTIONAL: Final = 0x80
FLAG_TRANSITIVE: Final = 0x40
FLAG_PARTIAL: Final = 0x20
FLAG_EXTENDED_LENGTH: Final = 0x10

# Path attribute type codes
ATTR_ORIGIN: Final = 1
ATTR_AS_PATH: Final = 2
ATTR_NEXT_HOP: Final = 3
ATTR_MED: Final = 4
ATTR_LOCAL_PREF: Final = 5
ATTR_ATOMIC_AGGREGATE: Final = 6
ATTR_AGGREGATOR: Final = 7
ATTR_COMMUNITIES: Final = 8  # RFC 1997
ATTR_ORIGINATOR_ID: Final = 9  # RFC 4456
ATTR_CLUSTER_LIST: Final = 10  # RFC 4456
ATTR_MP_REACH_NLRI: Final = 14  # RFC 4760
ATTR_MP_UNREACH_NLRI: Final = 15  # RFC 4760
ATTR_EXTENDED_COMMUNITIES: Final = 16  # RFC 4360
ATTR_AS4_PATH: Final = 17  # RFC 6793
ATTR_AS4_AGGREGATOR: Final = 18  # RFC 6793
ATTR_LARGE_COMMUNITIES: Final = 32  # RFC 8092

ATTR_NAMES: Final = {
    1: "ORIGIN",
    2: "AS_PATH",
    3: "NEXT_HOP",
    4: "MULTI_EXIT_DISC",
    5: "LOCAL_PREF",
    6: "ATOMIC_AGGREGATE",
    7: "AGGREGATOR",
    8: "COMMUNITIES",
    9: "ORIGINATOR_ID",
    10: "CLUSTER_LIST",
    14: "MP_REACH_NLRI",
    15: "MP_UNREACH_NLRI",
    16: "EXTENDED_COMMUNITIES",
    17: "AS4_PATH",
    18: "AS4_AGGREGATOR",
    32: "LARGE_COMMUNITIES",
}

# The well-known attributes this speaker recognises (RFC 4271 §5): an unknown type code
# with the Optional bit clear is an "Unrecognized Well-known Attribute" (3/2).
WELL_KNOWN: Final = frozenset({1, 2, 3, 5, 6})
# The flag bits (Optional, Transitive) each recognised attribute must carry.
EXPECTED_FLAGS: Final = {
    ATTR_ORIGIN: FLAG_TRANSITIVE,
    ATTR_AS_PATH: FLAG_TRANSITIVE,
    ATTR_NEXT_HOP: FLAG_TRANSITIVE,
    ATTR_MED: FLAG_OPTIONAL,
    ATTR_LOCAL_PREF: FLAG_TRANSITIVE,
    ATTR_ATOMIC_AGGREGATE: FLAG_TRANSITIVE,
    ATTR_AGGREGATOR: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_COMMUNITIES: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_ORIGINATOR_ID: FLAG_OPTIONAL,
    ATTR_CLUSTER_LIST: FLAG_OPTIONAL,
    ATTR_MP_REACH_NLRI: FLAG_OPTIONAL,
    ATTR_MP_UNREACH_NLRI: FLAG_OPTIONAL,
    ATTR_EXTENDED_COMMUNITIES: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_AS4_PATH: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_AS4_AGGREGATOR: FLAG_OPTIONAL | FLAG_TRANSITIVE,
    ATTR_LARGE_COMMUNITIES: FLAG_OPTIONAL | FLAG_TRANSITIVE,
}

# ORIGIN values
ORIGIN_IGP: Final = 0
ORIGIN_EGP: Final = 1
ORIGIN_INCOMPLETE: Final = 2
ORIGIN_NAMES: Final = {0: "igp", 1: "egp", 2: "incomplete"}

# AS_PATH segment types (RFC 4271, RFC 5065)
AS_SET: Final = 1
AS_SEQUENCE: Final = 2
AS_CONFED_SEQUENCE: Final = 3
AS_CONFED_SET: Final = 4
SEGMENT_NAMES: Final = {1: "as-set", 2: "as-sequence", 3: "confed-sequence", 4: "confed-set"}

# OPEN optional parameters and capabilities (RFC 5492 and the capability RFCs)
OPT_PARAM_CAPABILITIES: Final = 2
OPT_PARAM_EXTENDED_LENGTH: Final = 255  # RFC 9072
CAP_MULTIPROTOCOL: Final = 1
CAP_ROUTE_REFRESH: Final = 2
CAP_EXTENDED_NEXT_HOP: Final = 5
CAP_EXTENDED_MESSAGE: Final = 6
CAP_ROLE: Final = 9
CAP_GRACEFUL_RESTART: Final = 64
CAP_FOUR_OCTET_AS: Final = 65
CAP_ADD_PATH: Final = 69
CAP_ENHANCED_ROUTE_REFRESH: Final = 70
CAP_LONG_LIVED_GR: Final = 71  # RFC 9494
CAP_FQDN: Final = 73
CAP_SOFTWARE_VERSION: Final = 75
CAP_ROUTE_REFRESH_OLD: Final = 128  # pre-standard Cisco code, still sent by some speakers

# RFC 9494 well-known communities: a route kept long-lived stale, and one never to be
COMMUNITY_LLGR_STALE: Final = 0xFFFF0006
COMMUNITY_NO_LLGR: Final = 0xFFFF0007

# ADD-PATH send/receive (RFC 7911 §4)
ADD_PATH_RECEIVE: Final = 1
ADD_PATH_SEND: Final = 2
ADD_PATH_BOTH: Final = 3

# NOTIFICATION error codes and subcodes (RFC 4271 §4.5, §6 and later RFCs)
ERR_HEADER: Final = 1
ERR_HEADER_NOT_SYNCHRONIZED: Final = 1
ERR_HEADER_BAD_LENGTH: Final = 2
ERR_HEADER_BAD_TYPE: Final = 3

ERR_OPEN: Final = 2
ERR_OPEN_UNSUPPORTED_VERSION: Final = 1
ERR_OPEN_BAD_PEER_AS: Final = 2
ERR_OPEN_BAD_BGP_ID: Final = 3
ERR_OPEN_UNSUPPORTED_OPT_PARAM: Final = 4
ERR_OPEN_UNACCEPTABLE_HOLD_TIME: Final = 6
ERR_OPEN_UNSUPPORTED_CAPABILITY: Final = 7  # RFC 5492
ERR_OPEN_ROLE_MISMATCH: Final = 11  # RFC 9234

ERR_UPDATE: Final = 3
ERR_UPDATE_MALFORMED_ATTR_LIST: Final = 1
ERR_UPDATE_UNRECOGNIZED_WELL_KNOWN: Final = 2
ERR_UPDATE_MISSING_WELL_KNOWN: Final = 3
ERR_UPDATE_ATTR_FLAGS: Final = 4
ERR_UPDATE_ATTR_LENGTH: Final = 5
ERR_UPDATE_INVALID_ORIGIN: Final = 6
ERR_UPDATE_INVALID_NEXT_HOP: Final = 8
ERR_UPDATE_OPTIONAL_ATTR: Final = 9
ERR_UPDATE_INVALID_NETWORK_FIELD: Final = 10
ERR_UPDATE_MALFORMED_AS_PATH: Final = 11

ERR_HOLD_TIMER_EXPIRED: Final = 4

ERR_FSM: Final = 5
ERR_FSM_UNSPECIFIED: Final = 0
ERR_FSM_OPENSENT: Final = 1  # RFC 6608
ERR_FSM_OPENCONFIRM: Final = 2
ERR_FSM_ESTABLISHED: Final = 3

ERR_CEASE: Final = 6
CEASE_MAX_PREFIXES: Final = 1  # RFC 4486
CEASE_ADMIN_SHUTDOWN: Final = 2
CEASE_PEER_DECONFIGURED: Final = 3
CEASE_ADMIN_RESET: Final = 4
CEASE_CONNECTION_REJECTED: Final = 5
CEASE_OTHER_CONFIG_CHANGE: Final = 6
CEASE_COLLISION_RESOLUTION: Final = 7
CEASE_OUT_OF_RESOURCES: Final = 8
CEASE_HARD_RESET: Final = 9  # RFC 8538
CEASE_BFD_DOWN: Final = 10  # RFC 9384

ERR_ROUTE_REFRESH: Final = 7  # RFC 7313
ERR_ROUTE_REFRESH_INVALID_LENGTH: Final = 1

ERROR_NAMES: Final = {
    1: "Message Header Error",
    2: "OPEN Message Error",
    3: "UPDATE Message Error",
    4: "Hold Timer Expired",
    5: "Finite State Machine Error",
    6: "Cease",
    7: "ROUTE-REFRESH Message Error",
}
SUBCODE_NAMES: Final = {
    (1, 1): "Connection Not Synchronized",
    (1, 2): "Bad Message Length",
    (1, 3): "Bad Message Type",
    (2, 1): "Unsupported Version Number",
    (2, 2): "Bad Peer AS",
    (2, 3): "Bad BGP Identifier",
    (2, 4): "Unsupported Optional Parameter",
    (2, 6): "Unacceptable Hold Time",
    (2, 7): "Unsupported Capability",
    (2, 11): "Role Mismatch",
    (3, 1): "Malformed Attribute List",
    (3, 2): "Unrecognized Well-known Attribute",
    (3, 3): "Missing Well-known Attribute",
    (3, 4): "Attribute Flags Error",
    (3, 5): "Attribute Length Error",
    (3, 6): "Invalid ORIGIN Attribute",
    (3, 8): "Invalid NEXT_HOP Attribute",
    (3, 9): "Optional Attribute Error",
    (3, 10): "Invalid Network Field",
    (3, 11): "Malformed AS_PATH",
    (5, 0): "Unspecified Error",
    (5, 1): "Receive Unexpected Message in OpenSent State",
    (5, 2): "Receive Unexpected Message in OpenConfirm State",
    (5, 3): "Receive Unexpected Message in Established State",
    (6, 1): "Maximum Number of Prefixes Reached",
    (6, 2): "Administrative Shutdown",
    (6, 3): "Peer De-configured",
    (6, 4): "Administrative Reset",
    (6, 5): "Connection Rejected",
    (6, 6): "Other Configuration Change",
    (6, 7): "Connection Collision Resolution",
    (6, 8): "Out of Resources",
    (6, 9): "Hard Reset",
    (6, 10): "BFD Down",
    (7, 1): "Invalid Message Length",
}


def error_name(code: int, subcode: int) -> str:
    """Human name of a NOTIFICATION code/subcode pair, e.g. 'UPDATE Message Error / Malformed AS_PATH'."""
    major = ERROR_NAMES.get(code, f"Unknown Error {code}")
    if code == ERR_HOLD_TIMER_EXPIRED or (code not in (1, 2, 3, 5, 6, 7) and subcode == 0):
        return major
    return f"{major} / {SUBCODE_NAMES.get((code, subcode), f'subcode {subcode}')}"

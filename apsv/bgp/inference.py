"""Decoding BGP seen from outside a session: MRT dumps and packet captures.

A speaker in a session knows what it negotiated; a recording does not always say. Whether AS
numbers are 4 octets wide and whether NLRI carry ADD-PATH identifiers changes how an UPDATE
parses. `ContextInference` works it out per session from what was recorded: first from
explicit facts (an MRT subtype), then from the OPEN messages seen, and last from the bytes -
decoding the way the facts point and falling back to the other reading only when the first
does not parse (or, for ADD-PATH, yields the runs of duplicate /0 prefixes that path
identifiers read as prefixes produce).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from apsv.bgp import constants as C
from apsv.bgp.capabilities import AddPath, parse_capability
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import BgpError
from apsv.bgp.message import Message, Open, Update, decode_message, decode_update

Family = tuple[int, int]
_IBGP_ONLY = frozenset({C.ATTR_LOCAL_PREF, C.ATTR_ORIGINATOR_ID, C.ATTR_CLUSTER_LIST})
ALL_UNICAST: frozenset[Family] = frozenset({(1, 1), (1, 2), (2, 1), (2, 2)})


@dataclass
class _Seen:
    opens: dict[Hashable, Open] = field(default_factory=dict)  # by sender


@dataclass
class ContextInference:
    inferred_add_path: int = 0  # messages that parsed only with path identifiers
    inferred_asn2: int = 0  # messages that parsed only with 2-octet AS numbers
    _sessions: dict[Hashable, _Seen] = field(default_factory=dict)
    _contexts: dict[tuple[bool, bool, frozenset[Family]], CodecContext] = field(default_factory=dict)

    def context(self, asn4: bool, ibgp: bool, add_path: frozenset[Family]) -> CodecContext:
        key = (asn4, ibgp, add_path)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = CodecContext(asn4=asn4, ibgp=ibgp, add_path=add_path, extended_message=True)
        return ctx

    def decode(
        self,
        session: Hashable,
        sender: Hashable,
        msg_type: int,
        body: bytes,
        *,
        asn4: bool | None = None,
        add_path: bool | None = None,
        ibgp: bool | None = None,
    ) -> Message:
        """Decode one recorded message of `session` sent by `sender`.

        `asn4` / `add_path` / `ibgp` are facts when the recording states them, None when
        unknown. Raises BgpError only when the message is malformed under every plausible context.
        """
        seen = self._sessions.get(session)
        if seen is None:
            seen = self._sessions[session] = _Seen()
        if ibgp is None:
            ibgp = self._ibgp_from_opens(seen)
            if ibgp is None:
                msg = self.decode(session, sender, msg_type, body, asn4=asn4, add_path=add_path, ibgp=False)
                if isinstance(msg, Update) and any(p.type_code in _IBGP_ONLY and p.subcode == 0 for p in msg.problems):
                    # iBGP-only attributes were discarded: the session is internal after all.
                    return self.decode(session, sender, msg_type, body, asn4=asn4, add_path=add_path, ibgp=True)
                return msg
        if msg_type != C.MSG_UPDATE:
            msg = decode_message(msg_type, body, self.context(asn4 is not False, ibgp, frozenset()))
            if isinstance(msg, Open):
                seen.opens[sender] = msg
            return msg
        a4 = asn4 if asn4 is not None else self._asn4_from_opens(seen)
        if add_path:
            return decode_message(msg_type, body, self.context(a4 is not False, ibgp, ALL_UNICAST))
        hint = frozenset() if add_path is False else self._add_path_from_opens(seen, sender)
        if a4 is not None and not hint:
            # The common case (an MRT subtype gave the AS width, no ADD-PATH announced): decode
            # directly, and fall back to the search below only if that fails.
            try:
                return decode_update(body, self.context(a4, ibgp, frozenset()))
            except BgpError:
                pass
        widths = [a4] if a4 is not None else [True, False]
        results: list[Message | BgpError] = []
        for width in widths:
            r = self._decode_width(msg_type, body, width, ibgp, add_path, hint)
            if not isinstance(r, BgpError) and not (len(widths) > 1 and _as_path_malformed(r)):
                if width is False and len(widths) > 1:
                    self.inferred_asn2 += 1
                return r
            results.append(r)
        for r in results:  # nothing read cleanly: the first reading that decoded at all
            if not isinstance(r, BgpError):
                return r
        err = results[0]
        assert isinstance(err, BgpError)
        raise err

    def _decode_width(
        self,
        msg_type: int,
        body: bytes,
        asn4: bool,
        ibgp: bool,
        add_path: bool | None,
        hint: frozenset[Family],
    ) -> Message | BgpError:
        try:
            msg = decode_message(msg_type, body, self.context(asn4, ibgp, frozenset()))
        except BgpError as e:
            if add_path is None:  # unknown: the NLRI may carry path identifiers
                try:
                    alt = decode_message(msg_type, body, self.context(asn4, ibgp, hint or ALL_UNICAST))
                except BgpError as e2:
                    # If the plain reading could not even split the NLRI, the path-id reading got
                    # further, and its error is the one that describes the message.
                    return e2 if e.subcode == C.ERR_UPDATE_INVALID_NETWORK_FIELD else e
                self.inferred_add_path += 1
                return alt
            return e
        if hint and isinstance(msg, Update) and _looks_like_path_ids(msg):
            other = self._try(msg_type, body, self.context(asn4, ibgp, hint))
            if isinstance(other, Update) and not _looks_like_path_ids(other):
                self.inferred_add_path += 1
                return other
        return msg

    @staticmethod
    def _try(msg_type: int, body: bytes, ctx: CodecContext) -> Message | None:
        try:
            return decode_message(msg_type, body, ctx)
        except BgpError:
            return None

    @staticmethod
    def _ibgp_from_opens(seen: _Seen) -> bool | None:
        if len(seen.opens) < 2:
            return None
        asns = {o.real_asn for o in seen.opens.values()}
        return len(asns) == 1

    @staticmethod
    def _asn4_from_opens(seen: _Seen) -> bool | None:
        if not seen.opens:
            return None
        has = [any(c.code == C.CAP_FOUR_OCTET_AS for c in o.capabilities) for o in seen.opens.values()]
        if not all(has):
            return False  # one side is an OLD speaker (RFC 6793)
        return True if len(has) >= 2 else None

    @staticmethod
    def _add_path_from_opens(seen: _Seen, sender: Hashable) -> frozenset[Family]:
        o = seen.opens.get(sender)
        if o is None:
            return frozenset()
        fams: set[Family] = set()
        for cap in o.capabilities:
            if cap.code != C.CAP_ADD_PATH:
                continue
            try:
                parsed = parse_capability(cap.code, cap.value)
            except BgpError:
                continue
            if isinstance(parsed, AddPath):
                fams.update((a, s) for a, s, sr in parsed.families if sr & C.ADD_PATH_SEND)
        return frozenset(fams)


def _dup(items: list[bytes] | None) -> bool:
    return items is not None and len(set(items)) != len(items)


def _looks_like_path_ids(u: Update) -> bool:
    return (
        _dup(u.nlri)
        or _dup(u.withdrawn)
        or (u.mp_reach is not None and _dup(u.mp_reach.nlri))
        or (u.mp_unreach is not None and _dup(u.mp_unreach.withdrawn))
    )


def _as_path_malformed(m: Message) -> bool:
    return isinstance(m, Update) and any(p.type_code in (C.ATTR_AS_PATH, C.ATTR_AGGREGATOR) for p in m.problems)

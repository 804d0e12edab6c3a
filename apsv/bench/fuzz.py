"""Coverage-guided fuzzing of every decoder that takes bytes from outside (atheris, libFuzzer).

    python benchmarks/fuzz.py [--runs 1000000] [--targets bgp_message,...] [--out F] [--regressions D]

Each target is a property over arbitrary bytes: the input is decoded, or refused with the typed
error its RFC or format asks for (RFC 4271 / 7606 `BgpError` with its action, `DecodeError`,
`ConfigError`) - never another exception, never a hang (libFuzzer's per-input timeout). The
benchmark runs each target in a process of its own under atheris with a seed corpus from
../shared/data/fuzz, the BGP test vectors and valid inputs built here, and reports executions,
executions per second, coverage (libFuzzer's `cov` edges and `ft` features) and crashes; each
crash input is copied to the regressions directory, which tests/test_fuzz_regressions.py
replays in CI against the compiled build with every seed.

atheris instruments Python bytecode, not mypyc's C extensions: the targets run on a copy of the
`apsv` package without its compiled modules, so the same source runs interpreted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apsv.bench import shared_data

RUNS = 1_000_000
TIMEOUT_S = 10  # per input: far above any linear-time decode of max_len octets
# octets per input: a few MRT records, a whole snapshot of a small table, a batch of frames
MAX_LEN = {"mrt_reader": 4096, "snapshot_restore": 65536, "offload_frame": 16384}
DEFAULT_MAX_LEN = 8192

Check = Callable[[bytes], None]


# ---------------------------------------------------------------------------------------------
# The targets: bytes in; a typed refusal is fine, anything else escapes (a crash)


def _bgp_message() -> Check:
    from apsv.bgp.context import CodecContext
    from apsv.bgp.errors import Action, BgpError
    from apsv.bgp.message import Update, decode_bytes

    contexts = [
        CodecContext(asn4=True),
        CodecContext(asn4=False),
        CodecContext(asn4=True, ibgp=True, add_path=frozenset({(1, 1), (2, 1)}), extended_message=True),
    ]

    def check(data: bytes) -> None:
        for ctx in contexts:
            try:
                m = decode_bytes(data, ctx)
            except BgpError as e:
                if e.action is not Action.SESSION_RESET or not (1 <= e.code <= 7):
                    raise AssertionError(f"BgpError without a session reset: {e!r}") from None
                continue
            if isinstance(m, Update) and m.action not in (
                Action.NONE,
                Action.ATTRIBUTE_DISCARD,
                Action.TREAT_AS_WITHDRAW,
            ):
                raise AssertionError(f"UPDATE decoded with action {m.action}")

    return check


def _bgp_session() -> Check:
    from apsv.bgp.config import BgpSessionConfig
    from apsv.bgp.events import NotificationSent, PeerNotification
    from apsv.bgp.fsm import State
    from apsv.bgp.session import BgpSession

    cfg = BgpSessionConfig(local_as=65000, router_id="192.0.2.1", peer_as=65001, hold_time=0)

    def check(data: bytes) -> None:
        s = BgpSession.established(cfg, asn4=True)
        events = s.data_received(data, 1.0)
        if s.state is State.IDLE and not any(isinstance(e, (NotificationSent, PeerNotification)) for e in events):
            raise AssertionError("session reset without a NOTIFICATION")

    return check


def _bfd_packet() -> Check:
    from apsv.bfd.packet import BfdDecodeError, decode, make_key, verify

    keys = [make_key(kind, 1, b"secret-key") for kind in ("simple", "keyed-md5", "meticulous-keyed-sha1")]

    def check(data: bytes) -> None:
        try:
            p = decode(data)
        except BfdDecodeError:
            return
        for key in (None, *keys):
            verify(data, p, key)  # a reason string: never an exception

    return check


def _offload_frame() -> Check:
    from apsv.errors import DecodeError
    from apsv.frame import decode_batch, frame_offsets
    from apsv.runtime.host import SessionHost

    host = SessionHost("echo")
    for sid in range(1, 5):
        host.open((1, 1, 255, sid), {}, 0.0)

    def check(data: bytes) -> None:
        try:
            decode_batch(data)
            frame_offsets(data)
        except DecodeError:
            pass
        host.process(data, None, 1.0)  # whatever it is sent, an instance never raises
        host.collect()

    return check


def _mrt_reader() -> Check:
    from apsv.errors import DecodeError
    from apsv.mrt.reader import MrtReader

    def check(data: bytes) -> None:
        for recover in (False, True):
            try:
                for _ in MrtReader(io.BytesIO(data), recover=recover):
                    pass
            except DecodeError:
                pass

    return check


def _snapshot_restore() -> Check:
    from apsv.bfd.session import BfdSession
    from apsv.bgp.session import BgpSession
    from apsv.errors import DecodeError

    def check(data: bytes) -> None:
        for cls in (BgpSession, BfdSession):
            with contextlib.suppress(DecodeError):
                cls.restore(data)

    return check


def _agent_config() -> Check:
    from apsv.agent.config import ConfigError, parse_toml

    def check(data: bytes) -> None:
        with contextlib.suppress(ConfigError):
            parse_toml(data.decode("utf-8", "replace"), "fuzz")

    return check


def _apsv_config() -> Check:
    from apsv.config import ConfigError, parse_config, yaml_sections

    def check(data: bytes) -> None:
        with contextlib.suppress(ConfigError):
            parse_config(yaml_sections(data.decode("utf-8", "replace"), "fuzz"), "fuzz", env={})

    return check


TARGETS: dict[str, Callable[[], Check]] = {
    "bgp_message": _bgp_message,
    "bgp_session": _bgp_session,
    "bfd_packet": _bfd_packet,
    "offload_frame": _offload_frame,
    "mrt_reader": _mrt_reader,
    "snapshot_restore": _snapshot_restore,
    "agent_config": _agent_config,
    "apsv_config": _apsv_config,
}


# ---------------------------------------------------------------------------------------------
# Seeds


def corpus_messages() -> list[tuple[str, bytes]]:
    """../shared/data/fuzz's malformed BGP inputs by name: GoBGP's bad-length corpus, and the
    TCP payloads of PcapPlusPlus's hex-dumped Ethernet frames."""
    root = shared_data() / "fuzz"
    out = [
        (f.name, f.read_bytes())
        for f in sorted((root / "gobgp-bad-len-corpus").iterdir())
        if f.name not in ("SOURCE.txt", "LICENSE.upstream")
    ]
    for f in sorted((root / "pcapplusplus-bgp-malformed").glob("*.dat")):
        frame = bytes.fromhex(re.sub(r"[^0-9A-Fa-f]", "", f.read_text()))
        tcp = 14 + (frame[14] & 0x0F) * 4
        out.append((f.name, frame[tcp + (frame[tcp + 12] >> 4) * 4 :]))
    return out


def _bgp_seeds() -> list[bytes]:
    from apsv.mrt.reader import MrtReader
    from apsv.mrt.records import BgpMessageRecord

    out = [raw for _, raw in corpus_messages()]
    for f in sorted((shared_data() / "bgp-test-vectors" / "exabgp-decoding").iterdir()):
        lines = f.read_text(errors="replace").splitlines()
        if f.name in ("SOURCE.txt", "LICENSE.upstream") or len(lines) < 2:
            continue
        raw = bytes.fromhex(re.sub(r"[^0-9A-Fa-f]", "", lines[1]))
        # ExaBGP's files sometimes hold only the UPDATE body: give it its header
        out.append(raw if raw[:16] == b"\xff" * 16 else b"\xff" * 16 + struct.pack("!HB", 19 + len(raw), 2) + raw)
    with MrtReader(shared_data() / "mrt/mrtparse-samples/quagga_bgp") as r:
        out += [i.raw_header + i.body for i in r if isinstance(i, BgpMessageRecord)][:200]
    return out


def _bfd_seeds() -> list[bytes]:
    from apsv.bfd.packet import Packet, State, encode, make_key

    out = []
    for state in State:
        your = 0 if state in (State.DOWN, State.ADMIN_DOWN) else 9
        p = Packet(
            state=state, my_disc=7, your_disc=your, desired_min_tx_us=300_000, required_min_rx_us=300_000, detect_mult=3
        )
        out.append(encode(p))
        for kind in ("simple", "keyed-md5", "meticulous-keyed-sha1"):
            out.append(encode(p, make_key(kind, 1, b"secret-key"), seq=5))
    return out


def _frame_seeds() -> list[bytes]:
    from apsv.frame import Frame, FrameKind, encode_batch

    frames = [Frame(FrameKind.DATA, 255, 1, 1, sid, seq, 1, 0, b"x" * seq) for sid in (1, 2) for seq in (1, 2, 3)]
    return [
        encode_batch(frames),
        encode_batch(frames[:1]),
        encode_batch([Frame(FrameKind.TIMER, 255, 1, 1, 3, 1, 1, 0, b"")]),
    ]


def _mrt_seeds() -> list[bytes]:
    import bz2
    import gzip

    out = []
    for rel in (
        "mrt/mrtparse-samples/quagga_bgp",
        "mrt/ryu-mrt/updates.20161101.0000.bz2",
        "mrt/bgpdump-testdata/updates.20070211.0141.gz",
    ):
        p = shared_data() / rel
        if not p.is_file():
            continue
        raw = p.read_bytes()
        raw = bz2.decompress(raw) if p.suffix == ".bz2" else gzip.decompress(raw) if p.suffix == ".gz" else raw
        out.append(raw[:4096])
    return out


def _snapshot_seeds() -> list[bytes]:
    from apsv.bfd.session import BfdSession, BfdSessionConfig
    from apsv.bgp.config import Announcement, BgpSessionConfig
    from apsv.bgp.session import BgpSession

    cfg = BgpSessionConfig(
        local_as=65000,
        router_id="192.0.2.1",
        peer_as=65001,
        hold_time=0,
        next_hop_self="198.51.100.1",
        announce=[Announcement(prefixes=["10.0.0.0/24", "10.0.1.0/24"], communities=["65000:1"])],
    )
    s = BgpSession.established(cfg, asn4=True)
    for msg in _bgp_seeds()[-20:]:
        s.data_received(msg, 1.0)
    bfd = BfdSession(BfdSessionConfig(local_address="127.0.0.1", peer_address="127.0.0.2", local_discriminator=7))
    return [s.snapshot(), BgpSession(cfg).snapshot(), bfd.snapshot()]


def _text_seeds(pattern: str) -> list[bytes]:
    root = Path(__file__).resolve().parents[2]
    return [p.read_bytes() for p in sorted(root.glob(pattern))]


def _agent_seeds() -> list[bytes]:
    """The complete example in the agent configuration's docstring, and a minimal one."""
    import apsv.agent.config as agent_config

    doc = agent_config.__doc__ or ""
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    minimal = 'tenant = 1\n[[vrouters]]\nid = 1\n[[vrouters.bgp]]\nsession = 1\nlisten = "127.0.0.1:1179"\n'
    return [b.encode() for b in blocks] + [minimal.encode()]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "bgp_message": _bgp_seeds,
    "bgp_session": _bgp_seeds,
    "bfd_packet": _bfd_seeds,
    "offload_frame": _frame_seeds,
    "mrt_reader": _mrt_seeds,
    "snapshot_restore": _snapshot_seeds,
    "agent_config": _agent_seeds,
    "apsv_config": lambda: _text_seeds("examples/*.yaml"),
}


# ---------------------------------------------------------------------------------------------
# Running one target under atheris (in its own process), and the whole benchmark


def fuzz_one(name: str) -> None:
    """The child process: instrument `apsv` (interpreted: the copy without compiled modules)
    and hand the target to libFuzzer with the arguments after the target's name."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    with atheris.instrument_imports(include=["apsv"]):
        check = TARGETS[name]()
    import apsv.bgp.message

    if not str(apsv.bgp.message.__file__).endswith(".py"):
        raise SystemExit(f"apsv.bgp.message is compiled ({apsv.bgp.message.__file__}): atheris would see nothing")
    atheris.Setup([sys.argv[0], *sys.argv[3:]], check)
    atheris.Fuzz()


_STATS = re.compile(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def _interpreted_copy(dest: Path) -> Path:
    src = Path(__file__).resolve().parents[1]
    shutil.copytree(src, dest / "apsv", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return dest


def run_target(name: str, runs: int, work: Path, regressions: Path | None) -> dict[str, Any]:
    corpus = work / f"corpus-{name}"
    corpus.mkdir()
    seeds = SEEDS[name]()
    for s in seeds:
        (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)
    artifacts = work / f"crashes-{name}"
    artifacts.mkdir()
    args = [
        sys.executable,
        str(work / "pkg" / "apsv" / "bench" / "fuzz.py"),
        "--child",
        name,
        str(corpus),
        f"-runs={runs}",
        f"-timeout={TIMEOUT_S}",
        f"-max_len={MAX_LEN.get(name, DEFAULT_MAX_LEN)}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        "-rss_limit_mb=4096",
    ]
    env = {**os.environ, "PYTHONPATH": str(work / "pkg")}
    t0 = time.monotonic()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, errors="replace", check=False)
    seconds = time.monotonic() - t0
    log = proc.stderr
    stats = _STATS.findall(log)
    execs = int(m.group(1)) if (m := re.search(r"stat::number_of_executed_units:\s*(\d+)", log)) else 0
    crashes = sorted(p for p in artifacts.iterdir() if p.is_file())
    if regressions is not None:
        for c in crashes:
            dest = regressions / name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(c, dest / c.name)
    last = stats[-1] if stats else ("0", "0", "0", "0")
    return {
        "executions": execs,
        "seconds": round(seconds, 1),
        "executions_per_s": round(execs / seconds) if seconds else 0,
        "coverage_edges": int(last[1]),
        "features": int(last[2]),
        "corpus": int(last[3]),
        "seeds": len(seeds),
        "crashes": [c.name for c in crashes],
        "exit": proc.returncode,
        "log_tail": log.strip().splitlines()[-6:] if proc.returncode else [],
    }


def run(runs: int, targets: list[str], regressions: Path | None, jobs: int = 1) -> dict[str, Any]:
    """Each target in a process of its own, `jobs` at a time (one core each)."""
    from concurrent.futures import ThreadPoolExecutor

    out: dict[str, Any] = {"benchmark": "fuzz", "runs_per_target": runs, "timeout_s": TIMEOUT_S, "targets": {}}
    with tempfile.TemporaryDirectory(prefix="apsv-fuzz-") as tmp:
        work = Path(tmp)
        _interpreted_copy(work / "pkg")

        def one(name: str) -> dict[str, Any]:
            r = run_target(name, runs, work, regressions)
            print(f"{name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            return r

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = dict(zip(targets, pool.map(one, targets), strict=True))
    out["targets"] = {name: results[name] for name in targets}
    return out


def render(r: dict[str, Any]) -> str:
    lines = [f"{'target':18} {'executions':>11} {'exec/s':>8} {'cov':>6} {'ft':>7} crashes"]
    for name, t in r["targets"].items():
        lines.append(
            f"{name:18} {t['executions']:>11,} {t['executions_per_s']:>8,} {t['coverage_edges']:>6} "
            f"{t['features']:>7} {len(t['crashes'])}"
        )
    return "\n".join(lines)


def seed_inputs(name: str) -> list[bytes]:
    return SEEDS[name]()


def check_input(name: str, data: bytes, _cache: dict[str, Check] = {}) -> None:  # noqa: B006 - per-process cache
    """Run `data` through target `name` (built once per process), as the fuzzer does."""
    if name not in _cache:
        _cache[name] = TARGETS[name]()
    _cache[name](data)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="benchmarks/fuzz.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=RUNS, help="executions per target")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--regressions", type=Path, default=None, help="copy crash inputs here, by target")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (a core each)")
    a = ap.parse_args(argv)
    chosen = [t for t in a.targets.split(",") if t]
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        raise SystemExit(f"fuzz: unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    r = run(a.runs, chosen, a.regressions, a.jobs)
    print(render(r))
    if a.out is not None:
        a.out.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        fuzz_one(sys.argv[2])
    else:
        main()

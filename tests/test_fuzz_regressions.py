"""The fuzzing benchmark's inputs replayed in CI against the compiled build (benchmarks/fuzz.py
runs atheris on the interpreted source): every seed of every target, and every input that once
broke a target's property (tests/fuzz_regressions/TARGET/), now refused with its typed error."""

from __future__ import annotations

from pathlib import Path

import pytest

from apsv.bench.fuzz import TARGETS, check_input, seed_inputs

REGRESSIONS = Path(__file__).parent / "fuzz_regressions"


def regression_inputs() -> list[tuple[str, Path]]:
    return [(d.name, f) for d in sorted(REGRESSIONS.iterdir()) if d.is_dir() for f in sorted(d.iterdir())]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_seed_holds_the_targets_property(target: str) -> None:
    seeds = seed_inputs(target)
    assert seeds, f"{target}: no seed inputs"
    for data in seeds:
        check_input(target, data)


@pytest.mark.parametrize(("target", "path"), regression_inputs(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_an_input_that_once_broke_a_target_holds_its_property(target: str, path: Path) -> None:
    assert target in TARGETS, f"{path}: no fuzz target {target!r}"
    check_input(target, path.read_bytes())


def test_regression_inputs_are_kept() -> None:
    assert len(regression_inputs()) >= 2


def test_a_corrupt_snapshot_is_one_decode_error_naming_the_protocol() -> None:
    from apsv.bfd.session import BfdSession
    from apsv.bgp.session import BgpSession
    from apsv.errors import DecodeError
    from apsv.snapshot import SnapshotWriter

    w = SnapshotWriter("bfd")
    w.str('{"peer_address": 7}')  # the config section of the wrong type
    with pytest.raises(DecodeError, match=r"^bfd snapshot: ValidationError: "):
        BfdSession.restore(w.getvalue())
    w = SnapshotWriter("bgp")
    w.json({"config": {}})
    with pytest.raises(DecodeError, match=r"^bgp snapshot: "):
        BgpSession.restore(w.getvalue())

"""Dataset builders: series from generic files, APSV telemetry Parquet and MRT update dumps.

Each builder returns raw `Series` (NaN where a sample is missing); `series.clean()` decides what
is usable. Files are read with pyarrow; nothing here trains or predicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from apsv.forecast.series import Series, SeriesError, default_season, regularize

_TIME_COLUMNS = ("timestamp", "ts", "ds", "time", "date", "datetime")


def load_file(path: str | Path, column: str | None = None, *, season: int | None = None) -> Series:
    """A series from a CSV with a header (a named numeric column; a timestamp column when present)
    or a text file with one value per line. Unparseable values become NaN (missing), not zeros.

    Without `column`, a CSV's value column is the last numeric one. Timestamped CSVs are put on a
    regular grid (commonest spacing); the season defaults to a day (a week for daily data).
    """
    p = Path(path)
    if not p.is_file():
        raise SeriesError(f"{p}: no such file")
    text_head = p.read_bytes()[:4096].decode("utf-8", "replace")
    first = text_head.splitlines()[0].strip() if text_head.strip() else ""
    if not first:
        raise SeriesError(f"{p}: the file is empty")
    if "," not in first and _is_number(first):
        return _load_lines(p, season)
    try:
        table = pacsv.read_csv(p)
    except pa.ArrowInvalid as e:
        raise SeriesError(f"{p}: not a CSV file with a header line: {e}") from e
    names = table.column_names
    if column is not None:
        if column not in names:
            raise SeriesError(f"{p}: no column {column!r} (columns: {', '.join(names)})")
        value_col = column
    else:
        numeric = [n for n in names if pa.types.is_integer(table[n].type) or pa.types.is_floating(table[n].type)]
        numeric = [n for n in numeric if n.lower() not in ("minute_index", "index", "step")] or numeric
        if not numeric:
            raise SeriesError(f"{p}: no numeric column (columns: {', '.join(names)}); name one with --column")
        value_col = numeric[-1]
    values = _as_float(table[value_col], f"{p}: column {value_col!r}")
    time_col = next((n for n in names if n.lower() in _TIME_COLUMNS and n != value_col), None)
    name = p.stem if column is None else f"{p.stem}:{column}"
    if time_col is not None and (pa.types.is_timestamp(table[time_col].type) or pa.types.is_date(table[time_col].type)):
        t = pc.cast(table[time_col], pa.timestamp("s")).to_numpy(zero_copy_only=False).astype("datetime64[s]")
        secs = t.astype(np.int64).astype(np.float64)
        grid, step, start = regularize(secs, values)
        return Series(name, grid, step=step, start=start, season=season or default_season(step), meta={"path": str(p)})
    return Series(name, values, season=season or 1, meta={"path": str(p)})


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _load_lines(p: Path, season: int | None) -> Series:
    vals: list[float] = []
    for raw in p.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line:
            continue
        try:
            vals.append(float(line))
        except ValueError:
            vals.append(float("nan"))
    return Series(p.stem, np.asarray(vals, dtype=np.float64), season=season or 1, meta={"path": str(p)})


def _as_float(col: pa.ChunkedArray, what: str) -> np.ndarray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = _parse_floats(col)
    elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise SeriesError(f"{what} has type {col.type}, not numbers")
    arr = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(arr, dtype=np.float64)


def _parse_floats(col: pa.ChunkedArray) -> pa.ChunkedArray:
    out = []
    for s in col.to_pylist():
        try:
            out.append(float(s))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return pa.chunked_array([pa.array(out, pa.float64())])


def from_telemetry(table: pa.Table, step: float = 1.0, *, by: Iterable[str] = ("protocol",)) -> list[Series]:
    """Per-protocol (or per any grouping columns) load: the sum of `msgs_per_s` over instances at each
    sample time, on a regular grid of `step` seconds. Missing samples stay NaN for `clean`."""
    keys = list(by)
    missing = [k for k in [*keys, "ts", "msgs_per_s"] if k not in table.column_names]
    if missing:
        raise SeriesError(f"telemetry table lacks column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        return []
    ts = pc.cast(table["ts"], pa.timestamp("us")).to_numpy(zero_copy_only=False).astype("datetime64[us]")
    secs = ts.astype(np.int64) / 1e6
    slots = np.floor(secs / step).astype(np.int64)
    rate = np.asarray(pc.cast(table["msgs_per_s"], pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    groups: dict[tuple[str, ...], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    cols = [table[k].to_pylist() for k in keys]
    for i in range(table.num_rows):
        groups[tuple(str(c[i]) for c in cols)][int(slots[i])] += float(rate[i])
    out = []
    lo, hi = int(slots.min()), int(slots.max())
    for key, per_slot in sorted(groups.items()):
        grid = np.full(hi - lo + 1, np.nan)
        for s, v in per_slot.items():
            grid[s - lo] = v
        out.append(
            Series(
                "/".join(key),
                grid,
                step=step,
                start=lo * step,
                season=default_season(step),
                meta={"source": "telemetry"},
            )
        )
    return out


def from_mrt(
    path: str | Path, *, step: float = 1.0, per_peer: bool = True, measure: str = "prefixes", top: int | None = None
) -> list[Series]:
    """Real BGP churn from an MRT update dump: per second (or `step`), per peer, the count of
    UPDATE messages (`measure="updates"`) or of announced + withdrawn prefixes (`"prefixes"`).

    Seconds with no message are genuine zeros (the collector recorded everything it saw), so the
    grid is dense. `top` keeps the busiest peers; the all-peers total comes first.
    """
    from apsv.bgp.errors import BgpError
    from apsv.bgp.message import Update
    from apsv.mrt.reader import MrtReader
    from apsv.mrt.records import BgpMessageRecord
    from apsv.mrt.sessions import RecordedSessions

    if measure not in ("prefixes", "updates"):
        raise ValueError(f"measure must be 'prefixes' or 'updates', not {measure!r}")
    per: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    sessions = RecordedSessions()
    with MrtReader(path, recover=True) as reader:
        for item in reader:
            if not isinstance(item, BgpMessageRecord) or item.msg_type != 2 or item.local:
                continue
            try:
                msg = sessions.decode(item)
            except BgpError:
                continue  # malformed on the wire: not load the stack would carry further
            if not isinstance(msg, Update):
                continue
            slot = int(item.timestamp // step)
            n = 1.0 if measure == "updates" else float(msg.announced_count + msg.withdrawn_count)
            per["all"][slot] += n
            if per_peer:
                per[f"AS{item.peer_as}-{item.peer_ip}"][slot] += n
    if not per:
        raise SeriesError(f"{path}: no BGP UPDATE messages")
    lo = min(per["all"])
    hi = max(per["all"])
    stem = Path(path).name
    ranked = sorted((k for k in per if k != "all"), key=lambda k: -sum(per[k].values()))
    keys = ["all"] + (ranked[:top] if top is not None else ranked)
    out = []
    for k in keys:
        grid = np.zeros(hi - lo + 1)
        for s, v in per[k].items():
            grid[s - lo] = v
        out.append(
            Series(
                f"{stem}:{k}:{measure}",
                grid,
                step=step,
                start=lo * step,
                season=1,
                meta={"source": "mrt", "path": str(path)},
            )
        )
    return out

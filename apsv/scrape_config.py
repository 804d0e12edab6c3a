"""A Prometheus configuration for the deployment, at a path that does not change between `apsv
up`s: ``<state dir>/prometheus/prometheus.yml`` scrapes the targets listed in
``<state dir>/prometheus/targets.json`` (file-based service discovery, re-read by Prometheus
whenever it changes). `apsv up` writes every node's metrics endpoint there; `apsv down` empties
the list. A Prometheus started once with ``--config.file`` that path follows every later
deployment without a restart or an edit.

Ray writes a configuration of its own under the head's temp dir, which is new on every `up`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from apsv.atomic_file import write_atomic

DIR = "prometheus"
CONFIG = "prometheus.yml"
TARGETS = "targets.json"
JOB = "apsv"
SCRAPE_INTERVAL = "5s"


def paths(state_dir: Path) -> tuple[Path, Path]:
    """(the configuration, the targets file)."""
    d = state_dir / DIR
    return d / CONFIG, d / TARGETS


def _write(path: Path, text: str) -> None:
    write_atomic(path, text, 0o644)  # Prometheus may run as another user


def config_text(targets_file: Path) -> str:
    return (
        "# Written by `apsv up`: scrapes every node of the APSV deployment recorded in this state\n"
        f"# directory. The targets follow each deployment through {targets_file.name}.\n"
        + yaml.safe_dump(
            {
                "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "10s"}],
                    }
                ],
            },
            sort_keys=False,
        )
    )


def node_targets(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """host:port of each live node's metrics endpoint (from `ray.nodes()`)."""
    out = []
    for n in nodes:
        port = n.get("MetricsExportPort")
        if n.get("Alive") and port and int(port) > 0:
            out.append(f"{n['NodeManagerAddress']}:{int(port)}")
    return sorted(set(out))


def write(state_dir: Path, targets: list[str], labels: Mapping[str, str]) -> Path:
    """Write the targets (and the configuration, if it is not there yet: an operator's edits to
    it are kept); returns the configuration's path."""
    config, targets_file = paths(state_dir)
    _write(targets_file, json.dumps([{"targets": targets, "labels": dict(labels)}], indent=2) + "\n")
    if not config.exists():
        _write(config, config_text(targets_file))
    return config


def clear_targets(state_dir: Path) -> None:
    _, targets_file = paths(state_dir)
    if targets_file.exists():
        _write(targets_file, "[]\n")

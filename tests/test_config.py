"""apsv.config: the one YAML configuration - defaults, the example, every kind of refusal (each
naming the file or variable, the field's path and the reason), environment overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from apsv.config import ConfigError, dump_config, load_config, parse_config
from apsv.runtime.instance import Allocation
from apsv.runtime.vpsm import ProtocolPlan
from apsv.sizes import parse_size

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "apsv.yaml"


def write(tmp_path: Path, data: Any, name: str = "apsv.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def refused(tmp_path: Path, data: Any, env: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env or {})
    assert e.value.problems, "a refusal lists its problems"
    assert all(p in str(e.value) for p in e.value.problems)
    return e.value.problems


# ------------------------------------------------------------------------------------------------
# What loads


def test_defaults_without_a_file() -> None:
    cfg = load_config(env={})
    assert cfg.source == "(defaults)"
    assert cfg.ray.address is None and cfg.ray.namespace == "apsv" and cfg.ray.dashboard_host == "127.0.0.1"
    assert [p.protocol for p in cfg.protocols] == ["bgp"]
    (plan,) = cfg.plans()
    assert plan == ProtocolPlan("bgp", backend="process", policy="reactive", slo_ms=100.0)
    assert plan.allocation == Allocation()
    assert not cfg.forecaster.enabled


def test_apsv_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"vpsm": {"interval_s": 0.25}})
    cfg = load_config(env={"APSV_CONFIG": str(path)})
    assert cfg.vpsm.interval_s == 0.25 and cfg.source == str(path)
    # an explicit path wins over the variable
    other = write(tmp_path, {"vpsm": {"interval_s": 2}}, "other.yaml")
    assert load_config(other, env={"APSV_CONFIG": str(path)}).vpsm.interval_s == 2


def test_empty_file_is_every_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}).plans() == load_config(env={}).plans()


def test_the_example_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    plans = {p.protocol: p for p in cfg.plans()}
    assert set(plans) == {"bgp", "bfd"}
    assert plans["bfd"].slo_ms == 10.0  # the protocol's default objective
    assert plans["bgp"].allocation.memory_bytes == 512 << 20
    assert plans["bgp"].allocation.buffer_quota_bytes == 8 << 20
    assert cfg.forecaster.enabled and cfg.forecaster.app_name == "tpe"
    # what `apsv config` prints loads back to the same configuration
    again = parse_config(yaml.safe_load(dump_config(cfg)), "dumped", env={})
    assert again.plans() == cfg.plans() and again.ray == cfg.ray


def test_plans_carry_every_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "protocols": [
                {
                    "protocol": "bfd",
                    "backend": "docker",
                    "min_instances": 2,
                    "max_instances": 5,
                    "policy": "threshold",
                    "policy_config": {"target_cpu": 0.6},
                    "capacity_per_instance": 5000,
                    "slo_ms": 15,
                    "season": 24,
                    "allocation": {"cpu": 1, "memory": "1GiB", "buffer_quota": "512 KiB", "max_sessions": 2000},
                }
            ]
        },
    )
    (plan,) = load_config(path, env={}).plans()
    assert plan == ProtocolPlan(
        "bfd",
        backend="docker",
        min_instances=2,
        max_instances=5,
        allocation=Allocation(cpu=1.0, memory_bytes=1 << 30, buffer_quota_bytes=512 << 10, max_sessions=2000),
        policy="threshold",
        policy_config={"target_cpu": 0.6},
        capacity_per_instance=5000.0,
        slo_ms=15.0,
        season=24,
    )


@pytest.mark.parametrize(
    ("text", "octets"),
    [(4096, 4096), ("4096", 4096), ("512MiB", 512 << 20), ("8 MiB", 8 << 20), ("1.5GiB", 3 << 29), ("64k", 64_000)],
)
def test_sizes(text: Any, octets: int) -> None:
    assert parse_size(text) == octets


# ------------------------------------------------------------------------------------------------
# What is refused, and how it is said


def test_min_above_max_names_file_and_field(tmp_path: Path) -> None:
    problems = refused(
        tmp_path,
        {"protocols": [{"protocol": "bgp"}, {"protocol": "bfd", "min_instances": 2, "max_instances": 1}]},
    )
    assert problems == [f"{tmp_path / 'apsv.yaml'}: protocols[1].max_instances: must be >= min_instances (2)"]


@pytest.mark.parametrize(
    ("data", "where", "reason"),
    [
        ({"ray": {"adress": "auto"}}, "ray.adress", "unknown field (did you mean 'address'?"),
        ({"vpsm": {"interval": 1}}, "vpsm.interval", "did you mean 'interval_s'?"),
        ({"protocols": [{"protocol": "bgp", "alocation": {}}]}, "protocols[0].alocation", "unknown field"),
        ({"protocols": [{"protocol": "bgp", "allocation": {"mem": 1}}]}, "protocols[0].allocation.mem", "unknown"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"vpsm": {"interval_s": "fast"}}, "vpsm.interval_s", "valid number"),
        ({"vpsm": {"interval_s": 0}}, "vpsm.interval_s", "greater than 0"),
        ({"multiplexer": {"client_lease_s": 1}}, "multiplexer.client_lease_s", "greater than or equal to 5"),
        ({"vpsm": {"telemetry_retention_hours": 0}}, "vpsm.telemetry_retention_hours", "greater than or equal to 1"),
        ({"protocols": [{"protocol": "bgp", "max_instances": "many"}]}, "protocols[0].max_instances", "integer"),
        ({"ray": {"num_cpus": 1.5}}, "ray.num_cpus", "integer"),
        ({"ray": "local"}, "ray", "expected a mapping"),
        ({"protocols": {"protocol": "bgp"}}, "protocols", "expected a list"),
        ({"protocols": []}, "protocols", "at least 1"),
        ({"protocols": [{"backend": "process"}]}, "protocols[0].protocol", "required field missing"),
        ({"protocols": [{"protocol": "ospf"}]}, "protocols[0].protocol", "unknown protocol 'ospf' (registered"),
        ({"protocols": [{"protocol": "bgp", "policy": "magic"}]}, "protocols[0].policy", "unknown scaling policy"),
        (
            {"protocols": [{"protocol": "bgp", "policy": "ray_serve", "policy_config": {"upscale_delay": 5}}]},
            "protocols[0].policy_config",
            "not a field of Ray Serve's AutoscalingConfig: upscale_delay",
        ),
        (
            {
                "forecaster": {"enabled": True},
                "protocols": [{"protocol": "bgp", "policy": "predictive", "policy_config": {"fallback": "oracle"}}],
            },
            "protocols[0].policy_config",
            "'oracle' cannot be the fallback",
        ),
        (
            {
                "forecaster": {"enabled": True},
                "protocols": [{"protocol": "bgp", "policy": "predictive", "policy_config": {"trust": 2}}],
            },
            "protocols[0].policy_config",
            "trust: expected a number in 0..1",
        ),
        (
            {"protocols": [{"protocol": "bgp", "policy": "threshold", "policy_config": {"target_utilisation": 0.6}}]},
            "protocols[0].policy_config",
            "target_utilisation: not a setting of the threshold policy (known: ",
        ),
        (
            {"protocols": [{"protocol": "bgp", "policy": "reactive", "policy_config": {"upscale_delay_s": "soon"}}]},
            "protocols[0].policy_config",
            "upscale_delay_s: expected a number, got 'soon'",
        ),
        (
            {
                "forecaster": {"enabled": True},
                "protocols": [
                    {
                        "protocol": "bgp",
                        "policy": "predictive",
                        "policy_config": {"fallback": "threshold", "fallback_config": {"window_s": 60}},
                    }
                ],
            },
            "protocols[0].policy_config",
            "fallback_config (threshold): window_s: not a setting of the threshold policy",
        ),
        ({"protocols": [{"protocol": "bgp", "backend": "vm"}]}, "protocols[0].backend", "'process' or 'docker'"),
        (
            {"protocols": [{"protocol": "bgp", "allocation": {"memory": "512XB"}}]},
            "protocols[0].allocation.memory",
            "'512XB' is not a size",
        ),
        (
            {"protocols": [{"protocol": "bgp", "allocation": {"buffer_quota": True}}]},
            "protocols[0].allocation.buffer_quota",
            "expected a size",
        ),
        (
            {"protocols": [{"protocol": "bgp", "allocation": {"memory": "1MiB"}}]},
            "protocols[0].allocation.memory",
            "greater than or equal to 16777216",
        ),
        ({"protocols": [{"protocol": "bgp"}, {"protocol": "bgp"}]}, "protocols[1].protocol", "already configured"),
        (
            {"protocols": [{"protocol": "bgp", "policy": "predictive"}]},
            "protocols[0].policy",
            "set forecaster.enabled: true",
        ),
        ({"ray": {"dashboard_host": "everywhere"}}, "ray.dashboard_host", "not an IP address"),
        ({"ray": {"dashboard_port": 80}}, "ray.dashboard_port", "greater than or equal to 1024"),
        ({"ray": {"metrics_export_port": 18080}}, "ray.metrics_export_port", "range Ray gives its workers"),
        ({"ray": {"temp_dir": "relative/dir"}}, "ray.temp_dir", "absolute path"),
        ({"ray": {"temp_dir": "/tmp/" + "x" * 60}}, "ray.temp_dir", "length-limited"),
        ({"ray": {"namespace": "a b"}}, "ray.namespace", "pattern"),
        ({"forecaster": {"version": "latest"}}, "forecaster.version", "expected current or a version"),
        ({"forecaster": {"route_prefix": "forecast"}}, "forecaster.route_prefix", "must start with /"),
    ],
)
def test_every_kind_of_bad_field(tmp_path: Path, data: Any, where: str, reason: str) -> None:
    problems = refused(tmp_path, data)
    prefix = f"{tmp_path / 'apsv.yaml'}: {where}: "
    assert any(p.startswith(prefix) and reason in p for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = refused(
        tmp_path,
        {"ray": {"adress": 1}, "protocols": [{"protocol": "bgp", "policy": "x", "allocation": {"cpu": -1}}]},
    )
    assert [p.split(": ")[1] for p in problems] == [
        "ray.adress",
        "protocols[0].policy",
        "protocols[0].allocation.cpu",
    ]


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml", env={})
    problems = refused(tmp_path, "ray:\n  address: [unclosed\n")
    assert problems[0].startswith(f"{tmp_path / 'apsv.yaml'}: not valid YAML: line ")
    problems = refused(tmp_path, "- just\n- a list\n")
    assert problems[0].startswith(f"{tmp_path / 'apsv.yaml'}: (top level): expected a mapping of sections")


# ------------------------------------------------------------------------------------------------
# Environment overrides


def test_env_overrides_apply(tmp_path: Path) -> None:
    path = write(tmp_path, {"protocols": [{"protocol": "bgp", "max_instances": 2}]})
    env = {
        "APSV__RAY__ADDRESS": "auto",
        "APSV__VPSM__INTERVAL_S": "0.5",
        "APSV__PROTOCOLS__0__MAX_INSTANCES": "4",
        "APSV__PROTOCOLS__0__ALLOCATION__MEMORY": "1GiB",
        "APSV__PROTOCOLS__0__POLICY_CONFIG": "{target_utilization: 0.5}",
        "APSV__FORECASTER__ENABLED": "true",
        "APSV_STATE_DIR": "/elsewhere",  # one underscore: not an override
    }
    cfg = load_config(path, env=env)
    assert cfg.ray.address == "auto" and cfg.vpsm.interval_s == 0.5 and cfg.forecaster.enabled
    (plan,) = cfg.plans()
    assert plan.max_instances == 4 and plan.allocation.memory_bytes == 1 << 30
    assert plan.policy_config == {"target_utilization": 0.5}


def test_env_overrides_the_defaults_and_adds_a_protocol() -> None:
    cfg = load_config(
        env={"APSV__PROTOCOLS__0__MIN_INSTANCES": "2", "APSV__PROTOCOLS__1__PROTOCOL": "bfd", "APSV__RAY__ADDRESS": ""}
    )
    assert [(p.protocol, p.min_instances) for p in cfg.plans()] == [("bgp", 2), ("bfd", 1)]
    assert cfg.ray.address is None  # an empty value is null


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"APSV__VPSM__INTERVAL_S": "-1"}, "environment APSV__VPSM__INTERVAL_S='-1': vpsm.interval_s: "),
        ({"APSV__RAY__ADRESS": "auto"}, "environment APSV__RAY__ADRESS='auto': ray.adress: unknown field"),
        ({"APSV__PROTOCOLS__0__POLICY": "nope"}, "environment APSV__PROTOCOLS__0__POLICY='nope': protocols[0].policy"),
        ({"APSV__PROTOCOLS__3__PROTOCOL": "bfd"}, "APSV__PROTOCOLS__3__PROTOCOL='bfd': protocols has 1 entries"),
        ({"APSV__RAY__ADDRESS__HOST": "x"}, "APSV__RAY__ADDRESS__HOST='x': ray.address is a value, not a section"),
        ({"APSV__RAY__ADDRESS": "[x"}, "environment APSV__RAY__ADDRESS='[x': not a YAML value"),
        ({"APSV__RAY": "local"}, "environment APSV__RAY='local': ray: expected a mapping"),
        ({"APSV__VPSM____X": "1"}, "environment APSV__VPSM____X='1': expected APSV__<SECTION>__<FIELD>"),
        # the override broke a check against a field the file set: it is still the variable's fault
        ({"APSV__PROTOCOLS__0__MIN_INSTANCES": "9"}, "APSV__PROTOCOLS__0__MIN_INSTANCES='9': protocols[0].max_"),
    ],
)
def test_a_bad_override_names_the_variable(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    path = write(tmp_path, {"protocols": [{"protocol": "bgp", "max_instances": 4}]})
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env)
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_problems_from_file_and_environment_together(tmp_path: Path) -> None:
    path = write(tmp_path, {"vpsm": {"interval_s": "x"}})
    with pytest.raises(ConfigError) as e:
        load_config(path, env={"APSV__RAY__NUM_CPUS": "0"})
    text = str(e.value)
    assert text.startswith("2 problems in the APSV configuration:")
    assert f"{path}: vpsm.interval_s:" in text and "environment APSV__RAY__NUM_CPUS='0': ray.num_cpus:" in text

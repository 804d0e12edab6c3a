"""Deploy APSV on the job's cluster: multiplexer, VPSM (and the forecaster's Serve app if configured).

    ray job submit --working-dir . -- python jobs/deploy.py [--config apsv.yaml]

Reads the configuration (apsv.config: the file, else $APSV_CONFIG, else the defaults, then the
APSV__... environment overrides; its `ray` section is not used - a job runs on the cluster it was
submitted to) and creates, in the configured namespace:

* the multiplexer as a named, detached actor (it outlives this job);
* if `forecaster.enabled`, the TPE as a Ray Serve application (Serve's own actors are detached);
* the VPSM, named and detached, which starts each protocol's minimum instances (its own
  actors: they live as long as it does) and runs the control loop.

The job returns once everything answers; jobs/replay.py, jobs/rib_dump.py and `apsv status`
find the deployment by name. A deployment already running in the namespace is an error unless
`--replace`, which destroys it first. Prints one JSON object; exit status 2 for a bad
configuration, 1 if a deployment is already running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

# The job's working_dir (the repository root) holds apsv/; make it importable however we start.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apsv.config import ApsvConfig, ConfigError, load_config
from apsv.ops import state_dir
from apsv.runtime.cluster import MULTIPLEXER_NAME
from apsv.runtime.vpsm import VPSM_NAME

CALL_TIMEOUT_S = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="APSV configuration (YAML); default $APSV_CONFIG or the defaults")
    p.add_argument("--telemetry", default=None, help="telemetry root (default: the config's, else ~/.apsv/telemetry)")
    p.add_argument("--replace", action="store_true", help="destroy a deployment already running in the namespace")
    p.add_argument("--no-loop", action="store_true", help="start the instances but not the control loop")
    return p.parse_args(argv)


def existing(namespace: str) -> tuple[Any, Any]:
    """The (VPSM, multiplexer) actors of a deployment in the namespace, None where absent."""
    import ray

    found: list[Any] = []
    for name in (VPSM_NAME, MULTIPLEXER_NAME):
        try:
            found.append(ray.get_actor(name, namespace=namespace))
        except ValueError:
            found.append(None)
    return found[0], found[1]


def destroy(vpsm: Any, im: Any) -> None:
    """A deployment's instances (through its VPSM), then the VPSM and the multiplexer: each
    forgets the state it keeps in Ray's KV store, and is killed for good (Ray would restart it)."""
    import ray

    if vpsm is not None:
        with contextlib.suppress(Exception):  # a VPSM that cannot answer is killed all the same
            ray.get(vpsm.shutdown.remote(), timeout=CALL_TIMEOUT_S)
        ray.kill(vpsm, no_restart=True)
    if im is not None:
        with contextlib.suppress(Exception):
            ray.get(im.forget.remote(), timeout=CALL_TIMEOUT_S)
        ray.kill(im, no_restart=True)


def deploy_all(cfg: ApsvConfig, telemetry: Path, run_loop: bool) -> dict[str, Any]:
    import ray

    from apsv.ops import deploy_control_plane, forget_deployment

    ns = cfg.ray.namespace
    # Nothing runs in the namespace (main checked): what a deployment killed without being
    # stopped (or whose actors could not answer `destroy`) kept in Ray's KV store would be
    # taken up by the new actors as their own.
    forget_deployment(ns, (VPSM_NAME, MULTIPLEXER_NAME))
    dep, app = deploy_control_plane(cfg, telemetry, run_loop=run_loop)  # RoleError: main prints it
    status = ray.get(dep.vpsm.status.remote(), timeout=CALL_TIMEOUT_S)
    return {
        "namespace": ns,
        "multiplexer": dep.multiplexer_name,
        "vpsm": VPSM_NAME,
        "instances": {p: s["instances"] for p, s in status["protocols"].items()},
        "forecaster_app": app,
        "telemetry_dir": str(telemetry),
        "control_loop": run_loop,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(f"deploy: {problem}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    telemetry = Path(args.telemetry).expanduser() if args.telemetry else cfg.telemetry_root(state_dir())
    import ray

    ns = cfg.ray.namespace
    if not ray.is_initialized():
        ray.init(namespace=ns)  # inside `ray job submit` this joins the job's cluster
    t0 = time.perf_counter()
    vpsm, im = existing(ns)
    if vpsm is not None or im is not None:
        if not args.replace:
            print(
                f"deploy: an APSV deployment is already running in namespace {ns!r}: --replace destroys it first",
                file=sys.stderr,
            )
            return 1
        destroy(vpsm, im)
        for _ in range(300):  # names are released asynchronously after a kill
            if existing(ns) == (None, None):
                break
            time.sleep(0.1)
        else:  # deploying now would find the dead actors by name (get_if_exists)
            print(f"deploy: the old deployment's actors in {ns!r} did not go away in 30 s", file=sys.stderr)
            return 1
    from apsv.runtime.roles import RoleError

    try:
        result = deploy_all(cfg, telemetry, run_loop=not args.no_loop)
    except RoleError as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 1
    result["config"] = cfg.source
    result["replaced"] = vpsm is not None or im is not None
    result["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Imports point one way: pure cores <- Ray/socket edges <- deployment <- evaluation <- interface.

Every `import` in apsv/ (module level or inside a function) is read from the source with `ast`:
a module may import its own layer or a lower one, never a higher one; a pure core imports no
I/O (Ray, Docker, asyncio, subprocesses, psutil, torch outside the forecaster's model modules)
and uses `socket` only to convert addresses; and the packages form no cycle. The checker is
tried on a small tree with one violation of each kind, so this test can fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",  # pure: bytes, events, numbers in; actions out; the clock passed in
        (
            "apsv",  # (the package itself: its version)
            "apsv.errors",
            "apsv.frame",
            "apsv.snapshot",
            "apsv.stacks",
            "apsv.bgp",
            "apsv.bfd",
            "apsv.mrt",
            "apsv.pcap",
            "apsv.capacity",
            "apsv.sizes",
            "apsv.gc_tuning",
            "apsv.scaling",
            "apsv.forecast",
            "apsv.runtime.host",
            "apsv.runtime.channel",
            "apsv.runtime.custody",
            "apsv.runtime.delivery",
            "apsv.runtime.outbox",
        ),
    ),
    (
        "edge",  # Ray, sockets, Docker, files
        (
            "apsv.runtime",
            "apsv.agent",
            "apsv.forecast.serving",
            "apsv.forecast.registry",
            "apsv.bgp_view",
            "apsv.scrape_config",
            "apsv.atomic_file",
        ),
    ),
    ("deployment", ("apsv.config", "apsv.local_head", "apsv.ops")),  # a deployment, as an operator makes it
    ("evaluation", ("apsv.bench", "apsv.evaluation")),  # benchmarks, policy comparisons, claims
    ("interface", ("apsv.cli",)),  # the `apsv` command
]

IO_MODULES = {"ray", "docker", "asyncio", "torch", "subprocess", "selectors", "multiprocessing", "psutil", "http"}
# Where a pure core may use one of them, and why.
IO_ALLOWED = {
    ("apsv.forecast.models", "torch"): "the Transformer itself",
    ("apsv.forecast.neural", "torch"): "its training and inference",
    ("apsv.scaling.ray_serve", "ray"): "Ray Serve's own autoscaling policy, a pure function, called as a baseline",
}
SOCKET_PURE = {"inet_pton", "inet_ntop", "inet_aton", "inet_ntoa", "AF_INET", "AF_INET6"}


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


@dataclass(frozen=True)
class Imp:
    module: str  # the importer
    target: str  # what it imports (for `from apsv import x`, apsv.x)
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> Iterator[tuple[Imp, ast.Module]]:
    for path in sorted((root / "apsv").rglob("*.py")):
        mod = module_name(root, path)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield Imp(mod, a.name, node.lineno), tree
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "apsv":  # `from apsv import ops`: the submodules
                    for a in node.names:
                        yield Imp(mod, f"apsv.{a.name}", node.lineno), tree
                else:
                    yield Imp(mod, node.module, node.lineno), tree


def socket_uses(tree: ast.Module) -> set[str]:
    uses = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "socket"
    }
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module == "socket":
            uses |= {a.name for a in n.names}
    return uses


def violations(root: Path) -> list[str]:
    out = []
    for imp, tree in imports(root):
        mine = layer_of(imp.module)
        assert mine is not None, f"{imp.module}: in no layer (add it to LAYERS)"
        top = imp.target.split(".")[0]
        if top == "apsv":
            theirs = layer_of(imp.target)
            if theirs is not None and theirs > mine:
                lower, higher = LAYERS[mine][0], LAYERS[theirs][0]
                out.append(f"{imp.module}:{imp.line} ({lower}) imports {imp.target} ({higher}), a higher layer")
        elif mine == 0 and top in IO_MODULES and (imp.module, top) not in IO_ALLOWED:
            out.append(f"{imp.module}:{imp.line} is a pure core and imports {imp.target}")
        elif mine == 0 and top == "socket" and (extra := socket_uses(tree) - SOCKET_PURE):
            out.append(f"{imp.module}:{imp.line} is a pure core and uses socket.{', socket.'.join(sorted(extra))}")
    return out


def package_cycles(root: Path) -> list[list[str]]:
    """Cycles between apsv's packages and top-level modules (apsv.runtime, apsv.config, ...)."""

    def pkg(m: str) -> str:
        return ".".join(m.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for imp, _ in imports(root):
        a, b = pkg(imp.module), pkg(imp.target)
        if b.startswith("apsv.") and a not in (b, "apsv"):
            graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return cycles


def test_imports_point_one_way() -> None:
    assert violations(ROOT) == []


def test_no_cycle_between_packages() -> None:
    assert package_cycles(ROOT) == []


def test_the_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    files = {
        "apsv/__init__.py": "",
        "apsv/bgp/__init__.py": "",
        "apsv/bgp/wire.py": "import socket\ns = socket.socket()\n",  # socket I/O in a core
        "apsv/bgp/addr.py": "import socket\nsocket.inet_pton(socket.AF_INET, '198.51.100.1')\n",  # fine
        "apsv/scaling/__init__.py": "",
        "apsv/scaling/policy.py": "def f():\n    import ray\n",  # Ray in a core, even lazily
        "apsv/scaling/loop.py": "from apsv.runtime import vpsm\n",  # a core importing an edge
        "apsv/runtime/__init__.py": "",
        "apsv/runtime/vpsm.py": "from apsv.scaling import policy\nfrom apsv import ops\n",  # ops: deployment
        "apsv/ops.py": "from apsv.runtime import vpsm\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert any(v.startswith("apsv.bgp.wire:1 is a pure core and uses socket.socket") for v in found), found
    assert any(v.startswith("apsv.scaling.policy:2 is a pure core and imports ray") for v in found), found
    assert any(v.startswith("apsv.scaling.loop:1 (core) imports apsv.runtime") for v in found), found
    assert any(v.startswith("apsv.runtime.vpsm:2 (edge) imports apsv.ops (deployment)") for v in found), found
    assert not any("apsv.bgp.addr" in v for v in found), found
    assert len(found) == 4, found
    assert ["apsv.ops", "apsv.runtime", "apsv.ops"] in package_cycles(tmp_path)

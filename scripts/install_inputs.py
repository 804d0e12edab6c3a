"""Print a digest of what an editable install of APSV reads: pyproject.toml, setup.py and the
modules setup.py compiles with mypyc (the rest of the package is imported from the tree as it
is). scripts/setup.sh reinstalls only when this digest changes."""

import ast
import hashlib
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
setup = root / "setup.py"
hot: list[str] = []
for node in ast.walk(ast.parse(setup.read_text())):
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "HOT_MODULES" for t in node.targets):
        hot = list(ast.literal_eval(node.value))
h = hashlib.sha256(sys.version.encode())
for rel in ["pyproject.toml", "setup.py", *hot]:
    h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
print(h.hexdigest())

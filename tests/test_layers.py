"""The package's import arrows point one way: cli -> hub -> parts -> primitives. A module that
imports upward (or the package ``lorahub`` itself, which imports ``hub``) makes a cycle that
works until the day import order changes; this test keeps the layering from drifting."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lorahub

ROOT = Path(lorahub.__file__).parent
# Import nothing of lorahub but each other: the vocabulary every other module shares.
PRIMITIVES = {
    "_version",
    "aliases",
    "device",
    "digest",
    "dtypes",
    "errors",
    "fsutil",
    "hfenv",
    "layout",
    "lazy",
    "refs",
    "settings",
    "units",
}
TOP = {"hub": 2, "cli": 3, "serve": 3}  # everything else under lorahub/ is a part (1)


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py") if "_migrations" not in p.parts}


def _imports(module: str, path: Path) -> list[str]:
    """Every lorahub module ``module`` imports, eagerly or through ``lazy_module``."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[str] = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "lorahub"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.split(".")[0] == "lorahub":
                target = node.module
            else:
                continue
            if node.module:
                found.append(target)
            else:  # from . import x: x is a module, or a name of the package itself
                found += [
                    f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
                    for a in node.names
                ]
    found += re.findall(r"lazy_module\(\"(lorahub[\w.]*)\"\)", path.read_text())
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return 0 if top in PRIMITIVES else TOP.get(top, 1)


def test_every_import_points_down_or_sideways():
    wrong = []
    for module, path in sorted(MODULES.items()):
        if module == "lorahub":
            continue
        for target in _imports(module, path):
            if target == "lorahub":
                wrong.append(f"{module} imports the package lorahub itself")
            elif _layer(target) > _layer(module) or (_layer(module) == 0 and _layer(target) != 0):
                wrong.append(f"{module} (layer {_layer(module)}) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_arrow(tmp_path):
    """The check above would fail: a primitive importing a part, and a root import, found."""
    bad = tmp_path / "lorahub" / "units.py"
    bad.parent.mkdir()
    bad.write_text("import lorahub\nfrom .merge import plan\nfrom . import hub\n")
    assert _imports("lorahub.units", bad) == ["lorahub", "lorahub.merge", "lorahub.hub"]
    assert _layer("lorahub.merge") == 1 > _layer("lorahub.units") == 0

"""Installing lorahub gives a working lorahub.

A regular (non-editable) install carries the Alembic revisions, and what lorahub imports at
run time, directly or through the libraries it calls, is declared in ``pyproject.toml``:
the test environment has far more installed (peft, transformers, ...) than a plain
``pip install lorahub`` brings, so these tests hide everything undeclared from the code.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 only loses these checks

ROOT = Path(__file__).resolve().parent.parent

# Run inside a child interpreter: hide the given top-level modules (as if not installed),
# then run a script or the lorahub CLI with the remaining arguments.
_HIDING_RUNNER = r"""
import importlib.abc, json, runpy, sys

hidden = frozenset(json.loads(sys.argv[1]))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
what, args = sys.argv[2], sys.argv[3:]
sys.argv = [what, *args]
if what == "lorahub":
    from lorahub.cli import main
    main()
else:
    runpy.run_path(what, run_name="__main__")
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared_closure() -> set[str]:
    """Every distribution a plain install of lorahub (no extras) brings, as installed here."""
    from packaging.requirements import Requirement

    todo = [(Requirement(r), "") for r in _project()["dependencies"]]
    seen: set[tuple[str, str]] = set()
    closure: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _norm(req.name)
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                requires = md.requires(name) or []
            except md.PackageNotFoundError:
                continue  # not installed here, so nothing can import it either
            closure.add(name)
            todo.extend((Requirement(r), _norm(wanted)) for r in requires)
    return closure


def _undeclared_modules() -> list[str]:
    """Top-level modules installed here whose distributions a plain install would not bring."""
    closure = _declared_closure()
    hidden = {
        top
        for top, dists in md.packages_distributions().items()
        if top not in sys.stdlib_module_names
        and top != "lorahub"
        and not any(_norm(d) in closure for d in dists)
    }
    return sorted(hidden)


def _run_hiding(what: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _HIDING_RUNNER, json.dumps(_undeclared_modules()), what, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TMPDIR": str(cwd)},
        timeout=600,
    )


def test_every_third_party_import_in_lorahub_is_a_declared_dependency():
    """Of a dependency or of an extra (imported only where the extra's feature is used; a
    plain install running without it is checked below)."""
    extras = [r for reqs in _project().get("optional-dependencies", {}).values() for r in reqs]
    declared = {
        _norm(re.match(r"[A-Za-z0-9._-]+", r).group())
        for r in [*_project()["dependencies"], *extras]
    }
    owners = md.packages_distributions()
    missing: dict[str, str] = {}
    for path in sorted((ROOT / "lorahub").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top in sys.stdlib_module_names or top == "lorahub":
                    continue
                dists = {_norm(d) for d in owners.get(top, [top])}
                if not dists & declared:
                    missing[top] = str(path.relative_to(ROOT))
    assert not missing, f"imported in lorahub/ but not in [project].dependencies: {missing}"


@pytest.mark.slow
def test_quickstart_and_cli_run_with_only_the_declared_dependencies(tmp_path):
    """What `pip install -e .` (no dev group) gives must run the README's first command and
    the tensor-touching CLI commands, with no NumPy warning from torch."""
    hidden = _undeclared_modules()
    assert "pytest" in hidden  # the hiding works: the dev group is not a lorahub dependency

    res = _run_hiding(str(ROOT / "examples" / "quickstart.py"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done" in res.stdout.splitlines()[-1]
    assert "NumPy" not in res.stderr, res.stderr

    # A PEFT folder written here (the test environment can), added and composed by the CLI.
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
            "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(16, 4, generator=g),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    home = str(tmp_path / "home")
    for args in (
        ("add", str(adapter), "--name", "a:v1"),
        ("compose", "a:v1", "a:v1", "--weights", "1.0,0.5", "-n", "blend:v1"),
        ("export", "blend:v1", str(tmp_path / "out")),
    ):
        res = _run_hiding("lorahub", "--home", home, *args, cwd=tmp_path)
        assert res.returncode == 0, (args, res.stderr[-3000:])
        assert "NumPy" not in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_wheel_install_into_fresh_venv_runs_ls(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (wheel,) = dist.glob("lorahub_store-*.whl")  # the distribution's name; the import's is lorahub
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorahub/_migrations/env.py" in names
    assert any(n.startswith("lorahub/_migrations/versions/0001") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    # Dependencies (torch and friends) come from this test environment, not the network:
    # a .pth line adds its site-packages *after* the venv's own, so lorahub is the wheel's.
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "outer-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = subprocess.run(
        [py, "-c", "import lorahub; print(lorahub.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(str(venv)), where

    home = tmp_path / "home"
    res = subprocess.run(
        [venv / "bin" / "lorahub", "--home", str(home), "ls", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert (home / "lorahub.db").is_file()

    # The wheel's metadata names lorahub-store; `--version` reads the package's own version.
    res = subprocess.run(
        [py, "-c", "import importlib.metadata as md; print(md.version('lorahub-store'))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    import lorahub

    assert res.stdout.strip() == lorahub.__version__
    res = subprocess.run(
        [venv / "bin" / "lorahub", "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"lorahub, version {lorahub.__version__}"

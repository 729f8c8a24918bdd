"""What a published lorahub says about itself: the wheel's metadata (distribution name,
SPDX license and license file, classifiers), the test tooling kept out of it in a dev
dependency group, and the README's install lines that go with them."""

from __future__ import annotations

import email
import re
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import lorahub

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
DIST = "lorahub-store"  # `lorahub` on PyPI is another project: never publish under that name


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from this tree (the same build a `pip install .` does)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    (whl,) = out.glob("*.whl")
    return whl


def _metadata(whl: Path) -> tuple[Message, list[str]]:
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(meta)), names


def test_wheel_names_the_free_distribution_and_keeps_the_import_name(wheel):
    meta, names = _metadata(wheel)
    assert _norm(meta["Name"]) == DIST
    assert wheel.name.startswith("lorahub_store-")
    assert meta["Version"] == lorahub.__version__
    # The import package and the command are still `lorahub`.
    assert "lorahub/__init__.py" in names
    with zipfile.ZipFile(wheel) as z:
        (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "lorahub = lorahub.cli:main" in z.read(entry).decode()


def test_wheel_carries_the_spdx_license_and_the_license_file(wheel):
    meta, names = _metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None  # the free-text field PEP 639 replaced
    (lic,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    with zipfile.ZipFile(wheel) as z:
        assert z.read(lic) == (ROOT / "LICENSE").read_bytes()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # PEP 639: no "License ::" classifier next to a license expression.
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]


def test_wheel_carries_py_typed(wheel):
    if not (ROOT / "lorahub" / "py.typed").is_file():
        pytest.skip("lorahub/py.typed is not in the tree yet")
    meta, names = _metadata(wheel)
    assert "lorahub/py.typed" in names
    assert "Typing :: Typed" in meta.get_all("Classifier")


def test_classifiers_say_posix_and_the_python_versions(wheel):
    meta, _ = _metadata(wheel)
    classifiers = meta.get_all("Classifier") or []
    # fcntl, O_NOFOLLOW, pread/pwrite: POSIX only, tested on Linux.
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert not [c for c in classifiers if "Windows" in c or "OS Independent" in c]
    floor = re.fullmatch(r">=3\.(\d+)", meta["Requires-Python"])
    assert floor, meta["Requires-Python"]
    minors = sorted(
        int(m[1])
        for c in classifiers
        if (m := re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c))
    )
    assert minors and minors[0] == int(floor[1]), (minors, meta["Requires-Python"])
    assert minors == list(range(minors[0], minors[-1] + 1))
    assert any(c.startswith("Topic :: ") for c in classifiers)


def test_test_tooling_is_a_dev_group_not_a_published_extra(wheel):
    meta, _ = _metadata(wheel)
    # The only extras are drivers for the team setup (PostgreSQL, S3), never test tooling.
    assert set(meta.get_all("Provides-Extra") or []) <= {"postgres", "s3"}
    requires = [_norm(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in meta.get_all("Requires-Dist")]
    for tool in ("pytest", "ruff", "mypy", "peft", "transformers"):
        assert tool not in requires

    project = _pyproject()
    assert "test" not in project["project"].get("optional-dependencies", {})
    dev = project["dependency-groups"]["dev"]
    # .ci/run reads the ruff pin from here and runs the dev group's mypy.
    assert any(re.fullmatch(r"ruff==[\d.]+", r) for r in dev), dev
    assert any(re.fullmatch(r"mypy==[\d.]+", r) for r in dev), dev
    assert any(r.startswith("pytest") for r in dev), dev
    ci = (ROOT / ".ci" / "run").read_text()
    assert '["dependency-groups"]["dev"]' in ci and "[test]" not in ci


def test_quickstart_installs_the_dev_group_with_a_pip_that_knows_it():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    first, second = [line for line in block.splitlines() if line.strip()]
    assert "[test]" not in block
    assert "--group dev" in second and "pytest" in second
    # `pip install --group` came in pip 25.1; a fresh venv's pip may be older.
    upgrade = second.index("'pip>=25.1'")
    assert upgrade < second.index("--group dev")
    assert "--group" not in first


def test_no_link_to_the_other_projects_pypi_page(run, tmp_path):
    """Neither the README nor the card lorahub writes points at pypi.org/project/lorahub/,
    which is another project's page."""
    other = re.compile(r"pypi\.org/project/lorahub(?![-_\w])", re.IGNORECASE)
    assert not other.search((ROOT / "README.md").read_text())
    from factories import write_peft_adapter

    run("add", write_peft_adapter(tmp_path / "adapter"), "--name", "a:v1")
    run("export", "a:v1", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert not other.search(card), card


def test_version_flag_needs_no_distribution_named_lorahub(tmp_path):
    from factories import cli_runner

    res = cli_runner(tmp_path)("--version")
    assert res.stdout.strip() == f"lorahub, version {lorahub.__version__}"
    assert "lorahub/_version.py" in _pyproject()["tool"]["hatch"]["version"]["path"]

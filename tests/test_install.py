"""A regular (non-editable) install works: the wheel carries the Alembic revisions."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_install_into_fresh_venv_runs_ls(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (wheel,) = dist.glob("lorahub-*.whl")
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

"""``lorahub add`` killed with SIGKILL at random points leaves a consistent store.

After every kill: ``verify()`` is clean, no catalog row points at a missing blob, every file
under ``blobs/`` hashes to its name (a partial write never sits under a digest name), the
catalog holds the adapter completely or not at all, and re-running the add succeeds with the
digest a clean store gives (DESIGN invariants 1 and 2).

Starting Python and importing torch takes ~2 s here, which would dwarf the ~0.5 s add, so the
commands run in children forked from one "zygote" process that has already imported
everything (:class:`attackkit.Zygote`, shared with the attack tests): each child runs the real
CLI entry point (``lorahub.cli.main``) in its own process, opens its own store, and is killed
at the delay the test asks for. The zygote never opens a store, so no database connection
crosses a fork. The final re-run is a plain ``python -c "from lorahub.cli import main; main()"``
subprocess.
"""

from __future__ import annotations

import collections
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from attackkit import Zygote
from factories import write_peft_adapter
from sqlalchemy import text

import lorahub

# 12 modules of 4096 x 4096 at rank 128, float32: 50.3 MB of weights.
BIG_MODULES = {
    f"model.layers.{i}.self_attn.{p}": (4096, 4096)
    for i in range(4)
    for p in ("q_proj", "k_proj", "v_proj")
}
KILLS = 20  # kills that must land while the add runs
FRESH_KILLS = 4  # more, on fresh stores, spread over the first open (the migration)


def _blob_name(home: Path, path: Path) -> str:
    """``xxh128:<hex>`` from ``blobs/xxh128/ab/<30 hex>``; anything else is a stray file."""
    parts = path.relative_to(home / "blobs").parts
    assert len(parts) == 3 and parts[0] == "xxh128" and len(parts[1]) == 2, f"stray file {path}"
    return f"xxh128:{parts[1]}{parts[2]}"


def check_store(home: Path, expected: str) -> str:
    """Assert every invariant a crash must keep; return what the kill left behind."""
    files = sorted(p for p in (home / "blobs").rglob("*") if p.is_file())
    on_disk = set()
    for p in files:
        name = _blob_name(home, p)
        assert xxhash.xxh3_128_hexdigest(p.read_bytes()) == name[7:], f"partial blob {p}"
        on_disk.add(name)
    with lorahub.open(home) as hub:
        report = hub.verify()
        assert report.ok, report.problems
        with hub.engine.connect() as conn:
            blob_rows = set(conn.execute(text("SELECT digest FROM blobs")).scalars())
            used = set(conn.execute(text("SELECT weights_digest FROM adapters")).scalars())
            n_modules = conn.execute(text("SELECT count(*) FROM adapter_modules")).scalar()
        assert blob_rows <= on_disk and used <= on_disk, "a catalog row points at no blob"
        infos = hub.list_adapters()
    # One transaction: the adapter, its modules and its name appear together or not at all.
    if infos:
        (info,) = infos
        assert info.digest == expected and info.refs == ("big:latest",)
        assert n_modules == len(BIG_MODULES) == info.module_count
        return "committed"
    assert n_modules == 0
    if on_disk:
        return "blob, no row"
    return "temp file" if any((home / "tmp").iterdir()) else "nothing"


@pytest.mark.slow
def test_add_killed_at_random_points_keeps_the_store_consistent(tmp_path):
    src = write_peft_adapter(tmp_path / "big", BIG_MODULES, r=128, alpha=256, seed=7)
    with lorahub.open(tmp_path / "clean") as hub:
        expected = hub.add(src, name="big").adapter.digest
    with lorahub.open(tmp_path / "template") as hub:
        _ = hub.engine  # an empty, migrated catalog to start the warm trials from
    template = tmp_path / "template" / "lorahub.db"

    def new_home(name: str, fresh: bool) -> Path:
        home = tmp_path / name
        home.mkdir()
        if not fresh:
            shutil.copyfile(template, home / "lorahub.db")
        return home

    zygote = Zygote(tmp_path)
    add = ["add", str(src), "-n", "big"]
    rng = random.Random(1234)
    seen: collections.Counter[str] = collections.Counter()
    try:
        # Uninterrupted runs measure how long an add takes here, on a migrated store and on
        # a fresh one (where the first open also creates the catalog).
        duration = {}
        for fresh in (False, True):
            times = []
            for i in range(2):
                home = new_home(f"measure-{fresh}-{i}", fresh)
                out = zygote.run(["--home", str(home), *add])
                assert (out.killed, out.code) == (False, 0), out.output
                assert expected in out.output
                times.append(out.took)
            duration[fresh] = min(times)

        trials = 0
        for fresh, wanted in ((False, KILLS), (True, FRESH_KILLS)):
            killed = 0
            while killed < wanted:
                trials += 1
                assert trials < 3 * (KILLS + FRESH_KILLS), "the add keeps finishing before the kill"
                home = new_home(f"trial-{trials}", fresh)
                # Stratified: the k-th kill lands at a random point of the k-th equal slice of
                # the add's duration, so the kills cover it from start to end.
                delay = (killed + rng.random()) * duration[fresh] / wanted
                out = zygote.run(["--home", str(home), *add], after=delay)
                if not out.killed:
                    # Finished first (the machine got faster): aim by this duration from now on.
                    assert out.code == 0, out.output
                    duration[fresh] = min(duration[fresh], out.took)
                    seen["finished before the kill"] += 1
                    continue
                killed += 1
                seen[check_store(home, expected)] += 1
                # Re-running the add after the crash succeeds and gives the clean digest.
                out = zygote.run(["--home", str(home), *add, "--json"])
                assert (out.killed, out.code) == (False, 0), out.output
                (row,) = json.loads(out.output)
                assert row["status"] in ("added", "present") and row["digest"] == expected
                assert check_store(home, expected) == "committed"
                with lorahub.open(home) as hub:
                    assert hub.gc(grace=0).blobs == ()  # the only blob is in use
                    assert list((home / "tmp").iterdir()) == []  # stray temp files collected
    finally:
        zygote.close()

    # Once more through a plain CLI subprocess, on the last store a kill interrupted.
    cli = [sys.executable, "-c", "from lorahub.cli import main; main()"]
    done = subprocess.run(
        [*cli, "--home", str(home), *add], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout and done.stdout.startswith("present")
    print(f"after each kill: {dict(seen)}; an add took {duration[False]:.2f} s")

"""Several processes on one store at once: every add succeeds, nothing is stored twice, and
no process ever sees "database is locked" (DESIGN invariant 3), even on a fresh store whose
first open runs the Alembic migration in every process at the same moment; gc running in
one process while others add and remove loses nothing that is named. On the SQLite and the
PostgreSQL catalog (conftest.py's ``catalog``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash
from factories import write_peft_adapter

import lorahub

pytestmark = pytest.mark.usefixtures("catalog")

# Each worker does its heavy imports and opens its Hub (lazily: the catalog is first touched
# by the first add), says it is ready, then waits for the start file so all of them begin
# together.
_HUB_WORKER = """
import json, os, sys, time
import torch, safetensors.torch
import lorahub, lorahub.hub, lorahub.formats.peft
home, ready, start, jobs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
hub = lorahub.Hub(home)
open(ready, "w").close()
while not os.path.exists(start):
    time.sleep(0.002)
out = []
for path, name in jobs:
    t0 = time.time()
    r = hub.add(path, name=name)
    out.append({"status": r.status, "digest": r.adapter.digest,
                "weights": r.adapter.weights_digest, "t0": t0, "t1": time.time()})
hub.close()
print(json.dumps(out), flush=True)
os._exit(0)  # skip the slow interpreter shutdown torch brings
"""

# The real CLI (``lorahub.cli.main`` reads sys.argv[1:], which ``-c`` leaves as the
# arguments after the code), behind the same barrier.
_CLI_WORKER = """
import os, sys, time
import torch, safetensors.torch
import lorahub.cli, lorahub.hub, lorahub.formats.peft
ready, start = sys.argv.pop(1), sys.argv.pop(1)
open(ready, "w").close()
while not os.path.exists(start):
    time.sleep(0.002)
from lorahub.cli import main
main()
"""


def _run_together(
    tmp_path: Path, argvs: list[list[str]], stop_last_with: Path | None = None
) -> list[subprocess.CompletedProcess]:
    """Start one process per argv (``{ready}``/``{start}`` filled in), release them at once
    when all are ready, and wait for all; with ``stop_last_with``, the last runs until the
    others are done, then that file tells it to stop."""
    start = tmp_path / "start"
    procs, readies = [], []
    for i, argv in enumerate(argvs):
        ready = tmp_path / f"ready-{i}"
        readies.append(ready)
        fill = {"{ready}": str(ready), "{start}": str(start)}
        argv = [fill.get(a, a) for a in argv]
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in readies):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            outs = [p.communicate() for p in procs]
            raise AssertionError(f"a worker died or hung before the start: {outs}")
        time.sleep(0.01)
    start.touch()
    results = []
    try:
        for i, p in enumerate(procs):
            if stop_last_with is not None and i == len(procs) - 1:
                stop_last_with.touch()
            out, err = p.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:  # only after a timeout: do not leave workers behind
                p.kill()
                p.wait()
    return results


def _check_no_lock_errors(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert "locked" not in (r.stderr + r.stdout).lower(), r.stderr
        assert r.returncode == 0, r.stderr


def _blob_files(home: Path) -> dict[str, int]:
    """Every file under blobs/, checked to hash (independently of lorahub) to its name."""
    files = [p for p in (home / "blobs").rglob("*") if p.is_file()]
    out = {}
    for p in files:
        rel = p.relative_to(home / "blobs" / "xxh128")
        assert len(rel.parts) == 2 and len(rel.parts[0]) == 2, p
        name = rel.parts[0] + rel.parts[1]
        assert xxhash.xxh3_128_hexdigest(p.read_bytes()) == name, f"{p} does not hash to its name"
        out[f"xxh128:{name}"] = p.stat().st_size
    return out


def _lorahub(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``lorahub ARGS`` on ``home`` (from ``LORAHUB_HOME``), as a process of its own."""
    env = {**os.environ, "LORAHUB_HOME": str(home)}
    cmd = [sys.executable, "-c", "from lorahub.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@pytest.mark.slow
@pytest.mark.sqlite_only  # 8 processes, 200 adds: the two tests below cover PostgreSQL for less
def test_many_processes_add_at_once(tmp_path):
    home = tmp_path / "store"  # fresh: every worker's first add races to migrate it
    src = tmp_path / "src"
    # Four workers with 25 adapters of their own each...
    jobs = [
        [
            (str(write_peft_adapter(src / f"w{w}-{j}", seed=1 + 25 * w + j)), f"a{w}-{j}:v1")
            for j in range(25)
        ]
        for w in range(4)
    ]
    shared = str(write_peft_adapter(src / "shared", seed=999, r=8, alpha=16))
    # ...and four adding the same one, each 25 times under its own name, so their first
    # (racing) add and their re-adds overlap the other workers' adds.
    jobs += [[(shared, f"shared:w{w}")] * 25 for w in range(4)]
    argvs = [
        [sys.executable, "-c", _HUB_WORKER, str(home), "{ready}", "{start}", json.dumps(j)]
        for j in jobs
    ]

    results = _run_together(tmp_path, argvs)

    _check_no_lock_errors(results)
    outs = [json.loads(r.stdout) for r in results]
    # They really ran at the same time: every worker's first add started before any finished
    # its last.
    assert max(o[0]["t0"] for o in outs) < min(o[-1]["t1"] for o in outs)
    own = [x for o in outs[:4] for x in o]
    assert [x["status"] for x in own] == ["added"] * 100
    assert len({x["digest"] for x in own}) == 100
    same = [x for o in outs[4:] for x in o]
    assert len({x["digest"] for x in same}) == 1
    assert sorted(x["status"] for x in same) == ["added"] + ["present"] * 99

    blobs = _blob_files(home)
    weights = {x["weights"] for x in own + same}
    assert set(blobs) == weights and len(blobs) == 101  # one file per digest
    assert list((home / "tmp").iterdir()) == []
    with lorahub.open(home) as hub:
        infos = hub.list_adapters()
        assert len(infos) == 101
        assert {i.digest for i in infos} == {x["digest"] for x in own + same}
        shared_info = hub.get("shared:w0")
        assert set(shared_info.refs) == {f"shared:w{w}" for w in range(4)}
        report = hub.verify()
        assert report.ok, report.problems
        assert (report.checked_blobs, report.checked_adapters) == (101, 101)


@pytest.mark.slow
@pytest.mark.fresh_catalog  # on PostgreSQL too, the first opens race to migrate it
def test_cli_adds_at_once_on_a_fresh_store(tmp_path):
    home = tmp_path / "fresh"
    src = tmp_path / "src"
    shared = write_peft_adapter(src / "shared", seed=50)
    own = [write_peft_adapter(src / f"c{i}", seed=60 + i) for i in range(4)]
    cli = [sys.executable, "-c", _CLI_WORKER, "{ready}", "{start}", "--home", str(home)]
    argvs = [[*cli, "add", str(d), str(shared), "--json"] for d in own]

    results = _run_together(tmp_path, argvs)

    _check_no_lock_errors(results)
    rows = [x for r in results for x in json.loads(r.stdout)]
    assert len(rows) == 8
    by_source = {}
    for x in rows:
        assert x["status"] in ("added", "present") and x["digest"], x
        by_source.setdefault(x["source"], []).append(x)
    assert sorted(x["status"] for x in by_source[str(shared)]) == ["added"] + ["present"] * 3
    assert len({x["digest"] for x in by_source[str(shared)]}) == 1
    assert all([x["status"] for x in by_source[str(d)]] == ["added"] for d in own)
    assert len(_blob_files(home)) == 5
    # Four processes set the shared adapter's default name at once: still one name each.
    with lorahub.open(home) as hub:
        assert sorted(len(i.refs) for i in hub.list_adapters()) == [1] * 5
    ls = _lorahub(home, "ls", "-q")
    assert ls.returncode == 0, ls.stderr
    assert sorted(ls.stdout.split()) == sorted({"@" + x["digest"] for x in rows})
    assert len(ls.stdout.split()) == 5
    verify = _lorahub(home, "verify")
    assert verify.returncode == 0, verify.stderr
    assert "5 blobs, 5 adapters: ok" in verify.stdout


# Adds adapters, removing every other one again at once (garbage for gc to take), behind the
# barrier; prints what it kept.
_ADD_RM_WORKER = """
import json, os, sys, time
import torch, safetensors.torch
import lorahub, lorahub.hub, lorahub.formats.peft
home, ready, start, jobs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
hub = lorahub.Hub(home)
open(ready, "w").close()
while not os.path.exists(start):
    time.sleep(0.002)
kept = []
for i, (path, name) in enumerate(jobs):
    info = hub.add(path, name=name).adapter
    if i % 2:
        hub.remove(name)
    else:
        kept.append([name, info.digest, info.weights_digest])
hub.close()
print(json.dumps(kept), flush=True)
os._exit(0)
"""

# Runs gc with no grace, again and again, until the stop file appears; prints how often and
# what it freed. With force: an add between its blob and its manifest has a blob nothing
# accounts for yet, which gc takes (the add writes it again); without, gc would refuse
# while those are most of the store, as it does over a lost catalog.
_GC_WORKER = """
import json, os, sys, time
import lorahub, lorahub.hub
home, ready, start, stop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
hub = lorahub.Hub(home)
open(ready, "w").close()
while not os.path.exists(start):
    time.sleep(0.002)
runs, freed = 0, []
while not os.path.exists(stop) or runs < 2:
    freed += hub.gc(grace=0, force=True).blobs
    runs += 1
hub.close()
print(json.dumps({"runs": runs, "freed": freed}), flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_gc_racing_adds_and_removes_loses_nothing_named(tmp_path):
    """Two processes add adapters and remove every other one while a third runs gc with no
    grace in a loop: every adapter still named is listed, its blob there and whole; every
    removed one's blob is freed by a later gc; verify finds nothing wrong."""
    home = tmp_path / "store"
    lorahub.open(home).close()  # the catalog exists before the race; its rows do not
    src = tmp_path / "src"
    jobs = [
        [
            (str(write_peft_adapter(src / f"w{w}-{j}", seed=100 + 10 * w + j)), f"w{w}-{j}:v1")
            for j in range(8)
        ]
        for w in range(2)
    ]
    stop = tmp_path / "stop"
    argvs = [
        [sys.executable, "-c", _ADD_RM_WORKER, str(home), "{ready}", "{start}", json.dumps(j)]
        for j in jobs
    ]
    argvs.append([sys.executable, "-c", _GC_WORKER, str(home), "{ready}", "{start}", str(stop)])

    results = _run_together(tmp_path, argvs, stop_last_with=stop)

    _check_no_lock_errors(results)
    kept = [x for r in results[:2] for x in json.loads(r.stdout)]
    gc = json.loads(results[2].stdout)
    assert gc["runs"] >= 2 and len(kept) == 8
    with lorahub.open(home) as hub:
        infos = {i.digest: i for i in hub.list_adapters()}
        assert set(infos) == {digest for _, digest, _ in kept}
        for name, digest, _ in kept:
            assert hub.get(name).digest == digest
            assert hub.load(name) is not None  # its blob is there and hashes to its name
        hub.gc(grace=0)  # what the racing gc left of the removed adapters
        assert set(_blob_files(home)) == {weights for _, _, weights in kept}
        report = hub.verify()
        assert report.ok, report.problems
        assert (report.checked_blobs, report.checked_adapters) == (8, 8)

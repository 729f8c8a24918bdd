"""Several processes on one store at once: every add succeeds, nothing is stored twice, and
no process ever sees "database is locked" (DESIGN invariant 3), even on a fresh store whose
first open runs the Alembic migration in every process at the same moment."""

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


def _run_together(tmp_path: Path, argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start one process per argv (``{ready}``/``{start}`` filled in), release them at once
    when all are ready, and wait for all."""
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
        for p in procs:
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

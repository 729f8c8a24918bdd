"""Store benchmarks: add throughput against a durable file copy, catalog lookup latency, and
blob throughput to S3.

(a) ``Hub.add`` of a ~100 MB PEFT adapter (safetensors) against ``shutil.copyfile`` + fsync
    of the same weights file; median of several runs, each into a fresh store (created and
    migrated before the clock starts). Target: add within 1.5x of the copy.
(b) ``Hub.get`` by ``name:tag`` and by 12-hex digest prefix, ``Hub.list_adapters`` with and
    without filters (limit 50), and the ``lorahub ls --limit 50`` command as a subprocess, with
    10,000 and 100,000 adapters in the catalog. Target: resolve p99 under 5 ms at 100,000.
(c) The CLI as users run it, each command a fresh subprocess (interpreter start included),
    at every count of (b): ``ls`` (all adapters), ``ls --json``, ``show NAME``, ``resolve NAME
    --base BASE`` (a base recorded in the catalog, so no file is read), ``ls --limit 50``, and
    the imports alone (the floor under every one of them: SQLAlchemy is most of it). Medians
    and best runs of wall and CPU time. Targets at 10,000 adapters (median wall): ``ls``
    under 0.6 s, ``ls --json`` under 1 s, ``show`` and ``resolve`` under 0.3 s. With
    ``--big-configs N``, N more adapters whose config carries ~50 MB of extra keys are added
    afterwards and ``ls --json`` is timed again (a listing must not parse what it does not
    print).

(d) The catalog on SQLite beside PostgreSQL, in the same run: the lookups of (b) (resolve
    by ``name:tag`` and by 12-hex prefix, two listings) at 100,000 adapters in each, the same
    rows in both. PostgreSQL is a throwaway local cluster (``tests/pgkit.py``: needs the
    PostgreSQL 15 server programs and the ``postgres`` extra), reached over TCP on 127.0.0.1.
(e) Blobs on S3 (``LORAHUB_BLOBS_URL``) beside a local file copy, in the same run: a blob of
    ``--blob-mb`` random bytes uploaded by the store (``put_file``: hashed locally, sent to a
    temp key in parts, copied server-side to its digest key) and downloaded into an empty
    cache (``checked_path``: streamed, hashed as it arrives), beside boto3's own
    ``upload_file``/``download_file`` of the same file (the client's floor) and
    ``copyfile`` + fsync. The server is moto's (``tests/s3kit.py``, the ``s3`` extra) on
    127.0.0.1: a Python process holding every object in memory, far slower than a real S3
    service, so these figures bound lorahub's overhead, not what S3 itself gives.

Filling a catalog with 100,000 adapters through ``Hub.add`` would take hours, so part (b)
uses a fast path of its own (``bulk_insert``): one real adapter is added through ``Hub.add``,
then its manifest is varied (rank, alpha, target modules, seed in the metadata) to make
distinct, realistic manifests, each with its true digest, 8 rows in ``adapter_modules`` and a
``name-<i>:v1`` ref, all pointing at that one real blob, inserted with SQLAlchemy Core
``executemany`` in one transaction. The rows are what ``Hub.add`` writes, minus the per-row
ORM work.

Usage:
    .venv/bin/python benchmarks/bench_store.py                 # both parts
    .venv/bin/python benchmarks/bench_store.py add --size-mb 100 --runs 5
    .venv/bin/python benchmarks/bench_store.py catalog --counts 10000 100000
    .venv/bin/python benchmarks/bench_store.py catalog --counts 10000 --lookups 50 --big-configs 3
    .venv/bin/python benchmarks/bench_store.py backends --backend-count 100000
    .venv/bin/python benchmarks/bench_store.py s3 --blob-mb 256 --blob-runs 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

# Run from a checkout without installing: make ``import lorahub`` find the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lorahub
from lorahub.digest import canonical_json, hash_bytes, short

MB = 1e6


# ---------------------------------------------------------------------------- helpers


def write_adapter(path: Path, size_mb: float, dtype: str, r: int = 64, seed: int = 0) -> int:
    """A PEFT adapter directory of Llama-7B-shaped modules, about ``size_mb`` of weights.

    Returns the size of ``adapter_model.safetensors`` in bytes.
    """
    import torch
    from safetensors.torch import save_file

    shapes = {  # module leaf -> (in, out), Llama-2-7B
        "q_proj": (4096, 4096),
        "k_proj": (4096, 4096),
        "v_proj": (4096, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (4096, 11008),
        "up_proj": (4096, 11008),
        "down_proj": (11008, 4096),
    }
    tdtype = {"float32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    total, layer = 0, 0
    while total < size_mb * MB:
        for leaf, (fin, fout) in shapes.items():
            part = "mlp" if leaf in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{part}.{leaf}"
            sd[key + ".lora_A.weight"] = (torch.randn(r, fin, generator=g) * 0.01).to(tdtype)
            sd[key + ".lora_B.weight"] = (torch.randn(fout, r, generator=g) * 0.01).to(tdtype)
            total += (r * fin + fout * r) * sd[key + ".lora_A.weight"].element_size()
            if total >= size_mb * MB:
                break
        layer += 1
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": sorted(shapes),
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return (path / "adapter_model.safetensors").stat().st_size


def durable_copy(src: Path, dst: Path) -> None:
    """The baseline: copy, fsync the file, fsync its directory (what a blob write promises)."""
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed2(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of this process; on a busy machine the wall p99 includes time
    other processes held the CPU, the CPU p99 does not."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1e3:6.2f}  p99 {p99(xs) * 1e3:6.2f} ms"


# ---------------------------------------------------------------------------- (a) add


def bench_add(work: Path, size_mb: float, runs: int, dtype: str) -> None:
    src = work / "adapter"
    size = write_adapter(src, size_mb, dtype)
    weights = src / "adapter_model.safetensors"
    print(f"== add: {size / MB:.1f} MB PEFT adapter ({dtype}), {runs} runs, fresh store each")
    copy_t, add_t = [], []
    for i in range(runs):
        dst = work / f"copy-{i}"
        dst.mkdir()
        copy_t.append(timed(lambda dst=dst: durable_copy(weights, dst / weights.name)))
        shutil.rmtree(dst)
        home = work / f"store-{i}"
        hub = lorahub.Hub(home)
        _ = hub.engine  # create and migrate before the clock starts
        add_t.append(timed(lambda hub=hub: hub.add(src, name="bench:v1")))
        hub.close()
        shutil.rmtree(home)
    copy_s, add_s = statistics.median(copy_t), statistics.median(add_t)
    print(f"copy+fsync   {size / MB / copy_s:8.1f} MB/s   (median {copy_s * 1e3:.0f} ms)")
    print(f"hub.add      {size / MB / add_s:8.1f} MB/s   (median {add_s * 1e3:.0f} ms)")
    verdict = "ok" if add_s <= 1.5 * copy_s else "MISSED"
    print(f"add / copy   {add_s / copy_s:8.2f}x        (target <= 1.50x: {verdict})")


def profile_add(work: Path, size_mb: float, dtype: str) -> None:
    """Where one add spends its time (cProfile, top functions by cumulative time)."""
    import cProfile
    import pstats

    src = work / "adapter-prof"
    write_adapter(src, size_mb, dtype)
    hub = lorahub.Hub(work / "store-prof")
    _ = hub.engine
    prof = cProfile.Profile()
    prof.runcall(hub.add, src, name="bench:v1")
    hub.close()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


# ---------------------------------------------------------------------------- (b) catalog

LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (4, 8, 16, 32, 64)


def writing(hub: lorahub.Hub):
    """A transaction holding the catalog's write lock, as lorahub's own writes do (on
    PostgreSQL any other transaction is read-only)."""
    return hub.engine.execution_options(lorahub_write=True).begin()


def bulk_insert(hub: lorahub.Hub, template: dict, start: int, stop: int) -> None:
    """Insert adapters ``start..stop-1`` straight into the catalog (the documented fast path).

    Every row points at the weights blob of ``template`` (a real manifest of an adapter
    added through ``Hub.add``); its manifest differs in rank, alpha, targets and a seed, and
    its digest is the true digest of that manifest.
    """
    from sqlalchemy import insert

    from lorahub.catalog.models import Adapter, AdapterModule, Ref

    rng = random.Random(start)
    base_name = template["base"].get("name")
    t0 = datetime(2026, 1, 1)
    adapters, modules, refs = [], [], []
    for i in range(start, stop):
        rank = RANKS[rng.randrange(len(RANKS))]
        alpha = float(rank * rng.choice((1, 2)))
        pair = rng.sample(LEAVES, 2)
        names = [f"model.layers.{layer}.self_attn.{leaf}" for layer in range(4) for leaf in pair]
        manifest = dict(template)
        manifest["config"] = {
            **template["config"],
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(pair),
        }
        manifest["modules"] = {
            n: {"kind": "linear", "in": 4096, "out": 4096, "r": rank, "alpha": alpha}
            | {"shape": [4096, 4096]}
            for n in names
        }
        manifest["metadata"] = {"seed": str(i)}
        text = canonical_json(manifest).decode()
        aid = i + 1_000_000  # explicit ids: modules and refs need no round trip
        created = t0 + timedelta(seconds=i)
        adapters.append(
            {
                "id": aid,
                "digest": str(hash_bytes(text.encode())),
                "manifest": text,
                "weights_digest": template["weights"]["digest"],
                "size": template["weights"]["size"],
                "rank": rank,
                "alpha": alpha,
                "use_rslora": False,
                "use_dora": False,
                "targets": ",".join(sorted(pair)),
                "module_count": len(names),
                "base_name": base_name,
                "base_revision": None,
                "base_signature": None,
                "base_content_hash": None,
                "base_id": None,
                "origin_kind": "import",
                "origin": json.dumps({"format": "peft-safetensors", "path": f"/runs/{i}"}),
                "created_at": created,
            }
        )
        modules.extend(
            {
                "adapter_id": aid,
                "module": n,
                "leaf": n.rsplit(".", 1)[-1],
                "kind": "linear",
                "in_features": 4096,
                "out_features": 4096,
                "rank": rank,
                "alpha": alpha,
            }
            for n in names
        )
        refs.append(
            {
                "name": f"name-{i}",
                "tag": "v1",
                "variant": base_name or "",
                "adapter_id": aid,
                "created_at": created,
            }
        )
    with writing(hub) as conn:
        conn.execute(insert(Adapter.__table__), adapters)
        conn.execute(insert(AdapterModule.__table__), modules)
        conn.execute(insert(Ref.__table__), refs)


def explain(hub: lorahub.Hub, what: Callable[[], object]) -> list[tuple[str, str]]:
    """The SQL statements ``what`` runs, each with SQLite's EXPLAIN QUERY PLAN."""
    from sqlalchemy import event

    seen: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(hub.engine, "before_cursor_execute", grab)
    try:
        what()
    finally:
        event.remove(hub.engine, "before_cursor_execute", grab)
    out = []
    raw = hub.engine.raw_connection()
    try:
        for statement, params in seen:
            rows = raw.cursor().execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
            out.append((" ".join(statement.split()), "; ".join(r[-1] for r in rows)))
    finally:
        raw.close()
    return out


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("lorahub")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from lorahub.cli import main; main()"]


def lookups_for(hub: lorahub.Hub, count: int, n: int) -> dict[str, list[Callable[[], object]]]:
    """``n`` calls of each measured kind, on random adapters."""
    from sqlalchemy import text

    rng = random.Random(count)
    names = [f"name-{rng.randrange(count)}:v1" for _ in range(n)]
    with hub.engine.connect() as conn:
        digests = list(conn.execute(text("SELECT digest FROM adapters")).scalars())
    prefixes = [short(d) for d in rng.sample(digests, n)]
    return {
        "get name:tag": [lambda x=x: hub.get(x) for x in names],
        "get 12-hex prefix": [lambda x=x: hub.get(x) for x in prefixes],
        "list rank=16 target=q_proj": [
            lambda: hub.list_adapters(["rank=16", "target=q_proj"], limit=50)
        ]
        * n,
        "list limit=50": [lambda: hub.list_adapters(limit=50)] * n,
    }


def measure(label: str, calls: list[Callable[[], object]]) -> None:
    for c in calls[:5]:
        c()  # warm the page cache, the connection pool and the statement cache
    gc.collect()
    wall, cpu = zip(*(timed2(c) for c in calls), strict=True)
    print(f"{label:<28} wall {ms(list(wall))}   cpu {ms(list(cpu))}")


def measure_catalog(hub: lorahub.Hub, count: int, n: int, show_plans: bool) -> None:
    print(f"== catalog: {count:,} adapters, {n} calls each (median and p99)")
    for label, calls in lookups_for(hub, count, n).items():
        measure(label, calls)
        if show_plans:
            for sql, plan in explain(hub, calls[0]):
                print(f"    SQL  {sql[:150]}{'...' if len(sql) > 150 else ''}")
                print(f"    PLAN {plan}")
    assert len(hub.list_adapters(["rank=16", "target=q_proj"], limit=50)) == 50
    measure_cli(hub, count)


# Targets (seconds of wall time, interpreter start included) at 10,000 adapters.
CLI_TARGETS = {"ls": 0.6, "ls --json": 1.0, "show": 0.3, "resolve --base": 0.3}


# What every command that opens the catalog imports before it does anything: the floor
# under each figure of (c).
STARTUP = "import lorahub.cli.store, lorahub.hub"


def run_cli(
    hub: lorahub.Hub, args: list[str], runs: int = 5, cmd: list[str] | None = None
) -> tuple[list[float], list[float], str]:
    """Wall and CPU seconds of each of ``runs`` runs of ``lorahub --home HOME *args`` (or of
    ``cmd``) as a subprocess, and the last run's stdout."""
    cmd = cmd or [*cli_command(), "--home", str(hub.home), *args]
    walls, cpus, out = [], [], ""
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(cmd)}` failed: {done.stderr}")
        out = done.stdout
    return walls, cpus, out


def print_cli(label: str, walls: list[float], cpus: list[float], count: int) -> None:
    """Median and best of wall and CPU time (on a shared machine the best run is the one
    least slowed by other processes), and the verdict against the target."""
    wall = statistics.median(walls)
    target = CLI_TARGETS.get(label)
    verdict = ""
    if target is not None and count == 10_000:
        verdict = f"  (target < {target:.1f} s: {'ok' if wall < target else 'MISSED'})"
    times = (
        f"wall median {wall * 1e3:5.0f} best {min(walls) * 1e3:5.0f} ms   "
        f"cpu median {statistics.median(cpus) * 1e3:5.0f} best {min(cpus) * 1e3:5.0f} ms"
    )
    print(f"CLI {label:<24} {times}{verdict}")


def measure_cli(hub: lorahub.Hub, count: int) -> None:
    """(c): the commands users type, each a fresh process (start-up included)."""
    name = f"name-{count // 2}:v1"
    walls, cpus, out = run_cli(hub, ["ls"])
    assert len(out.splitlines()) == count + 2, "ls must list every adapter (+ header, real:v1)"
    print_cli("ls", walls, cpus, count)
    walls, cpus, out = run_cli(hub, ["ls", "--json"])
    assert len(json.loads(out)) == count + 1
    print_cli("ls --json", walls, cpus, count)
    walls, cpus, out = run_cli(hub, ["show", name])
    assert name in out
    print_cli("show", walls, cpus, count)
    walls, cpus, out = run_cli(hub, ["resolve", name, "--base", BENCH_BASE])
    assert name in out and "(compatible)" in out, out
    print_cli("resolve --base", walls, cpus, count)
    walls, cpus, _ = run_cli(hub, ["ls", "--limit", "50"])
    print_cli("ls --limit 50", walls, cpus, count)
    walls, cpus, _ = run_cli(hub, [], cmd=[sys.executable, "-c", STARTUP])
    print_cli("start-up (imports only)", walls, cpus, count)


BENCH_BASE = "bench-base"


def record_base(hub: lorahub.Hub) -> None:
    """A base every bulk-inserted adapter fits, recorded straight in the catalog (its
    tensor table only: resolve by a recorded name reads no file)."""
    from sqlalchemy import insert

    from lorahub.catalog.models import BaseModelRow

    table = sorted(
        [f"model.layers.{layer}.self_attn.{leaf}.weight", "BF16", [4096, 4096]]
        for layer in range(4)
        for leaf in LEAVES
    )
    table.append(["model.embed_tokens.weight", "BF16", [32000, 4096]])
    with writing(hub) as conn:
        conn.execute(
            insert(BaseModelRow.__table__),
            {
                "name": BENCH_BASE,
                "path": None,
                "repo_id": None,
                "revision": None,
                "signature": str(hash_bytes(canonical_json(table))),
                "content_hash": None,
                "tensor_count": len(table),
                "total_bytes": 2 * sum(a * b for _, _, (a, b) in table),
                "tensor_table": json.dumps(table, separators=(",", ":")),
                "created_at": datetime(2026, 1, 1),
            },
        )


def bench_big_configs(hub: lorahub.Hub, template: dict, have: int, n: int) -> None:
    """``n`` more adapters whose config holds ~50 MB of extra keys; ``ls --json`` again."""
    big = {**template, "config": {**template["config"], "notes": "x" * 50_000_000}}
    t0 = time.perf_counter()
    bulk_insert(hub, big, have, have + n)
    print(f"(bulk-inserted {n} adapters with a 50 MB config in {time.perf_counter() - t0:.1f} s)")
    walls, cpus, out = run_cli(hub, ["ls", "--json"], runs=3)
    assert len(json.loads(out)) == have + n + 1
    print_cli(f"ls --json (+{n} x 50 MB)", walls, cpus, have)
    walls, cpus, _ = run_cli(hub, ["ls"], runs=3)
    print_cli(f"ls (+{n} x 50 MB)", walls, cpus, have)


# The index proposed for lorahub/catalog/models.py (see --try-index): ``rank = ?`` then
# ``ORDER BY created_at DESC, id DESC`` walks it in order (id is the rowid every index ends
# with) and stops at the limit, instead of sorting every adapter of that rank.
PROPOSED_INDEX = (
    "CREATE INDEX IF NOT EXISTS ix_adapters_rank_created_at ON adapters (rank, created_at)"
)


def try_index(hub: lorahub.Hub, count: int, n: int) -> None:
    label = "list rank=16 target=q_proj"
    calls = lookups_for(hub, count, n)[label]
    with hub.engine.begin() as conn:
        conn.exec_driver_sql(PROPOSED_INDEX)
    print(f"== with the proposed index (adapters: rank, created_at), {count:,} adapters")
    measure(label, calls)
    _, plan = explain(hub, calls[0])[0]
    print(f"    PLAN {plan}")


def bench_catalog(
    work: Path,
    counts: list[int],
    lookups: int,
    show_plans: bool,
    with_index: bool,
    big_configs: int = 0,
) -> None:
    hub = lorahub.Hub(work / "catalog-store")
    src = work / "one-adapter"
    write_adapter(src, 0.5, "float32", r=8)
    template = hub.add(src, name="real:v1").adapter.manifest
    record_base(hub)
    have = 0
    for count in sorted(counts):
        t0 = time.perf_counter()
        bulk_insert(hub, template, have, count)
        print(
            f"(bulk-inserted {count - have:,} adapters, {8 * (count - have):,} module rows "
            f"in {time.perf_counter() - t0:.1f} s)"
        )
        have = count
        measure_catalog(hub, count, lookups, show_plans)
    if with_index:
        try_index(hub, have, lookups)
    if big_configs:
        bench_big_configs(hub, template, have, big_configs)
    hub.close()


# ---------------------------------------------------------------------------- (d) backends


def backend_catalog(home: Path, url: str | None, count: int) -> lorahub.Hub:
    """A store at ``home`` whose catalog is at ``url`` (None: its SQLite file), holding
    ``count`` bulk-inserted adapters besides one real one."""
    os.environ.pop("LORAHUB_DATABASE_URL", None)
    if url is not None:
        os.environ["LORAHUB_DATABASE_URL"] = url
    try:
        hub = lorahub.Hub(home)
        _ = hub.engine  # the settings are read and the catalog opened while the URL is set
    finally:
        os.environ.pop("LORAHUB_DATABASE_URL", None)
    src = home.parent / f"{home.name}-adapter"
    write_adapter(src, 0.5, "float32", r=8)
    template = hub.add(src, name="real:v1").adapter.manifest
    t0 = time.perf_counter()
    for start in range(0, count, 10_000):
        bulk_insert(hub, template, start, min(count, start + 10_000))
    if hub.engine.dialect.name == "postgresql":
        with hub.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")  # what autovacuum does soon after a load
    print(
        f"({hub.engine.dialect.name}: bulk-inserted {count:,} adapters, {8 * count:,} module "
        f"rows in {time.perf_counter() - t0:.1f} s)"
    )
    return hub


def bench_backends(work: Path, count: int, n: int) -> None:
    """(d): the same catalog on SQLite and on PostgreSQL, the lookups of (b) on each."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import pgkit

    cluster = pgkit.start()
    try:
        server = subprocess.run(
            [str(pgkit.bin_dir() / "postgres"), "--version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"== SQLite and PostgreSQL ({server}, local, TCP): {count:,} adapters, {n} calls")
        rows: dict[str, dict[str, list[float]]] = {}
        for label, url in (("sqlite", None), ("postgresql", cluster.create_database())):
            hub = backend_catalog(work / f"backend-{label}", url, count)
            rows[label] = {}
            for what, calls in lookups_for(hub, count, n).items():
                for c in calls[:5]:
                    c()
                gc.collect()
                rows[label][what] = [timed(c) for c in calls]
            hub.close()
        whats = list(rows["sqlite"])
        print(f"{'catalog':<12}" + "".join(f"{w:>30}" for w in whats))
        for label, by in rows.items():
            cells = [
                f"p50 {statistics.median(by[w]) * 1e3:5.2f} p99 {p99(by[w]) * 1e3:6.2f} ms"
                for w in whats
            ]
            print(f"{label:<12}" + "".join(f"{c:>30}" for c in cells))
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------- (e) S3 blobs


def bench_s3(work: Path, size_mb: int, runs: int) -> None:
    """(e): a blob up to and down from moto's S3 server through the store and through
    boto3 alone, beside a local durable copy; medians of ``runs``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import s3kit

    from lorahub.digest import hash_file
    from lorahub.s3blobs import S3BlobStore

    src = work / "s3-blob.bin"
    with open(src, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
    size = src.stat().st_size
    digest, _ = hash_file(src)
    with s3kit.s3_server() as server:
        os.environ.update(server.env())
        bucket = server.bucket()
        os.environ["LORAHUB_BLOBS_URL"] = f"s3://{bucket}/bench"
        try:
            hub = lorahub.Hub(work / "s3-home")
        finally:
            os.environ.pop("LORAHUB_BLOBS_URL")
        blobs, client = hub.blobs, server.client()
        assert isinstance(blobs, S3BlobStore)
        part = blobs.location.part_size
        print(
            f"== blobs: {size / MB:.0f} MB, {runs} runs (median), moto S3 server on 127.0.0.1 "
            f"(in-memory, single process: slow), part size {part >> 20} MiB"
        )

        def local() -> None:
            dst = work / "copy.bin"
            dst.unlink(missing_ok=True)
            durable_copy(src, dst)

        def put() -> None:
            blobs.delete(digest)  # an upload every run, not a duplicate check
            blobs.put_file(lambda p: shutil.copyfile(src, p))

        def get() -> None:
            blobs.path(digest).unlink(missing_ok=True)  # an empty cache
            blobs.checked_path(digest)

        def raw_put() -> None:
            client.upload_file(str(src), bucket, "raw/blob", Config=blobs._transfer())

        def raw_get() -> None:
            out = work / "raw.bin"
            out.unlink(missing_ok=True)
            client.download_file(bucket, "raw/blob", str(out), Config=blobs._transfer())

        rows = [
            ("copyfile + fsync", local),
            ("boto3 upload_file", raw_put),
            ("store upload (put_file)", put),
            ("boto3 download_file", raw_get),
            ("store download (fetch)", get),
        ]
        for label, fn in rows:
            secs = statistics.median(timed(fn) for _ in range(runs))
            print(f"{label:<26} {size / MB / secs:8.1f} MB/s   (median {secs:.2f} s)")
        hub.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "part", nargs="?", choices=("add", "catalog", "backends", "s3", "all"), default="all"
    )
    ap.add_argument("--size-mb", type=float, default=100, help="adapter size for (a)")
    ap.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    ap.add_argument("--runs", type=int, default=5, help="runs of (a); the median is shown")
    ap.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument(
        "--backend-count", type=int, default=100_000, help="adapters in each catalog of (d)"
    )
    ap.add_argument("--blob-mb", type=int, default=256, help="blob size for (e), in MiB")
    ap.add_argument("--blob-runs", type=int, default=3, help="runs of (e); the median is shown")
    ap.add_argument("--plans", action="store_true", help="print EXPLAIN QUERY PLAN for (b)")
    ap.add_argument("--profile", action="store_true", help="cProfile one add in (a)")
    ap.add_argument(
        "--try-index",
        action="store_true",
        help="after (b), add the proposed (rank, created_at) index and measure again",
    )
    ap.add_argument(
        "--big-configs",
        type=int,
        default=0,
        metavar="N",
        help="after (b)/(c), add N adapters with a 50 MB config and time `ls --json` again",
    )
    ap.add_argument("--workdir", help="where stores are made (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (to inspect them)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorahub-bench-", dir=args.workdir))
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}")
        if args.part in ("add", "all"):
            bench_add(work, args.size_mb, args.runs, args.dtype)
            if args.profile:
                profile_add(work, args.size_mb, args.dtype)
        if args.part in ("catalog", "all"):
            bench_catalog(
                work, args.counts, args.lookups, args.plans, args.try_index, args.big_configs
            )
        if args.part in ("backends", "all"):
            bench_backends(work, args.backend_count, args.lookups)
        if args.part in ("s3", "all"):
            bench_s3(work, args.blob_mb, args.blob_runs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

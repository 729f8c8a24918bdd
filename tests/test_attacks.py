"""Attacks on a store through the real CLI (issue 10, "From the attack runs"), each scenario
counting its trials and violations:

1. SIGKILL of every mutating command at random moments (add, rm, tag, gc, compose, merge,
   merged get, fsck);
2. writers adding and removing adapters while ``gc --grace 0`` runs in a loop;
3. damage: changed bytes in blobs, one changed byte in the catalog's weights index, a
   deleted or truncated ``lorahub.db``, a truncated WAL;
4. ``gc`` stopped by SIGKILL and by SIGINT (Ctrl-C) in the middle of deleting many blobs.

After each attack the store must pass ``lorahub verify`` (or, where a kill left the catalog
behind the store's records, ``lorahub fsck`` then ``verify``), the checks of
:func:`attackkit.store_problems` (which share no code with lorahub's), keep every name and
adapter whose command had finished, and change nothing else. Commands run in processes forked
from a preloaded one (:class:`attackkit.Zygote`), so a trial costs the command, not the
Python start.

The default counts keep this file near a minute on two cores; ``LORAHUB_ATTACK_TRIALS=22``
runs 22 times as many trials, and ``LORAHUB_ATTACK_SEED`` picks other random choices.
``pytest -s`` prints one line per scenario, such as
``ATTACK sigkill-gc: 4 trials (3 killed, 1 uninterrupted), 0 violations``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from attackkit import (
    Outcome,
    Snapshot,
    Zygote,
    age_manifests,
    corrupt_index,
    flip_bytes,
    named_files,
    snapshot,
    store_problems,
    trials,
    write_tiny_adapter,
    write_tiny_base,
)
from factories import write_peft_adapter

import lorahub

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the attacks fork and signal processes"),
]

POOL = 12  # source adapters, shared by the scenarios
ANY = "*"  # an expected digest that cannot be known beforehand (a composition's)


@dataclass
class World:
    root: Path
    pool: list[Path]
    base: Path
    digest: dict[Path, str]  # source folder -> adapter digest
    weights: dict[Path, str]  # source folder -> weights blob digest


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("attack-logs"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("attack-world")
    pool = [write_peft_adapter(root / "src" / f"s{i:02d}", seed=100 + i) for i in range(POOL)]
    digest, weights = {}, {}
    with lorahub.open(root / "reference-store") as hub:  # the digests a clean store gives
        for src in pool:
            info = hub.add(src).adapter
            digest[src], weights[src] = info.digest, info.weights_digest
    return World(root, pool, write_tiny_base(root / "base"), digest, weights)


class Cli:
    """``lorahub --home HOME ...`` through the zygote."""

    def __init__(self, zygote: Zygote, home: Path) -> None:
        self.zygote, self.home = zygote, home

    def argv(self, *args: object) -> list[str]:
        return ["--home", str(self.home), *map(str, args)]

    def __call__(self, *args: object, after: float | None = None, sig: int = signal.SIGKILL):
        return self.zygote.run(self.argv(*args), after=after, sig=sig)

    def ok(self, *args: object) -> Outcome:
        """Run a command that must succeed."""
        out = self(*args)
        assert out.code == 0 and "Traceback" not in out.output, str(out)
        return out


class Tally:
    """Trials and violations of one scenario, printed as one ``ATTACK`` line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.trials = 0
        self.counts: Counter[str] = Counter()
        self.violations: list[str] = []

    def violation(self, what: str) -> None:
        self.violations.append(f"[{self.name} trial {self.trials}] {what}")

    def line(self) -> str:
        extra = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return (
            f"ATTACK {self.name}: {self.trials} trials{f' ({extra})' if extra else ''}, "
            f"{len(self.violations)} violations"
        )


def _finish(tallies: list[Tally]) -> None:
    for t in tallies:
        print(t.line())
    found = [v for t in tallies for v in t.violations]
    assert not found, f"{len(found)} violation(s):\n" + "\n".join(found[:30])


def _rng(scenario: int) -> random.Random:
    return random.Random(int(os.environ.get("LORAHUB_ATTACK_SEED") or 0) * 100 + scenario)


def _traceback(tally: Tally, out: Outcome) -> None:
    if "Traceback" in out.output:
        tally.violation(f"a traceback: {out}")


def settle(cli: Cli, tally: Tally, *, lag_allowed: bool) -> bool:
    """``verify`` as it answers once adds in flight would have ended; when its only
    problems are adapters the store's files hold and the catalog lacks (a kill between the
    manifest and the commit), ``fsck`` then ``verify`` must be clean. True when fsck ran."""
    age_manifests(cli.home)
    first = cli("verify")
    _traceback(tally, first)
    if first.code == 0:
        return False
    bad = [line for line in first.output.splitlines() if line.startswith("BAD ")]
    if not lag_allowed or not bad or any("catalog does not" not in line for line in bad):
        tally.violation(f"verify after the attack: {first}")
        return False
    tally.counts["catalog behind the records, fixed by fsck"] += 1
    repaired = cli("fsck")
    again = cli("verify")
    if repaired.code != 0 or again.code != 0:
        tally.violation(f"fsck did not repair what verify found: {repaired}\nthen {again}")
    return True


# ------------------------------------------------------------------ 1. SIGKILL everywhere


@dataclass
class Expect:
    """What one command may change: ``names`` it sets (to a digest or ANY) or drops (None),
    adapters it may drop, and adapters it may add (None: any one)."""

    names: dict[str, str | None] = field(default_factory=dict)
    may_drop: set[str] = field(default_factory=set)
    may_add: set[str] | None = field(default_factory=set)


@dataclass
class Plan:
    argv: list[object]
    expect: Expect
    check: Callable[[Snapshot, bool], list[str]] | None = None  # (after, finished) -> problems


def _judge(
    before: Snapshot,
    after: Snapshot,
    expect: Expect,
    finished: bool,
    resurrect: dict[str, set[str]],
    resurrect_adapters: set[str],
) -> list[str]:
    """Every change of the catalog outside what the command may do; with ``finished``,
    also what it must have done. ``resurrect*``: what earlier killed commands may bring
    back through a later ``fsck``."""
    problems = []
    for ref in sorted(set(before.refs) | set(after.refs)):
        was, now = before.refs.get(ref), after.refs.get(ref)
        if ref in expect.names:
            target = expect.names[ref]
            if finished and (now is None if target == ANY else now != target):
                problems.append(f"finished, but {ref} is {now}, not {target}")
            elif now != was and not (now == target or (target == ANY and now is not None)):
                problems.append(f"{ref} went from {was} to {now}; allowed: {target}")
        elif now != was and not (
            was is None and (now in resurrect.get(ref, ()) or ANY in resurrect.get(ref, ()))
        ):
            problems.append(f"{ref} went from {was} to {now}, which the command does not touch")
    lost = set(before.adapters) - set(after.adapters) - expect.may_drop
    if lost:
        problems.append(f"adapters lost: {sorted(lost)}")
    new = set(after.adapters) - set(before.adapters) - resurrect_adapters
    if expect.may_add is None:
        if len(new) > 1:
            problems.append(f"more than one new adapter: {sorted(new)}")
    elif new - expect.may_add:
        problems.append(f"unexpected new adapters: {sorted(new - expect.may_add)}")
    if finished:
        for d in expect.may_add or ():
            if d not in after.adapters:
                problems.append(f"finished, but adapter {d} is not in the catalog")
    return problems


def _merge_output_problems(out: Path, allowed: set[str], finished: bool) -> list[str]:
    """A ``merge -o`` output is absent (only before any merge finished) or complete."""
    if not out.exists():
        return [f"{out} is missing after a finished merge"] if finished else []
    try:
        meta = json.loads((out / "lorahub.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{out} is there but incomplete: {exc}"]
    problems = [f"{out}/{f} is missing" for f in meta.get("files", []) if not (out / f).is_file()]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        if len(list(f.keys())) != 5:
            problems.append(f"{out}/model.safetensors has {len(list(f.keys()))} tensors, not 5")
    merged = meta["adapters"][0]["digest"]
    if merged not in allowed:
        problems.append(f"{out} holds a merge of {merged}, expected one of {sorted(allowed)}")
    return problems


def _plan(cmd: str, rng: random.Random, snap: Snapshot, world: World, home: Path) -> Plan | None:
    names = sorted(snap.refs)
    if cmd == "add":
        src = rng.choice(world.pool)
        name = f"p{rng.randrange(8)}:v1"  # sometimes moves a name from another adapter
        d = world.digest[src]
        return Plan(["add", src, "-n", name], Expect({name: d}, may_add={d}))
    if not names:
        return None
    if cmd == "rm":
        if rng.random() < 0.3:  # by digest: the adapter and all its names
            d = rng.choice(sorted(snap.adapters))
            refs = {r: None for r, x in snap.refs.items() if x == d}
            return Plan(["rm", "-y", f"@{d}"], Expect(refs, may_drop={d}))  # type: ignore[arg-type]
        name = rng.choice(names)
        d = snap.refs[name]
        alone = all(r == name for r, x in snap.refs.items() if x == d)
        return Plan(["rm", "-y", name], Expect({name: None}, may_drop={d} if alone else set()))
    if cmd == "tag":
        src, new = rng.choice(names), f"t{rng.randrange(4)}:v1"
        return Plan(["tag", src, new], Expect({new: snap.refs[src]}))
    if cmd == "gc":
        return Plan(["gc", "--grace", "0"], Expect())
    if cmd == "fsck":
        return Plan(["fsck"], Expect())
    if cmd == "compose":
        pairs = [(a, b) for a in names for b in names if snap.refs[a] < snap.refs[b]]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        name = f"c{rng.randrange(3)}:v1"
        return Plan(["compose", a, b, "-n", name], Expect({name: ANY}, may_add=None))
    if cmd == "merge":
        name = rng.choice(names)
        out = home.parent / "merged-out"
        previous = set()
        if (out / "lorahub.json").is_file():
            previous = {json.loads((out / "lorahub.json").read_text())["adapters"][0]["digest"]}
        allowed = previous | {snap.refs[name]}
        argv = ["merge", world.base, name, "-o", out, "--force", "-q", "--device", "cpu"]
        return Plan(
            argv,
            Expect(),
            lambda after, finished: _merge_output_problems(
                out, {snap.refs[name]} if finished else allowed, finished
            ),
        )
    if cmd == "merged":
        chosen = rng.sample(names, k=min(len(names), rng.choice((1, 2))))
        weights = ",".join(str(rng.choice((0.25, 0.5, 1.0, 1.5))) for _ in chosen)
        argv = ["merged", "get", world.base, *chosen, "-w", weights, "-q", "--device", "cpu"]
        return Plan(argv, Expect())
    raise AssertionError(cmd)


COMMANDS = ("add", "rm", "tag", "gc", "compose", "merge", "merged", "fsck")
KILLS = 3  # per command, by default


def test_sigkill_of_every_mutating_command_keeps_the_store_sound(zygote, world, tmp_path):
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    rng = _rng(1)
    for i in range(6):
        cli.ok("add", world.pool[i], "-n", f"p{i}:v1")
    tallies = {c: Tally(f"sigkill-{c}") for c in COMMANDS}
    wanted = trials(KILLS)
    killed: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    duration: dict[str, float] = {}
    resurrect: dict[str, set[str]] = defaultdict(set)  # names a killed command may yet set
    resurrect_adapters: set[str] = set()

    def trial(cmd: str, plan: Plan, after: float | None) -> None:
        tally = tallies[cmd]
        tally.trials += 1
        before = snapshot(home)
        out = cli(*plan.argv, after=after)
        _traceback(tally, out)
        finished = not out.killed
        if finished:
            if out.code != 0:
                tally.violation(f"the command failed: {out}")
            duration[cmd] = min(duration.get(cmd, out.took), out.took)
            tally.counts["finished before the kill" if after is not None else "uninterrupted"] += 1
        else:
            killed[cmd] += 1
            tally.counts["killed"] += 1
        # Only what writes a manifest before its commit can leave the catalog behind.
        fsck_ran = settle(cli, tally, lag_allowed=not finished and cmd in ("add", "compose"))
        after_snap = snapshot(home)
        for p in _judge(
            before,
            after_snap,
            plan.expect,
            finished and out.code == 0,
            resurrect if fsck_ran or cmd == "fsck" else {},
            resurrect_adapters if fsck_ran or cmd == "fsck" else set(),
        ):
            tally.violation(f"{p} after `{' '.join(map(str, plan.argv))}`")
        for p in store_problems(home, after_snap):
            tally.violation(p)
        if plan.check:
            for p in plan.check(after_snap, finished and out.code == 0):
                tally.violation(p)
        if not finished:
            # Its journal lines may stand without its commit (fsck may replay them), or its
            # commit without their confirmation (fsck keeps what an unconfirmed removal took).
            for ref, target in plan.expect.names.items():
                if target is not None and after_snap.refs.get(ref) != target:
                    resurrect[ref].add(target)
                elif target is None and ref in before.refs and ref not in after_snap.refs:
                    resurrect[ref].add(before.refs[ref])
            resurrect_adapters.update(plan.expect.may_add or ())
            resurrect_adapters.update(plan.expect.may_drop - set(after_snap.adapters))

    # Each command once to the end: it works, and how long it takes says when to kill it.
    for cmd in COMMANDS:
        plan = _plan(cmd, rng, snapshot(home), world, home)
        assert plan is not None
        trial(cmd, plan, None)
    while any(killed[c] < wanted for c in COMMANDS):
        cmd = rng.choice([c for c in COMMANDS if killed[c] < wanted])
        plan = _plan(cmd, rng, snapshot(home), world, home)
        if plan is None:  # nothing to remove or compose: add something first
            cmd, plan = "add", _plan("add", rng, snapshot(home), world, home)
        attempts[cmd] += 1
        assert attempts[cmd] <= 8 * wanted + 8, f"`{cmd}` keeps finishing before its kill"
        # Stratified: the k-th kill lands in the k-th slice of the command's duration.
        k = killed[cmd] % wanted
        before_kills = killed[cmd]
        trial(cmd, plan, (k + rng.random()) * duration[cmd] * 1.1 / wanted)  # type: ignore[arg-type]
        if killed[cmd] == before_kills:
            # It ran faster than its first run (a warmer cache, a quieter machine): aim earlier.
            duration[cmd] *= 0.75

    # Nothing is left behind that gc cannot collect: temp files, merge leftovers.
    final = Tally("sigkill-leftovers")
    final.trials = 1
    cli.ok("gc", "--grace", "0")
    stale = re.compile(r"\.(partial|old|evicted)-")
    left = [p.name for p in (home / "tmp").iterdir()]
    left += [p.name for p in (home / "merged").iterdir() if stale.search(p.name)]
    cli.ok("add", world.pool[0], "-n", "p0:v1")
    cli.ok("merge", world.base, "p0:v1", "-o", tmp_path / "merged-out", "--force", "-q")
    left += [p.name for p in tmp_path.iterdir() if stale.search(p.name)]
    if left:
        final.violation(f"left behind after gc and a merge: {left}")
    _finish([*tallies.values(), final])


# ------------------------------------------------------------------ 2. writers and gc


WRITERS = 3


WRITER_MODULES = {f"model.layers.{i}.self_attn.q_proj": (512, 512) for i in range(4)}


def test_concurrent_writers_with_gc_at_grace_zero_lose_nothing(zygote, world, tmp_path):
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    cli.ok("add", world.pool[-1], "-n", "keep:v1")
    rng = _rng(2)
    tally = Tally("concurrent-writers-gc")
    ops = trials(8)
    # 1 MB adapters: their temp files live long enough for a careless gc to take one.
    own = {
        w: [
            write_peft_adapter(tmp_path / "src" / f"w{w}-{j}", WRITER_MODULES, r=32, seed=w * 4 + j)
            for j in range(4)
        ]
        for w in range(WRITERS)
    }
    digest, weights = {}, {}
    with lorahub.open(tmp_path / "reference-store") as hub:
        for src in (s for srcs in own.values() for s in srcs):
            info = hub.add(src).adapter
            digest[str(src)], weights[str(src)] = info.digest, info.weights_digest
    model: dict[str, str] = {"keep:v1": world.digest[world.pool[-1]]}
    done = Counter()
    running: dict[int, tuple[int | None, list[object], str | None, str | None]] = {}

    def start_writer(w: int) -> None:
        mine = [n for n in model if n.startswith(f"w{w}-")]
        if mine and rng.random() < 0.4:
            name = rng.choice(sorted(mine))
            argv: list[object] = ["rm", "-y", name]
            running[zygote.spawn(cli.argv(*argv))] = (w, argv, name, None)
        else:
            j = rng.randrange(4)
            src, name = own[w][j], f"w{w}-{j}:v1"
            argv = ["add", src, "-n", name]
            running[zygote.spawn(cli.argv(*argv))] = (w, argv, name, str(src))

    def start_gc() -> None:
        running[zygote.spawn(cli.argv("gc", "--grace", "0"))] = (None, ["gc"], None, None)

    for w in range(WRITERS):
        start_writer(w)
    start_gc()
    gcs = 0
    while running:
        out = zygote.wait_any()
        w, argv, name, src = running.pop(out.pid)
        if "locked" in out.output.lower():
            tally.violation(f'"database is locked": {out}')
        _traceback(tally, out)
        if w is None:
            gcs += 1
            if out.code != 0:
                tally.violation(f"gc failed: {out}")
            if any(done[x] < ops for x in range(WRITERS)):
                start_gc()
            continue
        tally.trials += 1
        done[w] += 1
        if out.code != 0:
            tally.violation(f"a writer's command failed: {out}")
        elif src is None:
            tally.counts["removes"] += 1
            model.pop(name, None)  # type: ignore[arg-type]
        else:
            tally.counts["adds"] += 1
            model[name] = digest[src]  # type: ignore[index]
            # Right after the add returned: its blob is there, whole, and named.
            snap = snapshot(home)
            if snap.refs.get(name) != model[name]:  # type: ignore[arg-type]
                tally.violation(f"{name} is {snap.refs.get(name)} right after its add")  # type: ignore[arg-type]
            for p in store_problems(home, snap):
                if weights[src] in p or digest[src] in p:
                    tally.violation(f"right after {argv}: {p}")
        if done[w] < ops:
            start_writer(w)
    tally.counts["gc runs"] = gcs

    settle(cli, tally, lag_allowed=False)
    snap = snapshot(home)
    if snap.refs != model:
        tally.violation(f"names: expected {model}, found {snap.refs}")
    for p in store_problems(home, snap):
        tally.violation(p)
    cli.ok("gc", "--grace", "0")
    snap = snapshot(home)
    for p in store_problems(home, snap):
        tally.violation(f"after a last gc: {p}")
    if snap.refs != model:
        tally.violation(f"names after a last gc: expected {model}, found {snap.refs}")
    _finish([tally])


# ------------------------------------------------------------------ 3. damage


@pytest.fixture(scope="module")
def damage_template(zygote, world, tmp_path_factory) -> Path:
    """A store with six named adapters (one with a second name) and one removed."""
    home = tmp_path_factory.mktemp("damage") / "store"
    cli = Cli(zygote, home)
    for i in range(7):
        cli.ok("add", world.pool[i], "-n", f"d{i}:v1")
    cli.ok("tag", "d0:v1", "d0:prod")
    cli.ok("rm", "-y", "d6:v1")
    return home


def _copy_store(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


def _named_path(root: Path, digest: str) -> Path:
    hexpart = digest.split(":")[1]
    return root / "xxh128" / hexpart[:2] / hexpart[2:]


def _blob_path(home: Path, digest: str) -> Path:
    return _named_path(home / "blobs", digest)


def _damage_blob(cli: Cli, tally: Tally, world: World, rng: random.Random, repair: str) -> None:
    home = cli.home
    i = rng.randrange(6)
    src, name = world.pool[i], f"d{i}:v1"
    blob = _blob_path(home, world.weights[src])
    blob.chmod(0o644)  # read-only in the store; the damage does not ask
    if rng.random() < 0.25:
        blob.write_bytes(blob.read_bytes()[: rng.randrange(blob.stat().st_size)])
        tally.counts["truncated"] += 1
    else:
        flip_bytes(blob, rng, rng.randint(1, 4))
        tally.counts["bytes changed"] += 1
    found = cli("verify")
    _traceback(tally, found)
    if found.code == 0 or world.weights[src] not in found.output:
        tally.violation(f"verify missed the damaged blob {world.weights[src]}: {found}")
    used = cli("export", name, home.parent / f"export-{tally.trials}")
    _traceback(tally, used)
    if used.code == 0:
        tally.violation(f"a damaged blob was exported without an error: {used}")
    fix = cli("add", src, "-n", name) if repair == "add" else cli("fsck")
    _traceback(tally, fix)
    if fix.code != 0:
        tally.violation(f"`{repair}` did not repair the blob: {fix}")
    settle(cli, tally, lag_allowed=False)


def _damage_index(cli: Cli, tally: Tally, world: World, rng: random.Random) -> None:
    home = cli.home
    where = corrupt_index(home / "lorahub.db", "ix_adapters_weights_digest", rng)
    gc = cli("gc", "--grace", "0")
    _traceback(tally, gc)
    tally.counts["gc refused" if gc.code else "gc ran"] += 1
    if gc.code and "fsck" not in gc.output:
        tally.violation(f"gc on a damaged index failed without naming fsck ({where}): {gc}")
    _check_live_blobs(tally, world, home, f"gc after {where}")
    found = cli("verify")
    if found.code == 0:
        tally.counts["verify missed the damage"] += 1  # an index SQLite still finds sound
    fix = cli("fsck")
    _traceback(tally, fix)
    if fix.code != 0:
        tally.violation(f"fsck could not repair {where}: {fix}")
    again = cli("gc", "--grace", "0")
    if again.code != 0:
        tally.violation(f"gc after fsck repaired the index: {again}")


def _lose_catalog(cli: Cli, tally: Tally, world: World, rng: random.Random, how: str) -> None:
    home = cli.home
    db = home / "lorahub.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if how == "deleted":
        db.unlink()
        gone = True
    else:
        full = db.stat().st_size
        size = 0 if rng.random() < 0.3 else rng.randrange(full)
        with open(db, "r+b") as f:
            f.truncate(size)
        gone = size == 0
        tally.counts["cut to 0 bytes" if gone else "cut short"] += 1
    for argv in (["ls"], ["gc", "--grace", "0"]):
        out = cli(*argv)
        _traceback(tally, out)
        if out.code == 0 and gone:
            tally.violation(f"`{argv[0]}` ran on a catalog that is {how}: {out}")
        elif out.code == 0:
            tally.counts[f"{argv[0]} ran on the cut catalog"] += 1
        elif "fsck" not in out.output:
            tally.violation(f"`{argv[0]}` on a {how} catalog does not name fsck: {out}")
    _check_live_blobs(tally, world, home, f"gc on a {how} catalog")
    fix = cli("fsck")
    _traceback(tally, fix)
    if fix.code != 0:
        tally.violation(f"fsck could not rebuild a {how} catalog: {fix}")


def _check_live_blobs(tally: Tally, world: World, home: Path, after: str) -> None:
    """The template's live blobs, checked by hand: the catalog itself is suspect here."""
    for i in range(6):
        blob = _blob_path(home, world.weights[world.pool[i]])
        if not blob.is_file():
            tally.violation(f"{after} deleted the live blob {blob.name}")


def _truncate_wal(cli: Cli, tally: Tally, world: World, rng: random.Random) -> dict[str, str]:
    """Adds commit into the WAL while another connection keeps it from being checkpointed;
    that process dies, and the WAL loses its tail (a power cut before the disk had it)."""
    home = cli.home
    db = home / "lorahub.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1])\n"
            "c.execute('SELECT count(*) FROM adapters').fetchall()\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        added = {}
        for j in rng.sample(range(6, POOL), 3):
            name = f"wal{j}:v1"
            cli.ok("add", world.pool[j], "-n", name)
            added[name] = world.digest[world.pool[j]]
        cli.ok("tag", "d1:v1", "d1:wal")
        added["d1:wal"] = world.digest[world.pool[1]]
    finally:
        holder.kill()
        holder.wait()
    wal = Path(f"{db}-wal")
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        f.truncate(rng.randrange(32, size))
    lost = cli("ls", "-q")
    _traceback(tally, lost)
    return added


DAMAGE = ("blob-add", "blob-fsck", "index", "db-deleted", "db-truncated", "wal-truncated")


def test_damaged_blobs_and_catalog_are_found_and_repaired(zygote, world, damage_template, tmp_path):
    template_snap = snapshot(damage_template)
    tallies = []
    rng = _rng(3)
    for kind in DAMAGE:
        tally = Tally(f"damage-{kind}")
        tallies.append(tally)
        for n in range(trials(2 if kind.startswith("blob") else 1)):
            tally.trials += 1
            home = _copy_store(damage_template, tmp_path / f"{kind}-{n}" / "store")
            cli = Cli(zygote, home)
            expected = dict(template_snap.refs)
            if kind == "blob-add":
                _damage_blob(cli, tally, world, rng, "add")
            elif kind == "blob-fsck":
                _damage_blob(cli, tally, world, rng, "fsck")
            elif kind == "index":
                _damage_index(cli, tally, world, rng)
            elif kind.startswith("db-"):
                _lose_catalog(cli, tally, world, rng, kind[3:])
            else:
                expected.update(_truncate_wal(cli, tally, world, rng))
                # gc before anyone repairs: the blobs of adds the WAL lost must stay.
                gc = cli("gc", "--grace", "0")
                _traceback(tally, gc)
                for name, d in expected.items():
                    src = next(s for s in world.pool if world.digest[s] == d)
                    if not _blob_path(home, world.weights[src]).is_file():
                        tally.violation(f"gc deleted the blob of {name}, lost from the WAL")
                age_manifests(home)
                if cli("verify").code != 0:
                    tally.counts["adds lost from the WAL, restored by fsck"] += 1
                fix = cli("fsck")
                if fix.code != 0:
                    tally.violation(f"fsck after a truncated WAL: {fix}")
            settle(cli, tally, lag_allowed=False)
            snap = snapshot(home)
            for p in store_problems(home, snap):
                tally.violation(p)
            if snap.refs != expected:
                missing = {k: v for k, v in expected.items() if snap.refs.get(k) != v}
                extra = {k: v for k, v in snap.refs.items() if k not in expected}
                tally.violation(f"names differ after repair: missing {missing}, extra {extra}")
    _finish(tallies)


# ------------------------------------------------------------------ 4. gc interrupted


GARBAGE = 60  # removed tiny adapters: a blob and a manifest each for gc to delete


@dataclass
class Garbage:
    home: Path  # the template store
    blobs: list[str]  # garbage blob digests, in the order gc deletes them
    manifests: list[str]  # the removed adapters' digests, likewise
    live: Snapshot


@pytest.fixture(scope="module")
def garbage_template(zygote, world, tmp_path_factory) -> Garbage:
    """A store with four live adapters and GARBAGE removed ones."""
    root = tmp_path_factory.mktemp("garbage")
    pile = root / "pile"
    for i in range(GARBAGE):
        write_tiny_adapter(pile / f"g{i:03d}", seed=1000 + i)
    home = root / "store"
    cli = Cli(zygote, home)
    for i in range(4):
        cli.ok("add", world.pool[i], "-n", f"live{i}:v1")
    cli.ok("add", "-r", pile)
    full = snapshot(home)
    cli.ok("rm", "-y", *(f"g{i:03d}" for i in range(GARBAGE)))
    live = snapshot(home)
    blobs = sorted(set(full.adapters.values()) - set(live.adapters.values()))
    manifests = sorted(set(full.adapters) - set(live.adapters))
    assert len(blobs) == len(manifests) == GARBAGE
    return Garbage(home, blobs, manifests, live)


def test_gc_stopped_mid_deletion_leaves_verify_clean(zygote, garbage_template, tmp_path):
    garbage = garbage_template
    live = garbage.live
    rng = _rng(4)
    kill = Tally("gc-sigkill-mid-deletion")
    intr = Tally("gc-sigint-mid-deletion")
    plan = [(kill, signal.SIGKILL)] * trials(4) + [(intr, signal.SIGINT)] * trials(2)
    rng.shuffle(plan)
    for n, (tally, sig) in enumerate(plan):
        tally.trials += 1
        home = _copy_store(garbage.home, tmp_path / f"trial-{n}" / "store")
        cli = Cli(zygote, home)
        # gc deletes blobs, then manifests, each in digest order: the signal goes as soon as
        # a file picked at random is gone, so the stops spread over the whole deletion.
        files = [_blob_path(home, d) for d in garbage.blobs]
        files += [_named_path(home / "manifests", d) for d in garbage.manifests]
        target = rng.choice(files)
        pid = zygote.spawn(cli.argv("gc", "--grace", "0"))
        if _wait_gone(target, pid, 60):
            os.kill(pid, sig)  # not reaped until zygote.wait: still the gc's pid
        out = zygote.wait(pid)
        _traceback(tally, out)
        if sig == signal.SIGINT and not out.killed and out.code not in (0, 130):
            tally.violation(f"Ctrl-C did not end gc cleanly: {out}")
        left = sum(p.is_file() for p in files)
        tally.counts[
            "finished first"
            if not out.killed and out.code == 0
            else "stopped mid-deletion"
            if 0 < left < len(files)
            else "stopped, nothing deleted"
            if left
            else "stopped after the deletions"
        ] += 1
        settle(cli, tally, lag_allowed=False)
        snap = snapshot(home)
        for p in store_problems(home, snap):
            tally.violation(p)
        if snap.refs != live.refs or snap.adapters != live.adapters:
            tally.violation(f"the catalog changed: {snap.refs} != {live.refs}")
        # A second gc finishes the job: only the live blobs and manifests stay.
        again = cli("gc", "--grace", "0")
        if again.code != 0:
            tally.violation(f"gc after the interrupted one failed: {again}")
        blobs = set(named_files(home / "blobs"))
        manifests = set(named_files(home / "manifests"))
        if blobs != set(live.adapters.values()):
            tally.violation(
                f"after a second gc, blobs {sorted(blobs ^ set(live.adapters.values()))}"
            )
        if manifests != set(live.adapters):
            tally.violation(
                f"after a second gc, manifests {sorted(manifests ^ set(live.adapters))}"
            )
        for p in store_problems(home):
            tally.violation(f"after a second gc: {p}")
    _finish([kill, intr])


def _wait_gone(path: Path, pid: int, timeout: float) -> bool:
    """Spin until ``path`` is gone (True) or process ``pid`` has ended (False)."""
    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{pid}/stat")
    n = 0
    while os.path.exists(path):
        n += 1
        if n % 2000 == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} was never deleted")
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


# ------------------------------------------------------------------ replaying the records


def test_fsck_replays_removals_exactly(zygote, world, tmp_path):
    """A catalog rebuilt from the journal has what the catalog had: the names of an adapter
    removed by digest do not move to the next adapter that reuses its row id, and removed
    adapters stay removed (and, once gc took their files, are not reported as lost)."""
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    keep, gone, later, dropped = (world.pool[i] for i in range(4))
    cli.ok("add", keep, "-n", "keep")
    cli.ok("add", gone, "-n", "x")
    cli.ok("tag", "x", "y")
    cli.ok("rm", "-y", f"@{world.digest[gone]}")  # one "rm" event, no "untag"
    cli.ok("add", later, "-n", "w")
    expected = {"keep:latest": world.digest[keep], "w:latest": world.digest[later]}
    assert snapshot(home).refs == expected
    _drop_catalog(home)
    cli.ok("fsck")
    assert snapshot(home).refs == expected
    cli.ok("add", dropped, "-n", "z")
    cli.ok("rm", "-y", "z")
    cli.ok("gc", "--grace", "0")  # takes the removed adapters' blobs and manifests
    assert "0 repair(s); ok" in cli.ok("fsck").output
    _drop_catalog(home)
    cli.ok("fsck")
    assert snapshot(home).refs == expected
    assert cli("verify").code == 0


def _drop_catalog(home: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{home / 'lorahub.db'}{suffix}").unlink(missing_ok=True)


_DIE_AFTER_JOURNAL = """
import os, signal, sys
import lorahub.records as records
real = records.Records.append
def append_then_die(self, events):
    ids = real(self, events)
    os.kill(os.getpid(), signal.SIGKILL)  # the journal has the lines, the catalog no commit
records.Records.append = append_then_die
from lorahub.cli import main
main()
"""


def test_an_rm_killed_before_its_commit_survives_a_catalog_rebuild(zygote, world, tmp_path):
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    cli.ok("add", world.pool[0], "-n", "keep")
    cli.ok("add", world.pool[1], "-n", "x")
    died = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_JOURNAL, "--home", str(home), "rm", "-y", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    held = snapshot(home).refs
    assert held["x:latest"] == world.digest[world.pool[1]]  # the rm did not commit
    assert cli("verify").code == 0
    _drop_catalog(home)
    cli.ok("fsck")
    assert snapshot(home).refs == held  # the catalog that was lost held x


_DIE_IN_RMTREE = """
import os, shutil, signal, sys
def rmtree_then_die(path, *args, **kwargs):
    os.unlink(os.path.join(path, "lorahub.json"))  # the first file rmtree happened to take
    os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = rmtree_then_die
from lorahub.cli import main
main()
"""


_DIE_AFTER_COMMIT = """
import os, signal, sys
import lorahub.records as records
def commit_then_die(self, ids):
    os.kill(os.getpid(), signal.SIGKILL)  # the catalog committed; the journal has no word
records.Records.commit = commit_then_die
from lorahub.cli import main
main()
"""


def _die_after_commit(home: Path, *argv: str) -> None:
    """Run ``lorahub *argv``, killed right after its catalog commit: the journal never
    hears that the commit happened."""
    died = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_COMMIT, "--home", str(home), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr


def test_a_move_whose_confirmation_was_lost_is_not_a_conflict(zygote, world, tmp_path):
    """Seen in CI: a compose killed between its commit and the journal's confirmation left
    the catalog right and the journal's last confirmed word older; fsck reported a conflict
    and failed on every later run."""
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    first, second = world.pool[0], world.pool[1]
    cli.ok("add", first, "-n", "x")
    cli.ok("add", second, "-n", "y")
    _die_after_commit(home, "tag", "y", "x")
    assert snapshot(home).refs["x:latest"] == world.digest[second]  # the move committed
    out = cli.ok("fsck")
    assert "NOT RECOVERED" not in out.output
    assert snapshot(home).refs["x:latest"] == world.digest[second]
    cli.ok("tag", "x", "z")  # a confirmed event later on the same name changes nothing
    assert cli.ok("fsck").code == 0


@pytest.mark.parametrize("removal", ["x", "@second"])
def test_a_name_moved_without_confirmation_then_removed_stays_removed(
    zygote, world, tmp_path, removal
):
    """Seen in CI: an add killed after its commit moved a name without the journal's word;
    removing the name later left the journal's older target standing, and fsck brought the
    name back pointing at the adapter it had left."""
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    first, second = world.pool[0], world.pool[1]
    cli.ok("add", first, "-n", "x")
    cli.ok("add", second, "-n", "y")
    _die_after_commit(home, "tag", "y", "x")
    assert snapshot(home).refs["x:latest"] == world.digest[second]
    target = "@" + world.digest[second] if removal == "@second" else removal
    cli.ok("rm", "-y", target)
    assert "x:latest" not in snapshot(home).refs
    out = cli.ok("fsck")
    assert "NOT RECOVERED" not in out.output
    assert "x:latest" not in snapshot(home).refs, out.output
    assert cli("verify").code == 0


def test_a_removal_killed_after_its_commit_never_brings_back_an_older_target(
    zygote, world, tmp_path
):
    """Seen in a stress run: a move and then the name's removal both lost their
    confirmation; fsck restored the name pointing at the adapter it had before the move.
    The removal's writer read the moved name, so the move had committed."""
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    first, second = world.pool[0], world.pool[1]
    cli.ok("add", first, "-n", "x")
    cli.ok("add", second, "-n", "y")
    _die_after_commit(home, "tag", "y", "x")
    _die_after_commit(home, "rm", "-y", "x")
    assert "x:latest" not in snapshot(home).refs
    out = cli.ok("fsck")
    # An unconfirmed removal may be undone (doubt keeps data), but only to what it removed.
    assert snapshot(home).refs.get("x:latest") in (None, world.digest[second]), out.output
    assert cli("verify").code == 0


def test_a_name_moved_to_an_adapter_since_removed_and_collected_stays_removed(
    zygote, world, tmp_path
):
    """Seen in a stress run, with no kill at all: a name moved onto an adapter that was
    then removed and collected by gc; the replay could not read the move (the adapter's
    record was gone) and fsck restored the name pointing at its first adapter."""
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    first, second = world.pool[0], world.pool[1]
    cli.ok("add", first, "-n", "x")
    cli.ok("add", second, "-n", "y")
    cli.ok("add", second, "-n", "x")  # x moves to the adapter y names
    cli.ok("rm", "-y", "@" + world.digest[second])
    cli.ok("gc", "--grace", "0")
    assert "x:latest" not in snapshot(home).refs
    out = cli.ok("fsck")
    assert "x:latest" not in snapshot(home).refs, out.output
    assert cli("verify").code == 0


def test_a_gc_killed_while_deleting_a_merged_folder_leaves_merged_get_working(
    zygote, world, tmp_path
):
    """A merged folder the catalog does not list (its ``merged get`` was killed before the
    row) is collected by gc; a gc killed half-way through deleting it must not leave a
    half-deleted folder under the key's name, which ``merged get`` would refuse."""
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    cli.ok("add", world.pool[0], "-n", "x")
    path = Path(
        cli.ok("merged", "get", world.base, "x", "-q", "--device", "cpu").output.split()[-1]
    )
    con = sqlite3.connect(home / "lorahub.db")
    con.execute("DELETE FROM merged")  # as a kill between the publish and the row leaves it
    con.commit()
    con.close()
    died = subprocess.run(
        [sys.executable, "-c", _DIE_IN_RMTREE, "--home", str(home), "gc", "--grace", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    again = cli.ok("merged", "get", world.base, "x", "-q", "--device", "cpu")
    assert Path(again.output.split()[-1]) == path and (path / "lorahub.json").is_file()
    cli.ok("gc", "--grace", "0")
    assert sorted(p.name for p in path.parent.iterdir() if p.name != ".locks") == [path.name]


_INTERRUPT_IN_CLOSE = """
import sqlalchemy.engine.default as default
def do_close(self, connection):
    connection.close()
    raise KeyboardInterrupt  # Ctrl-C lands while the pool closes the connection
default.DefaultDialect.do_close = do_close
from lorahub.cli import main
main()
"""


def test_ctrl_c_while_the_catalog_closes_prints_no_traceback(tmp_path):
    """Seen once in 44 SIGINTs of gc: the Ctrl-C landed as the command closed its catalog
    connection, and SQLAlchemy's pool logged it with a traceback."""
    home = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_IN_CLOSE, "--home", str(home), "gc", "--grace", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130 and done.stderr == "Interrupted.\n", done.stderr


_PAUSE_BEFORE_ROW = """
import os, sys, time
import lorahub.catalog.merged as merged
real = merged.insert
def insert_when_told(session, info):
    open(os.environ["PUBLISHED"], "w").close()  # the folder is in place, its row is not
    while not os.path.exists(os.environ["GO_ON"]):
        time.sleep(0.01)
    return real(session, info)
merged.insert = insert_when_told
from lorahub.cli import main
main()
"""


def test_gc_at_grace_zero_keeps_a_merged_checkpoint_in_flight(zygote, world, tmp_path):
    """`merged get` publishes its folder, then records it; a gc between the two must not
    take the folder (whatever the grace), or `merged get` prints a path that is gone."""
    home = tmp_path / "store"
    cli = Cli(zygote, home)
    cli.ok("add", world.pool[0], "-n", "x")
    published, go_on = tmp_path / "published", tmp_path / "go-on"
    argv = ["--home", str(home), "merged", "get", str(world.base), "x", "-q", "--device", "cpu"]
    get = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_BEFORE_ROW, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PUBLISHED": str(published), "GO_ON": str(go_on)},
    )
    try:
        deadline = time.monotonic() + 120
        while not published.exists():
            assert get.poll() is None and time.monotonic() < deadline, get.communicate()
            time.sleep(0.01)
        gc = cli.ok("gc", "--grace", "0")
    finally:
        go_on.touch()
        out, err = get.communicate(timeout=120)
    assert get.returncode == 0, err
    path = Path(out.split()[-1])
    assert (path / "lorahub.json").is_file(), gc.output
    assert store_problems(home) == []

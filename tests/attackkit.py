"""Tools for the attack tests (``tests/test_attacks.py``, and ``tests/test_crash.py``'s
kills): run the real CLI in processes that can be signalled at chosen moments, and check a
store with code that shares nothing with lorahub's own ``verify``.

Starting Python and importing torch costs ~2 s here, more than most commands take, so every
command runs in a child forked from one "zygote" that has imported everything. Each child runs
``lorahub.cli.main`` in its own process and opens its own store; the zygote never opens one, so
no database connection crosses a fork. A child is reaped only when the test asks (``wait``), so
its pid cannot be reused before a signal lands.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

TRIALS_ENV = "LORAHUB_ATTACK_TRIALS"


def trials(default: int) -> int:
    """``default`` scaled by ``$LORAHUB_ATTACK_TRIALS`` (a multiplier: 6 runs six times as
    many trials; the defaults keep the whole attack file near a minute on two cores)."""
    scale = float(os.environ.get(TRIALS_ENV) or 1)
    return max(1, round(default * scale))


_ZYGOTE = r"""
import json, os, signal, sys, traceback
import torch, safetensors.torch, sqlalchemy.orm, alembic.command
import lorahub.cli, lorahub.hub, lorahub.formats.peft, lorahub.merge, lorahub.compose
from lorahub.cli import main

def reply(doc):
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()

def outcome(pid, status):
    return {"pid": pid,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}

for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.argv = ["lorahub", *req["argv"]]
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply({"pid": pid})
    elif req["op"] == "signal":
        os.kill(req["pid"], req["sig"])  # not reaped yet: still our child, maybe a zombie
        reply({})
    elif req["op"] == "wait":
        reply(outcome(*os.waitpid(req["pid"], 0)))
    elif req["op"] == "wait_any":
        reply(outcome(*os.wait()))
"""


@dataclass
class Outcome:
    """How one command ended: exit ``code``, or the ``signal`` that ended it."""

    argv: list[str]
    code: int | None
    signal: int | None
    output: str
    took: float
    pid: int = 0

    @property
    def killed(self) -> bool:
        return self.signal is not None

    def __str__(self) -> str:
        how = f"signal {self.signal}" if self.killed else f"exit {self.code}"
        return f"`lorahub {' '.join(self.argv)}` ({how}): {self.output.strip()[-2000:]}"


class Zygote:
    """Runs ``lorahub`` commands in forked, preloaded children."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.running: dict[int, tuple[list[str], Path, float]] = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def spawn(self, argv: list[str]) -> int:
        self.n += 1
        log = self.logs / f"run-{self.n}.log"
        self._send({"op": "spawn", "argv": argv, "log": str(log)})
        pid = self._receive(timeout=120)["pid"]
        self.running[pid] = (argv, log, time.monotonic())
        return pid

    def send_signal(self, pid: int, sig: int = signal.SIGKILL) -> None:
        self._send({"op": "signal", "pid": pid, "sig": int(sig)})
        self._receive(timeout=30)

    def wait(self, pid: int, timeout: float = 120) -> Outcome:
        self._send({"op": "wait", "pid": pid})
        return self._ended(self._receive_or_kill(timeout))

    def wait_any(self, timeout: float = 120) -> Outcome:
        """The next child to end, whichever it is (its ``pid`` says which)."""
        self._send({"op": "wait_any"})
        return self._ended(self._receive_or_kill(timeout))

    def run(
        self,
        argv: list[str],
        *,
        after: float | None = None,
        sig: int = signal.SIGKILL,
        timeout: float = 120,
    ) -> Outcome:
        """Run ``lorahub *argv``; send ``sig`` ``after`` seconds from the fork (None: let
        it end)."""
        pid = self.spawn(argv)
        if after is not None:
            time.sleep(max(0.0, after - (time.monotonic() - self.running[pid][2])))
            self.send_signal(pid, sig)
        return self.wait(pid, timeout)

    def _ended(self, doc: dict) -> Outcome:
        argv, log, t0 = self.running.pop(doc["pid"])
        took = time.monotonic() - t0
        return Outcome(argv, doc["code"], doc["signal"], _read(log), took, doc["pid"])

    def _receive_or_kill(self, timeout: float) -> dict:
        try:
            return self._receive(timeout)
        except TimeoutError:
            hung = [
                str(Outcome(a, None, None, _read(log), 0)) for a, log, _ in self.running.values()
            ]
            for pid in self.running:  # unreaped children of the zygote: still their pids
                os.kill(pid, signal.SIGKILL)
            self._receive(timeout=30)
            raise AssertionError(f"a command hung for {timeout} s: {hung}") from None

    def _send(self, doc: dict) -> None:
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()

    def _receive(self, timeout: float) -> dict:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("the zygote process died")
        return json.loads(line)

    def close(self) -> None:
        for pid in list(self.running):
            self.send_signal(pid, signal.SIGKILL)
            self.wait(pid)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def _read(log: Path) -> str:
    """A child's output; a signal that lands before the child opened its log leaves none."""
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# ----------------------------------------------------------------- independent checks


@dataclass
class Snapshot:
    """What the catalog holds, read with plain ``sqlite3``."""

    adapters: dict[str, str] = field(default_factory=dict)  # digest -> weights digest
    refs: dict[str, str] = field(default_factory=dict)  # "name:tag" -> adapter digest
    blob_rows: set[str] = field(default_factory=set)
    merged: dict[str, str] = field(default_factory=dict)  # key -> path


def snapshot(home: Path) -> Snapshot:
    db = home / "lorahub.db"
    con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=60)
    try:
        snap = Snapshot()
        snap.adapters = dict(con.execute("SELECT digest, weights_digest FROM adapters"))
        snap.refs = {
            f"{n}:{t}": d
            for n, t, d in con.execute(
                "SELECT r.name, r.tag, a.digest FROM refs r JOIN adapters a ON a.id = r.adapter_id"
            )
        }
        snap.blob_rows = {d for (d,) in con.execute("SELECT digest FROM blobs")}
        snap.merged = dict(con.execute("SELECT key, path FROM merged"))
        return snap
    finally:
        con.close()


def named_files(root: Path) -> dict[str, Path]:
    """``xxh128:<hex>`` -> path for every file in a ``<root>/xxh128/ab/<30 hex>`` tree."""
    out = {}
    base = root / "xxh128"
    if not base.is_dir():
        return out
    for sub in base.iterdir():
        for f in sub.iterdir():
            out[f"xxh128:{sub.name}{f.name}"] = f
    return out


def _hashes_to(path: Path, name: str) -> bool:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == name[7:]


def store_problems(home: Path, snap: Snapshot | None = None) -> list[str]:
    """Every way the store breaks DESIGN's invariants 1 and 2, found without lorahub: a file
    under ``blobs/`` or ``manifests/`` that does not hash to its name (a partial write under
    a final name), a catalog row whose blob is missing, an adapter without its manifest file."""
    snap = snap or snapshot(home)
    problems = []
    blobs = named_files(home / "blobs")
    manifests = named_files(home / "manifests")
    for name, path in [*blobs.items(), *manifests.items()]:
        if not path.is_file() or path.is_symlink():
            problems.append(f"{path} is not a plain file")
        elif not _hashes_to(path, name):
            problems.append(f"{path} does not hash to its name")
    for digest, weights in snap.adapters.items():
        if weights not in blobs:
            problems.append(f"adapter {digest}: its weights blob {weights} is missing")
        if digest not in manifests:
            problems.append(f"adapter {digest}: its manifest file is missing")
    for digest in snap.blob_rows - set(blobs):
        problems.append(f"blob row {digest} has no file")
    for key, path in snap.merged.items():
        if not (Path(path) / "lorahub.json").is_file():
            problems.append(f"merged {key}: {path} is not a complete checkpoint")
    return problems


def write_tiny_adapter(path: Path, seed: int, modules: int = 1) -> Path:
    """A PEFT folder of a few hundred bytes (``modules`` 8x8 layers at rank 1), fast to add,
    so gc has many blobs to delete."""
    from factories import write_peft_adapter

    mods = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(modules)}
    return write_peft_adapter(path, mods, r=1, alpha=1, seed=seed)


def write_tiny_base(path: Path) -> Path:
    """A base checkpoint for the adapters of ``factories.write_peft_adapter`` (its Llama
    module names and shapes), written without transformers so the module loads fast."""
    import torch
    from factories import LLAMA_MODULES
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {f"{m}.weight": torch.randn(o, i, generator=g) for m, (i, o) in LLAMA_MODULES.items()}
    sd["model.norm.weight"] = torch.ones(32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


# ----------------------------------------------------------------- damage


def age_manifests(home: Path, seconds: float = 600) -> None:
    """Date every manifest file ``seconds`` back: ``verify`` then answers as it would once
    its settle window for adds in flight has passed."""
    old = time.time() - seconds
    for path in named_files(home / "manifests").values():
        os.utime(path, (old, old))


def flip_bytes(path: Path, rng, count: int = 1) -> None:
    """Change ``count`` random bytes of a file in place (each to a different value)."""
    data = bytearray(path.read_bytes())
    for _ in range(count):
        at = rng.randrange(len(data))
        data[at] ^= rng.randrange(1, 256)
    path.chmod(0o644)  # blobs are read-only; a bad disk does not ask (root would not either)
    path.write_bytes(bytes(data))


def root_page(db: Path, name: str) -> tuple[int, int]:
    """Where the root page of table or index ``name`` starts in the database file, and the
    page size, after moving the WAL into the file (so the file is what a reader sees)."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        (root,) = con.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)
        ).fetchone()
    finally:
        con.close()
    return (root - 1) * page_size, page_size


def corrupt_index(db: Path, index: str, rng: random.Random | None = None) -> str:
    """Change one hex digit of one digest stored in ``index``'s root page, as a bad sector or
    a stray write would: a random one (``rng``), or else the first digit of the first digest,
    to 0 (1 if it was 0). Returns what changed."""
    start, page_size = root_page(db, index)
    data = bytearray(db.read_bytes())
    page = bytes(data[start : start + page_size])
    hits = [m.start() for m in re.finditer(rb"xxh128:[0-9a-f]{32}", page)]
    if rng is None:
        at = start + hits[0] + 7
        old = chr(data[at])
        data[at] = ord("0" if old != "0" else "1")
    else:
        at = start + rng.choice(hits) + 7 + rng.randrange(32)
        old = chr(data[at])
        data[at] = ord(rng.choice([c for c in "0123456789abcdef" if c != old]))
    db.write_bytes(bytes(data))
    return f"byte {at} of {db.name} ({index}): {old!r} -> {chr(data[at])!r}"


def damage_page(db: Path, name: str) -> None:
    """Overwrite the header of table or index ``name``'s root page, so reading it fails."""
    start, _ = root_page(db, name)
    data = bytearray(db.read_bytes())
    data[start : start + 8] = b"\xff" * 8
    db.write_bytes(bytes(data))

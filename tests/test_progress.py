"""Progress: huggingface_hub's tqdm bars (bytes, rate, time left) on a terminal only, the
library's ``progress(done, total)`` callbacks, and ``add --recursive`` reporting each adapter
as it finishes.

The bars are checked in a real terminal: the CLI runs as a subprocess whose stderr is a
pseudo-terminal. conftest turns huggingface_hub's bars off for the whole test process
(``HF_HUB_DISABLE_PROGRESS_BARS=1``); these subprocesses get an environment without it.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from factories import write_peft_adapter

MAIN = "from lorahub.cli import main; main()"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env.update(LORAHUB_HOME=str(home), **extra)
    return env


def _cli(
    home: Path, *args: object, tty: bool, env: dict[str, str] | None = None, code: str = MAIN
) -> tuple[int, str, str]:
    """``lorahub ARGS`` in a subprocess, stdout a pipe and stderr a 120x40 pseudo-terminal
    (``tty``) or a pipe; returns the exit code, stdout and what reached stderr."""
    cmd = [sys.executable, "-c", code, *map(str, args)]
    environ = _env(home, **(env or {}))
    if not tty:
        res = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=300)
        return res.returncode, res.stdout, res.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=environ
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # read as it comes: a full terminal buffer would block the writer
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=300)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def _sizeof(n: int) -> str:
    """How tqdm writes a byte count scaled by 1000 (its own formatter: the reference)."""
    from tqdm import tqdm

    return tqdm.format_sizeof(n, divisor=1000)


def _final_bar(text: str, desc: str) -> re.Match[str]:
    """The completed bar ``desc: 100%|####| done/total [elapsed<left, rate]``."""
    pattern = (
        rf"{desc}: 100%\|[^|]*\| (?P<done>\S+)/(?P<total>\S+) \[[\d:]+<[\d:]+, *(?P<rate>\S+)\]"
    )
    found = list(re.finditer(pattern, text))
    assert found, f"no completed {desc!r} bar in {text!r}"
    return found[-1]


def _data_bytes(path: Path) -> int:
    """The tensor bytes of a safetensors file (its size less the header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.fixture
def stored(run, world: Path) -> None:
    run("add", world / "a", "-n", "a:v1")


# ------------------------------------------------------------------ bars on a terminal


def test_merge_draws_a_bar_with_bytes_and_rate_on_a_terminal(stored, store_home, world, tmp_path):
    out = tmp_path / "merged"
    rc, stdout, stderr = _cli(store_home, "merge", world / "llama", "a:v1", "-o", out, tty=True)
    assert rc == 0, stderr
    bar = _final_bar(stderr, "merging")
    total = _sizeof(_data_bytes(out / "model.safetensors"))
    assert bar["done"] == bar["total"] == total
    assert re.fullmatch(r"[\d.]+[kMGT]?B/s", bar["rate"]), bar["rate"]
    assert str(out) in stdout and "merging" not in stdout  # data on stdout, the bar on stderr


def test_export_draws_a_bar_with_bytes_and_rate_on_a_terminal(stored, store_home, tmp_path):
    out = tmp_path / "exported"
    rc, stdout, stderr = _cli(store_home, "export", "a:v1", out, tty=True)
    assert rc == 0, stderr
    bar = _final_bar(stderr, "exporting")
    size = (out / "adapter_model.safetensors").stat().st_size
    assert bar["done"] == bar["total"] == _sizeof(size)
    assert re.fullmatch(r"[\d.]+[kMGT]?B/s", bar["rate"]), bar["rate"]
    assert stdout.strip() == str(out)


OFF = [
    pytest.param([], {}, False, id="stderr-not-a-terminal"),
    pytest.param(["-q"], {}, True, id="quiet"),
    pytest.param(["--json"], {}, True, id="json"),
    pytest.param(
        [], {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}, True, id="HF_HUB_DISABLE_PROGRESS_BARS"
    ),
]


@pytest.mark.parametrize(("flags", "env", "tty"), OFF)
def test_merge_draws_nothing_when_bars_are_off(
    stored, store_home, world, tmp_path, flags, env, tty
):
    out = tmp_path / "merged"
    args = ("merge", world / "llama", "a:v1", "-o", out, *flags)
    rc, stdout, stderr = _cli(store_home, *args, tty=tty, env=env)
    assert rc == 0, stderr
    assert stderr == ""
    assert (out / "model.safetensors").is_file() and stdout


@pytest.mark.parametrize(("flags", "env", "tty"), OFF)
def test_export_draws_nothing_when_bars_are_off(stored, store_home, tmp_path, flags, env, tty):
    out = tmp_path / "exported"
    rc, stdout, stderr = _cli(store_home, "export", "a:v1", out, *flags, tty=tty, env=env)
    assert rc == 0, stderr
    assert stderr == ""
    assert (out / "adapter_model.safetensors").is_file() and stdout


def test_huggingface_hub_switch_turns_the_bars_off(monkeypatch):
    """``huggingface_hub.utils.disable_progress_bars()``, globally or for lorahub's group."""
    from huggingface_hub.utils import disable_progress_bars

    from lorahub.cli import progress

    hf_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # as if never set
    monkeypatch.setattr(hf_tqdm, "progress_bar_states", {})
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.enabled()
    for group in (None, progress.GROUP):
        with disable_progress_bars(group):
            assert not progress.enabled()
        assert progress.enabled()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when called, not at import
    assert not progress.enabled()


# ------------------------------------------------------------------ add --recursive streams

# The child blocks in reading adapter "c" until the parent has seen a result line on stdout.
BLOCKING_MAIN = """
import pathlib, sys, time
import lorahub.sources as sources
real, signal, marker = sources.read, pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def read(path, *args, **kwargs):
    if pathlib.Path(path).name == "c":
        deadline = time.monotonic() + 30
        while not signal.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        marker.write_text("released" if signal.exists() else "timed out")
    return real(path, *args, **kwargs)
sources.read = read
del sys.argv[1:3]
from lorahub.cli import main; main()
"""


def test_add_recursive_prints_each_result_before_reading_the_next(store_home, tmp_path):
    runs = tmp_path / "runs"
    for seed, name in enumerate("abc"):
        write_peft_adapter(runs / name, seed=seed)
    signal, marker = tmp_path / "signal", tmp_path / "marker"
    cmd = [sys.executable, "-c", BLOCKING_MAIN, signal, marker, "add", "--recursive", runs]
    proc = subprocess.Popen(
        list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(store_home)
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().decode()  # while "c" is blocked, if results stream
    signal.touch()
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert marker.read_text() == "released", "the first result was printed only after all"
    assert first.startswith("added") and first.rstrip().endswith(str(runs / "a"))
    lines = [first, *rest.decode().splitlines()]
    assert [line.rsplit("/", 1)[-1].strip() for line in lines] == ["a", "b", "c"]


def test_add_many_reports_each_result_as_it_finishes(hub, tmp_path):
    runs = tmp_path / "runs"
    for seed, name in enumerate("abc"):
        write_peft_adapter(runs / name, seed=seed)
    (runs / "bad").mkdir()
    (runs / "bad" / "adapter_model.safetensors").write_bytes(b"no config")
    seen: list[tuple[float, str, str]] = []
    reads: list[tuple[float, str]] = []
    steps: list[tuple[int, int]] = []

    import lorahub.sources as sources

    real = sources.read

    def read(path, *args, **kwargs):
        reads.append((time.monotonic(), Path(path).name))
        return real(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "read", read)
        results = hub.add_many(
            [runs],
            recursive=True,
            progress=lambda done, total: steps.append((done, total)),
            on_result=lambda r: seen.append((time.monotonic(), r.status, Path(r.source).name)),
        )
    assert [(s, n) for _, s, n in seen] == [(r.status, Path(r.source).name) for r in results]
    assert [(s, n) for _, s, n in seen] == [
        ("refused", "bad"),
        ("added", "a"),
        ("added", "b"),
        ("added", "c"),
    ]
    # Each adapter's result came before the next adapter was read.
    read_at = dict((n, t) for t, n in reads)
    done_at = {n: t for t, _, n in seen}
    assert done_at["a"] < read_at["b"] and done_at["b"] < read_at["c"]
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]


# ------------------------------------------------------------------ library callbacks


def _assert_counts_up(calls: list[tuple[int, int]], total: int) -> None:
    assert calls, "progress was never called"
    dones = [d for d, _ in calls]
    assert all(t == total for _, t in calls)
    assert dones == sorted(set(dones)) and dones[-1] == total


def test_compose_reports_each_module(hub, world):
    hub.add(world / "a", name="a:v1")
    hub.add(world / "ad2", name="ad2:v1")
    calls: list[tuple[int, int]] = []
    result = hub.compose(
        ["a:v1", "ad2:v1"], method="svd", rank=2, progress=lambda d, t: calls.append((d, t))
    )
    _assert_counts_up(calls, len(result.report.errors))
    assert calls[0] == (1, len(result.report.errors))


def test_export_reports_the_bytes_copied(hub, world, tmp_path, monkeypatch):
    import lorahub.export
    from lorahub.digest import Digest

    monkeypatch.setattr(lorahub.export, "_CHUNK", 1000)  # several steps for a small blob
    info = hub.add(world / "a", name="a:v1").adapter
    assert info is not None
    calls: list[tuple[int, int]] = []
    out = hub.export("a:v1", tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    weights = out / "adapter_model.safetensors"
    _assert_counts_up(calls, weights.stat().st_size)
    assert len(calls) > 1
    assert weights.read_bytes() == hub.blobs.read(Digest.parse(info.weights_digest))

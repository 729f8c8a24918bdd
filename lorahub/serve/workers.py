"""``lorahub serve --workers N``: N uvicorn processes, kept running by this one.

Why not uvicorn's own ``--workers``: its processes share one listening socket, and the one
that wakes first accepts every connection then waiting; measured with 32 clients, one of two
workers did 73% of the work and the slowest answers took half as long again. Here, on Linux,
each worker gets a socket of its own on the same address (``SO_REUSEPORT``), and the kernel
spreads new connections over them by a hash of their addresses (:mod:`.listen`); elsewhere
they share one.

This process holds every socket, so connections arriving while a worker is replaced wait for
the replacement instead of being refused. A worker that dies after it served is replaced at
once. One that dies before it ever served stops the server if no worker has served yet (an
app that cannot start fails the same way each time); a replacement gets
:data:`START_ATTEMPTS` tries. ``SIGINT``/``SIGTERM`` stop the workers gracefully, for at most
``grace`` seconds (a second signal, or the deadline, kills them); if this process is killed,
the workers notice and stop themselves (:mod:`.worker`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from ..errors import LorahubError
from . import shares

log = logging.getLogger("uvicorn.error")  # the logger uvicorn's workers write to

#: Tries a worker slot gets to start serving again before the server gives up.
START_ATTEMPTS = 3
#: How often dead workers are looked for when nothing else wakes the loop.
POLL_S = 0.5
#: How long stopping workers may finish the answers they are sending.
STOP_GRACE_S = 30.0
#: How much longer than that the supervisor waits before it kills them.
KILL_SLACK_S = 5.0


class WorkerFailed(LorahubError):
    """A worker could not start serving: the app, the store or the environment is broken."""


@dataclass
class _Worker:
    """One worker process and the state of its slot."""

    slot: int
    proc: subprocess.Popen[bytes]
    link: socket.socket
    served: bool = False
    failed_starts: int = 0  # in a row, in this slot


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Starts ``count`` workers over ``sockets`` (one each, or one shared) and keeps them."""

    def __init__(
        self,
        sockets: list[socket.socket],
        count: int,
        host: str,
        env: Mapping[str, str] | None = None,
        *,
        grace: float = STOP_GRACE_S,
    ) -> None:
        if len(sockets) not in (1, count):
            raise ValueError("one socket per worker, or one for all")
        self._sockets = sockets
        self._count = count
        self._host = host
        self._port = int(sockets[0].getsockname()[1])
        self._env = dict(os.environ if env is None else env)
        self._grace = grace
        self._workers: list[_Worker] = []
        self._selector = selectors.DefaultSelector()
        self._stopped_by: int | None = None  # the signal that asked for the stop
        self._stopping = False
        self._ever_served = False
        # Workers with a socket each keep their shares of connections even (shares.py).
        self._shares: shares.Shares | None = None
        if count > 1 and len(sockets) == count and shares.supported():
            table = shares.create(count)
            if table is not None:
                self._shares = shares.Shares(table, 0, count)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int | None:
        """Serves until a signal stops it, and returns that signal (for the caller to exit
        as the signal says); raises :class:`WorkerFailed` if workers cannot start. Workers
        are stopped and the sockets closed either way."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            log.info("Started supervisor process [%d]", os.getpid())
            for slot in range(self._count):
                if self._stopping:
                    break
                self._workers.append(self._spawn(slot))
            while not self._stopping:
                self._wait(POLL_S)
                self._reap()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            if self._shares is not None:
                os.close(self._shares.fd)
            log.info("Stopped supervisor process [%d]", os.getpid())
        return self._stopped_by

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:  # a second request: no more waiting
            self._kill_all()
            return
        log.info("Received %s, stopping the workers", signal.Signals(signum).name)
        self._stopped_by, self._stopping = signum, True

    def _spawn(self, slot: int) -> _Worker:
        sock = self._sockets[slot % len(self._sockets)]
        passed = [sock.fileno()]
        table: list[str] = []
        if self._shares is not None:
            self._shares.reset(slot)  # a dead worker's connections are gone with it
            passed.append(self._shares.fd)
            table = [str(self._shares.fd), str(slot), str(self._count)]
        ours, theirs = socket.socketpair()
        # -P (3.11+): the working directory stays off the worker's import path, as it is
        # off the supervisor's (a console script), so both run the same lorahub.
        safe = ["-P"] if sys.version_info >= (3, 11) else []
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    *safe,
                    "-m",
                    "lorahub.serve.worker",
                    str(sock.fileno()),
                    str(theirs.fileno()),
                    self._host,
                    str(self._port),
                    str(max(1, int(self._grace))),
                    *table,
                ],
                env=self._env,
                pass_fds=(*passed, theirs.fileno()),
            )
        except OSError as exc:
            ours.close()
            raise WorkerFailed(f"cannot start a worker process: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = _Worker(slot, proc, ours)
        self._selector.register(ours, selectors.EVENT_READ, worker)
        log.info("Started worker process [%d]", proc.pid)
        return worker

    # ------------------------------------------------------------------ the loop

    def _wait(self, timeout: float) -> None:
        """Reads the workers' links for up to ``timeout`` seconds: a byte says a worker
        serves."""
        for key, _ in self._selector.select(timeout):
            self._read(key.data)

    def _read(self, worker: _Worker) -> None:
        try:
            data = worker.link.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            worker.served, worker.failed_starts = True, 0
            self._ever_served = True
        else:  # the worker closed it: it is exiting; _reap sees it go
            self._forget(worker)

    def _reap(self) -> None:
        for i, worker in enumerate(self._workers):
            code = worker.proc.poll()
            if code is None or self._stopping:
                continue
            if worker.link.fileno() >= 0:
                self._read(worker)  # a byte sent just before it died still counts
            self._forget(worker)
            failed = 0
            if worker.served:
                log.warning(
                    "Worker process [%d] died (%s); starting another",
                    worker.proc.pid,
                    _describe(code),
                )
            else:
                failed = worker.failed_starts + 1
                if not self._ever_served or failed >= START_ATTEMPTS:
                    self._stopping = True
                    raise WorkerFailed(
                        f"a server worker could not start ({_describe(code)}); "
                        "its messages are above"
                    )
                log.warning(
                    "Worker process [%d] died before serving (%s); trying again",
                    worker.proc.pid,
                    _describe(code),
                )
                self._pause(failed)  # a moment for whatever failed to pass
                if self._stopping:
                    return
            self._workers[i] = self._spawn(worker.slot)
            self._workers[i].failed_starts = failed

    def _pause(self, seconds: float) -> None:
        """Waits ``seconds``, still reading the links, or less if a stop is asked."""
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            self._wait(min(left, POLL_S))

    def _forget(self, worker: _Worker) -> None:
        with contextlib.suppress(KeyError, ValueError):  # unregistered, or closed already
            self._selector.unregister(worker.link)
        worker.link.close()

    def _stop_all(self) -> None:
        """SIGTERM to every worker and the sockets closed here (so the kernel refuses new
        connections once the workers close theirs), then waits ``grace`` seconds for them
        to finish what they are sending, and kills what is left."""
        self._stopping = True
        for worker in self._workers:
            if worker.proc.poll() is None:
                worker.proc.terminate()
        for sock in self._sockets:
            sock.close()
        deadline = time.monotonic() + self._grace + KILL_SLACK_S
        for worker in self._workers:
            while worker.proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("Worker process [%d] did not stop; killing it", worker.proc.pid)
                    worker.proc.kill()
                    worker.proc.wait()
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(min(left, POLL_S))
            self._forget(worker)

    def _kill_all(self) -> None:
        for worker in self._workers:
            if worker.proc.poll() is None:
                worker.proc.kill()

"""One process of ``lorahub serve --workers N``: uvicorn over a socket its supervisor made.

Started by :mod:`lorahub.serve.workers` as ``python -m lorahub.serve.worker SOCKET LINK HOST
PORT GRACE [TABLE SLOT COUNT]``:

* ``SOCKET``: the inherited listening socket's descriptor;
* ``LINK``: one end of a socket pair whose other end the supervisor holds: the worker writes
  a byte on it once it serves, and reads it to learn that the supervisor is gone (end of
  file), so a killed supervisor never leaves workers holding the port;
* ``GRACE``: the seconds a stopping worker gives the answers it is sending;
* ``TABLE``, ``SLOT``, ``COUNT``: the descriptor of the connection counts the workers share,
  this worker's slot in it, and how many slots (:mod:`.shares`).

The store and the serve options come in the environment (``app.app_from_env``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from . import shares
from .zerocopy import PROTOCOL

#: The app each worker builds (uvicorn's ``factory``).
APP = "lorahub.serve.app:app_from_env"
#: How long a worker whose supervisor died may finish its answers before it quits anyway.
ORPHAN_GRACE_S = 30.0
#: A worker's exit status when its app could not start (uvicorn's own).
STARTUP_FAILURE = 3


class _Server(uvicorn.Server):
    """uvicorn's server, telling the supervisor once it serves (its app started, listening)."""

    def __init__(self, config: uvicorn.Config, link: socket.socket) -> None:
        super().__init__(config)
        self._link = link

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and shares.current is not None:
            shares.current.serving()
        if self.started:
            # If the supervisor is gone, _exit_with_supervisor stops this worker.
            with contextlib.suppress(OSError):
                self._link.send(b"1")


def _exit_with_supervisor(link: socket.socket) -> None:
    """Waits for the supervisor's end of the link to close, then stops this worker."""
    try:
        while link.recv(64):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)


def main(argv: list[str]) -> None:
    fd, link_fd, host, port = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    grace = int(argv[4])
    http: Any = PROTOCOL
    balanced = shares.balanced_protocol()
    if len(argv) > 5 and balanced is not None:  # the table of connections per worker
        table = int(argv[5])
        shares.current = shares.Shares(table, int(argv[6]), int(argv[7]))
        os.close(table)  # mapped
        http = balanced
    # proto named: asyncio sets TCP_NODELAY on accepted connections only for a TCP socket,
    # and where SO_PROTOCOL is missing (macOS) a socket rebuilt from a descriptor says 0.
    sock = socket.socket(proto=socket.IPPROTO_TCP, fileno=fd)
    link = socket.socket(fileno=link_fd)
    threading.Thread(target=_exit_with_supervisor, args=(link,), daemon=True).start()
    config = uvicorn.Config(
        APP,
        factory=True,
        host=host,
        port=port,
        access_log=False,
        http=http,
        ws="none",  # no websockets served: an upgrade is an ordinary request
        timeout_graceful_shutdown=grace,
    )
    server = _Server(config, link)
    server.run(sockets=[sock])
    if not server.started:  # uvicorn before 0.31 returns quietly when the app cannot start
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main(sys.argv[1:])

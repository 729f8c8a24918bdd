"""The listening sockets of ``lorahub serve``, made before any worker starts.

Made here rather than by uvicorn so that a taken or unknown address is a plain
:class:`~lorahub.errors.LorahubError` before anything runs, and so that ``--workers N`` can give
each worker a socket of its own (:func:`per_worker_sockets`): processes sharing one listening
socket do not share its connections evenly, since asyncio accepts every connection waiting
when it wakes, and whichever worker wakes first takes a burst of them.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any

from ..errors import LorahubError

#: Connections the kernel queues per socket before a worker accepts them (uvicorn's default).
BACKLOG = 2048


class ListenError(LorahubError, OSError):
    """The address cannot be listened on: taken, not this machine's, or not allowed."""


def per_worker_sockets() -> bool:
    """Whether workers get a socket each. Linux spreads new connections over the sockets
    bound with ``SO_REUSEPORT`` to one address; other systems give them all to one socket,
    so there the workers share a single socket instead."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def listen(host: str, port: int, count: int = 1) -> list[socket.socket]:
    """``count`` listening TCP sockets on ``host:port`` (``port`` 0: one free port for all).

    ``host`` is an address (``[::1]`` or ``::1`` for IPv6) or a name; a name with both kinds
    of address is listened on at its IPv4 one. With ``count`` > 1 the sockets are bound with
    ``SO_REUSEPORT``; first, one socket bound without it proves nobody listens there already
    (a socket with the option would otherwise join another process's group and take half its
    connections). Two servers started in the same instant can both pass that check.
    """
    family, address = _address(host, port)
    if count > 1:
        with _bound(family, address, host, reuse_port=False) as probe:
            address = _with_port(address, probe.getsockname()[1])
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _bound(family, address, host, reuse_port=count > 1)
            sockets.append(sock)
            sock.listen(BACKLOG)
            address = _with_port(address, sock.getsockname()[1])
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _address(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """The family and socket address to bind for ``host``, IPv4 first."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        found = socket.getaddrinfo(
            name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError):
        raise ListenError(f"cannot listen on {host}:{port}: unknown host {host!r}") from None
    family, _, _, _, address = min(found, key=lambda f: f[0] != socket.AF_INET)
    return family, address


def _with_port(address: tuple[Any, ...], port: int) -> tuple[Any, ...]:
    return (address[0], port, *address[2:])


def _bound(family: int, address: tuple[Any, ...], host: str, *, reuse_port: bool) -> socket.socket:
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket's proto says TCP, and without it uvicorn's separate header and
    # body writes wait out the client's delayed ACK (40 ms a small answer).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name == "posix":  # elsewhere (Windows) it would let two servers bind one port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise _listen_error(host, address[1], exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _listen_error(host: str, port: int, exc: OSError) -> ListenError:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            f"cannot listen on {where}: the address is in use (another server is running "
            "there); stop it or pick another --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"cannot listen on {where}: {host} is not an address of this machine")
    if exc.errno == errno.EACCES:
        return ListenError(
            f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
        )
    return ListenError(f"cannot listen on {where}: {exc.strerror or exc}")

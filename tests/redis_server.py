"""A real Redis for the tests: the machine's 127.0.0.1:6379 if it answers, else our own redis-server.

Never a fake: the shared cache's behaviour (TTLs, MGET, a server that goes away)
is what is under test. If neither a running Redis nor the ``redis-server``
binary is available the fixture raises, so the tests fail rather than skip.
Tests that stop Redis always start their own (``private_redis``), never touching
a server that others on the machine use.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from extauthz.demo.processes import free_port, stop_process, wait_port

DEFAULT = ("127.0.0.1", 6379)


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    host: str
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        """Stop a server we started (a shared one is never stopped)."""
        stop_process(self.process)

    def start_again(self) -> None:
        """Restart our own server on the same port (after ``stop``)."""
        assert self.process is not None, "only a private server can be restarted"
        self.process = _spawn(self.port)


def _spawn(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tempfile.gettempdir()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 15, process, ready=lambda p: ping("127.0.0.1", p))
    except TimeoutError:
        process.kill()
        raise RuntimeError(f"redis-server did not answer on port {port}") from None
    return process


@contextmanager
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of our own on a free port, stopped afterwards."""
    port = free_port()
    server = RedisServer("127.0.0.1", port, _spawn(port))
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def any_redis() -> Iterator[RedisServer]:
    """The machine's Redis on 6379 if it answers, else a private one."""
    if ping(*DEFAULT):
        yield RedisServer(*DEFAULT)
        return
    with private_redis() as server:
        yield server

"""A ghmd on this machine, for examples and benchmarks that start their own: a free loopback
port to give it, a wait until it answers, and a scratch server that does both."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from typing import Iterator, Optional

from .client import Client
from .errors import GhmdError


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(address: str, timeout: float = 30.0) -> None:
    """Returns once the server at ``address`` answers a call; raises its last error after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with Client(address, retries=0, timeout=1.0) as client:
        while True:
            try:
                list(client.list_jobs(page_size=1))
                return
            except GhmdError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@contextlib.contextmanager
def scratch_server(binary: Optional[str], address: Optional[str] = None) -> Iterator[str]:
    """The address of a ghmd to use: ``address`` if given (a running server), else a ``binary``
    started on a free loopback port, in memory and with metrics on a free port (so that it
    clashes with no other), stopped on exit. Waits until it answers either way."""
    server = None
    if address is None:
        if binary is None:
            raise ValueError("give the address of a running ghmd, or a ghmd binary to start")
        address = f"127.0.0.1:{free_port()}"
        server = subprocess.Popen([binary, "serve", "--listen", address, "--in-memory",
                                   "--metrics-listen", "127.0.0.1:0"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(address)
        yield address
    finally:
        if server is not None:
            server.terminate()
            server.wait()

"""Running the app: in the foreground (`minillm serve`), or in a background thread (tests, notebooks,
bench); chapter 10.

uvicorn owns the event loop. On Ctrl-C or SIGTERM it stops accepting connections, waits up to
`timeout_graceful_shutdown` seconds for the open ones (streams in flight finish), then cancels what is left and
runs the app's lifespan shutdown, where AsyncLLM aborts any request still in the engine. So a shutdown either
finishes or aborts every in-flight request; none is left holding KV blocks.

The listening socket is made here and handed to uvicorn, so `port=0` (let the OS pick a free port, as tests and
notebooks do) works and the chosen port is known before the first request.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from typing import Any

import uvicorn

LOCALHOST = "127.0.0.1"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as "localhost"
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def check_ssl(ssl_keyfile: str | None, ssl_certfile: str | None) -> None:
    """ValueError unless TLS is off (neither file) or both files are there to read (vLLM's --ssl-keyfile and
    --ssl-certfile; checked before a model loads, and again by uvicorn, which parses them)."""
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together: give both (the private key and its "
                         "certificate, PEM) or neither")
    for flag, path in (("--ssl-keyfile", ssl_keyfile), ("--ssl-certfile", ssl_certfile)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")


def _config(app: Any, graceful_timeout: float, log_level: str, ssl_keyfile: str | None = None,
            ssl_certfile: str | None = None) -> uvicorn.Config:
    if isinstance(graceful_timeout, bool) or not isinstance(graceful_timeout, (int, float)) or \
            not 0 <= graceful_timeout < float("inf"):
        raise ValueError(f"graceful_timeout must be a finite number of seconds >= 0, got {graceful_timeout!r}")
    check_ssl(ssl_keyfile, ssl_certfile)
    # h11 is pure Python and always there; keep-alive long enough for a benchmark's pauses
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, lifespan="on",
                          timeout_keep_alive=30, backlog=2048, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)


def run(app: Any, host: str = LOCALHOST, port: int = 8000, graceful_timeout: float = 30.0,
        log_level: str = "info", sock: socket.socket | None = None, ssl_keyfile: str | None = None,
        ssl_certfile: str | None = None) -> None:
    """Serve until Ctrl-C / SIGTERM (blocking). `sock`: a socket bound already (`bind`), so that a port in use
    is reported before a model is loaded; host and port are then only its description. With ssl_keyfile and
    ssl_certfile (PEM) the server speaks HTTPS."""
    config = _config(app, graceful_timeout, log_level, ssl_keyfile, ssl_certfile)
    uvicorn.Server(config).run(sockets=[sock if sock is not None else bind(host, port)])


class ServerThread:
    """Serve `app` from a daemon thread: `with ServerThread(app) as server: httpx.get(server.url + "/health")`.
    Leaving the block shuts the server down (gracefully, for up to `graceful_timeout` seconds)."""

    def __init__(self, app: Any, host: str = LOCALHOST, port: int = 0, graceful_timeout: float = 5.0,
                 log_level: str = "warning", ssl_keyfile: str | None = None, ssl_certfile: str | None = None) -> None:
        self.server = uvicorn.Server(_config(app, graceful_timeout, log_level, ssl_keyfile, ssl_certfile))
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"{'https' if ssl_certfile else 'http'}://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="minillm-server", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

"""Storage faults on demand, for the reliability tests and ``python -m flows.chaos``.

:class:`S3FaultProxy` is an HTTP proxy on 127.0.0.1 in front of a real S3 endpoint (moto's
server in the tests) that does to chosen requests what real object stores and networks do:
answer ``503 SlowDown`` (throttling) or ``500 InternalError``, or send the response headers
with the full ``Content-Length`` and then close the connection part way through the body (a
short read). Everything else is forwarded untouched, so the client under test talks real S3
over real sockets. :class:`RestartableMotoServer` is moto's server that can be stopped and
started again on the same port with its buckets intact, for "the S3 server went away".

Faults are drawn from a seeded generator, so a run with the same requests injects the same
faults.
"""

from __future__ import annotations

import http.client
import logging
import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["FaultPlan", "RestartableMotoServer", "S3FaultProxy", "fault_proxy"]

log = logging.getLogger(__name__)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class FaultPlan:
    """Which requests fail and how. Rates are probabilities per request; ``methods`` limits
    faults to those HTTP methods (``GET`` alone hits reads, ``PUT`` writes)."""

    error_rate: float = 0.0
    error_status: int = 503
    short_read_rate: float = 0.0
    methods: frozenset[str] = frozenset({"GET", "PUT", "POST", "HEAD", "DELETE"})
    paths: frozenset[str] | None = None  # only requests whose path contains one of these

    def __post_init__(self) -> None:
        if self.error_status not in _ERRORS:
            raise ValueError(f"error_status must be one of {sorted(_ERRORS)}")
        if not (0 <= self.error_rate <= 1 and 0 <= self.short_read_rate <= 1):
            raise ValueError("rates must be within 0..1")


class S3FaultProxy:
    """Forwards to ``upstream`` (``http://host:port``) and injects :attr:`plan`'s faults.

    Change :attr:`plan` at any time (assignment is atomic); :attr:`counts` says how many
    requests were forwarded and how many of each fault were injected."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.plan = plan or FaultPlan()
        self.counts: Counter[str] = Counter()
        self.access_key_ids: set[str] = set()  # from the signed requests: which credentials
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def draw(self, method: str, path: str, is_object_read: bool) -> str | None:
        """The fault for one request, if any: ``error``, ``short-read`` or None."""
        plan = self.plan
        with self._lock:
            self.counts["requests"] += 1
            if method not in plan.methods:
                return None
            if plan.paths is not None and not any(part in path for part in plan.paths):
                return None
            roll = self._random.random()
            if roll < plan.error_rate:
                self.counts[f"error {plan.error_status}"] += 1
                return "error"
            if is_object_read and roll < plan.error_rate + plan.short_read_rate:
                self.counts["short read"] += 1
                return "short-read"
        return None


def _handler(proxy: S3FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: one line per request would drown the test output."""

        def _forward(self) -> None:
            signature = self.headers.get("Authorization") or ""
            if "Credential=" in signature:
                proxy.access_key_ids.add(signature.split("Credential=", 1)[1].split("/", 1)[0])
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            is_object_read = self.command == "GET" and "?" not in self.path.strip("/")
            fault = proxy.draw(self.command, self.path, is_object_read)
            if fault == "error":
                self._send_error(proxy.plan.error_status)
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
            finally:
                upstream.close()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            if fault == "short-read" and len(payload) > 1 and response.status in (200, 206):
                # Promise the whole body, send half, hang up: what a dropped connection does.
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _send_error(self, status: int) -> None:
            code, message = _ERRORS[status]
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


@contextmanager
def fault_proxy(
    upstream: str, plan: FaultPlan | None = None, seed: int = 0
) -> Iterator[S3FaultProxy]:
    """A started :class:`S3FaultProxy`, stopped on exit."""
    proxy = S3FaultProxy(upstream, plan, seed).start()
    try:
        yield proxy
    finally:
        proxy.stop()


class RestartableMotoServer:
    """moto's S3 server on 127.0.0.1 that :meth:`stop` takes down and :meth:`start` brings
    back on the same port. Its buckets live in this process's moto backend, so they survive
    the restart, as a real server's disks would."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: object | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RestartableMotoServer:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = int(server.get_host_and_port()[1])
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None

"""A fault-injecting HTTP proxy for S3 tests (loopback only): it forwards requests to an upstream
S3 server (moto) and, for a seeded share of them, answers with the failures real S3 produces
under load instead: ``503 SlowDown``, ``500 InternalError``, a connection reset, a slow answer,
or a lost answer (and, on request, ``403 InvalidAccessKeyId``: wrong credentials). Test code,
never shipped: it is how the job's S3 retries are proven, not assumed.

A reset closes the socket with ``SO_LINGER`` 0 (a TCP RST) before anything is forwarded, and
the error answers come before forwarding too, so those requests never reached S3. A lost answer
is the other half: the request is forwarded and applied by S3, then the connection is reset
instead of the answer being sent, so the client retries a request that already took effect (a
PUT written twice, a DELETE of a deleted key, a conditional PUT that now finds its own object). A
slow answer is forwarded after ``slow_s`` seconds. Requests whose path matches ``spare`` are always
forwarded (a test's own setup and checks go around the proxy anyway).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("503", "500", "reset", "slow", "lost")
_ERROR_BODY = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    # not transient: what S3 answers to a wrong access key (retrying cannot help)
    "403": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
}
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    """``with FaultProxy(upstream, rate=0.2) as proxy:`` point the S3 endpoint at ``proxy.url``."""

    def __init__(self, upstream: str, rate: float, *, faults: tuple[str, ...] = FAULTS, slow_s: float = 1.0,
                 seed: int = 0, spare: str | None = None):
        self.upstream = urlsplit(upstream)
        self.rate, self.faults, self.slow_s, self.spare = rate, faults, slow_s, spare
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.injected: Counter = Counter()  # fault kind -> times injected
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy").start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _pick(self, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if (self.spare and self.spare in path) or self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.faults)
            self.injected[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                kind = proxy._pick(self.path)
                if kind == "reset":
                    self._reset()
                    return
                body = self._body()
                if kind in _ERROR_BODY:
                    status, code, message = _ERROR_BODY[kind]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":  # as S3: a HEAD's error has no body, which would
                        self.wfile.write(xml)  # otherwise be read as the next reply on the connection
                    return
                if kind == "slow":
                    time.sleep(proxy.slow_s)
                self._forward(body, lose_answer=kind == "lost")

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _forward(self, body: bytes, lose_answer: bool = False) -> None:
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    up.request(self.command, self.path, body=body or None, headers=headers)
                    resp = up.getresponse()
                    data = resp.read()
                    if lose_answer:  # applied upstream; the client never hears of it
                        self._reset()
                        return
                    self.send_response(resp.status, resp.reason)
                    head = self.command == "HEAD"  # no body: the upstream's Content-Length stands
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_HEADERS and (head or k.lower() != "content-length"):
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                finally:
                    up.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler

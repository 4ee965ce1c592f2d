"""Real HTTP servers on 127.0.0.1 for the tool tests: a routed http.server that keeps what it was asked, the replies
its routes give (HTML, redirects, JSON in SearXNG's shape), and loopback treated as public where a test says so."""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from urllib.parse import parse_qs, urlsplit

LOOPBACK = frozenset({ip_network("127.0.0.1/32")})
@dataclass
class Seen:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes


class LoopbackServer:
    """An http.server on 127.0.0.1 in a thread: routes map a path to (status, headers, body); requests are kept."""

    def __init__(self, routes: dict | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.routes = routes or {}
        self.requests: list[Seen] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request a connection, so close() never waits
            def do_GET(self) -> None:
                owner.answer(self)

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        self.requests.append(Seen(handler.command, parts.path, parse_qs(parts.query), dict(handler.headers), body))
        status, headers, content = self.routes.get(parts.path, (404, {}, b"not found"))
        try:
            handler.send_response(status)
            for name, value in {"Content-Length": str(len(content)), **headers}.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(content)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading at max_bytes
            pass

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def html(body: str) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "text/html; charset=utf-8"}, body.encode()


def redirect(location: str) -> tuple[int, dict, bytes]:
    return 302, {"Location": location}, b""


def names(mapping: dict[str, list[str]]):
    """A resolver from a table: tests map names to addresses without DNS."""
    return lambda host, port: mapping[host]


def json_reply(data: object) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()


def searxng_results(n: int) -> dict:
    return {"results": [{"url": f"https://r{i}.test/", "title": f"R{i}", "content": f"about {i}"} for i in range(n)]}

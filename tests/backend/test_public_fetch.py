"""
backend/public_fetch.py against real servers on 127.0.0.1: every non-public address refused before any connection,
redirects re-checked, the connection pinned to the checked IP, the body cut at max_bytes, a silent server timed out.

Loopback is public only where a test passes allow=LOOPBACK (what production never does).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time

import pytest

from backend.public_fetch import Page, fetch_public, page_text
from core.tool_calls import ToolError
from tests.support.httpkit import LOOPBACK, LoopbackServer, html, names, redirect

TIMEOUT_S = 2.0


SSRF = {
    "loopback literal": ("http://127.0.0.1:{port}/", None, "127.0.0.1 is not a public address"),
    "localhost via resolve": ("http://localhost:{port}/", {"localhost": ["127.0.0.1"]}, "localhost resolves to"),
    "private 10/8": ("http://10.1.2.3/", None, "10.1.2.3 is not a public address"),
    "private 172.16/12": ("http://172.16.0.1/", None, "172.16.0.1 is not"),
    "private 192.168/16": ("http://192.168.1.1/", None, "192.168.1.1 is not"),
    "metadata": ("http://169.254.169.254/latest/meta-data", None, "169.254.169.254 is not"),
    "cgnat": ("http://100.64.0.1/", None, "100.64.0.1 is not"),
    "unspecified": ("http://0.0.0.0:{port}/", None, "0.0.0.0 is not"),
    "multicast": ("http://224.0.0.1/", None, "224.0.0.1 is not"),
    "ipv6 loopback": ("http://[::1]:{port}/", None, "::1 is not"),
    "ipv6 link-local": ("http://[fe80::1]/", None, "fe80::1 is not"),
    "ipv6 unique local": ("http://[fd00::1]/", None, "fd00::1 is not"),
    "ipv4-mapped loopback": ("http://[::ffff:127.0.0.1]:{port}/", None, "is not a public address"),
    "name to loopback": ("http://internal.test:{port}/", {"internal.test": ["127.0.0.1"]}, "resolves to 127.0.0.1"),
    "public and private": ("http://mixed.test/", {"mixed.test": ["93.184.216.34", "192.168.1.1"]},
                           "mixed.test resolves to 192.168.1.1"),
    "file": ("file:///etc/passwd", None, "only http and https"),
    "ftp": ("ftp://127.0.0.1:{port}/", None, "only http and https"),
}


@pytest.mark.parametrize("url, table, message", SSRF.values(), ids=SSRF.keys())
def test_non_public_addresses_are_refused_before_connecting(server, url, table, message):
    resolve = names(table) if table else names({})  # an unknown name would raise KeyError: literals never resolve
    with pytest.raises(ToolError, match="refused") as e:
        fetch_public(url.format(port=server.port), timeout_s=TIMEOUT_S, max_bytes=1000, resolve=resolve)
    assert message in str(e.value)
    assert server.requests == []


def test_the_system_resolver_is_checked_too(server):
    with pytest.raises(ToolError, match=r"localhost resolves to .*not a public address"):
        fetch_public(server.url(host="localhost"), timeout_s=TIMEOUT_S, max_bytes=1000)
    assert server.requests == []


def test_an_allowed_address_is_fetched(server):
    server.routes["/"] = html("<html><head><title> Hi  there </title><style>p {}</style></head>"
                              "<body><script>var x;</script><p>one</p><p>two <b>bo</b>ld</p></body></html>")
    page = fetch_public(server.url(), timeout_s=TIMEOUT_S, max_bytes=10_000, allow=LOOPBACK)
    assert (page.status, page.content_type, page.truncated) == (200, "text/html", False)
    assert page_text(page) == ("Hi there", "one two bold")


@pytest.mark.parametrize("target, table, message", [
    ("http://10.0.0.1/", {}, "10.0.0.1 is not a public address"),
    ("http://169.254.169.254/latest/meta-data", {}, "169.254.169.254 is not a public address"),
    ("http://next.test:{port}/", {"next.test": ["127.0.0.2"]}, "next.test resolves to 127.0.0.2"),
], ids=["private", "metadata", "name to loopback outside allow"])
def test_redirects_are_checked_again(server, target, table, message):
    server.routes["/"] = redirect(target.format(port=server.port))
    with pytest.raises(ToolError, match="refused") as e:
        fetch_public(server.url(), timeout_s=TIMEOUT_S, max_bytes=1000, resolve=names(table), allow=LOOPBACK)
    assert message in str(e.value)
    assert [r.path for r in server.requests] == ["/"]


def test_three_redirects_are_followed_and_a_fourth_refused(server):
    server.routes.update({"/r4": redirect("/r3"), "/r3": redirect("/r2"), "/r2": redirect(server.url("/r1")),
                          "/r1": redirect("/ok"), "/ok": (200, {"Content-Type": "text/plain"}, b"done")})
    page = fetch_public(server.url("/r3"), timeout_s=TIMEOUT_S, max_bytes=1000, allow=LOOPBACK)
    assert (page.url, page.text) == (server.url("/ok"), "done")
    server.requests.clear()
    with pytest.raises(ToolError, match="redirects more than 3 times"):
        fetch_public(server.url("/r4"), timeout_s=TIMEOUT_S, max_bytes=1000, allow=LOOPBACK)
    assert [r.path for r in server.requests] == ["/r4", "/r3", "/r2", "/r1"]


def test_a_long_body_is_cut_at_max_bytes(server):
    server.routes["/big"] = (200, {"Content-Type": "text/plain"}, b"x" * 200_000)
    page = fetch_public(server.url("/big"), timeout_s=TIMEOUT_S, max_bytes=1000, allow=LOOPBACK)
    assert (len(page.text), page.truncated) == (1000, True)


def test_a_silent_server_times_out(silent_port):
    with pytest.raises(ToolError, match="timed out"):
        fetch_public(f"http://127.0.0.1:{silent_port}/", timeout_s=0.3, max_bytes=1000, allow=LOOPBACK)


def test_a_name_server_that_never_answers_times_out():
    # the system resolver takes no timeout: the lookup is given up at the fetch's deadline
    stuck = threading.Event()
    hanging = lambda host, port: stuck.wait(60) and []
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"cannot resolve slow\.test: no answer within"):
        fetch_public("http://slow.test/", timeout_s=0.3, max_bytes=1000, resolve=hanging)
    assert time.monotonic() - started < 5  # a bound on a hang, not a speed check
    stuck.set()


def test_the_connection_goes_to_the_checked_address_with_the_original_host(server):
    server.routes["/"] = (200, {"Content-Type": "text/plain"}, b"pinned")
    resolved = []

    def resolve(host: str, port: int) -> list[str]:
        resolved.append((host, port))
        return ["127.0.0.1"]

    page = fetch_public(server.url(host="public.example"), timeout_s=TIMEOUT_S, max_bytes=1000, resolve=resolve,
                        allow=LOOPBACK)
    assert (page.url, page.text) == (server.url(host="public.example"), "pinned")
    assert resolved == [("public.example", server.port)]  # once: the connection does not resolve again
    assert server.requests[0].headers["Host"] == f"public.example:{server.port}"


@pytest.fixture
def tls_server(tmp_path):
    """A TLS server with a self-signed certificate for public.example that records the SNI names it is sent."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=public.example",
                    "-addext", "subjectAltName=DNS:public.example"], check=True, capture_output=True, timeout=30)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sni: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    srv = LoopbackServer(tls=context)
    srv.sni = sni
    yield srv
    srv.close()


def test_https_sends_the_original_name_as_sni(tls_server):
    url = f"https://public.example:{tls_server.port}/"
    with pytest.raises(ToolError, match=r"fetch of public\.example failed: .*CERTIFICATE_VERIFY_FAILED"):
        fetch_public(url, timeout_s=TIMEOUT_S, max_bytes=1000, resolve=names({"public.example": ["127.0.0.1"]}),
                     allow=LOOPBACK)
    assert tls_server.sni == ["public.example"]  # while the connection went to 127.0.0.1


def test_page_text_of_plain_and_unsupported_pages():
    assert page_text(Page("http://a.test/", 200, "text/plain", "  some\ntext ")) == ("", "some\ntext")
    with pytest.raises(ToolError, match="unsupported content type application/pdf"):
        page_text(Page("http://a.test/x.pdf", 200, "application/pdf", "%PDF"))

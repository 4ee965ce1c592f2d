"""
Fetch a page from the public internet for a tool, refusing every address that is not public (SSRF). The host is
resolved once, every address checked, and the connection goes to the checked IP itself (Host header and TLS SNI keep
the name), so DNS rebinding cannot send the request inside; each redirect hop is checked the same way.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from html.parser import HTMLParser
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import httpx

from core.tool_calls import ToolError

MAX_REDIRECTS = 3
SCHEMES = ("http", "https")
CGNAT = ip_network("100.64.0.0/10")  # carrier-grade NAT: not global, and older Pythons' is_private misses it
NAT64 = ip_network("64:ff9b::/96")  # carries an IPv4 address in its last 32 bits
HTML_TYPES = ("text/html", "application/xhtml+xml")
SKIPPED_TAGS = frozenset({"script", "style", "noscript", "template"})
INLINE_TAGS = frozenset({"a", "abbr", "b", "cite", "code", "em", "i", "mark", "q", "s", "small", "span", "strong",
                         "sub", "sup", "u"})

Address = IPv4Address | IPv6Address
Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class Page:
    url: str  # after redirects
    status: int
    content_type: str  # the media type alone, lower case ("text/html"); "" when the server sent none
    text: str
    truncated: bool = False  # the body was longer than max_bytes and was cut there


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of host, as the system resolver gives them."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def resolve_within(resolve: Resolver, host: str, port: int, timeout_s: float) -> list[str]:
    """resolve(host, port), given up after timeout_s (OSError). The system resolver takes no timeout, so the lookup
    runs in a daemon thread of its own, left to finish: a tool worker is never held by a name server."""
    answer: queue.SimpleQueue = queue.SimpleQueue()

    def lookup() -> None:
        try:
            answer.put(resolve(host, port))
        except OSError as e:
            answer.put(e)

    threading.Thread(target=lookup, name=f"resolve {host}", daemon=True).start()
    try:
        found = answer.get(timeout=max(timeout_s, 0))
    except queue.Empty:
        raise OSError(f"no answer within {timeout_s:.1f} s") from None
    if isinstance(found, OSError):
        raise found
    return found


def is_public(ip: Address) -> bool:
    """Whether ip is a globally routed unicast address (no loopback, private, link-local, CGNAT, multicast...)."""
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return is_public(ip.ipv4_mapped)
        embedded = ip.sixtofour or (IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None and not is_public(embedded):
            return False
    special = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified or (ip in CGNAT if isinstance(ip, IPv4Address) else ip.is_site_local))
    return ip.is_global and not special


def _allowed(ip: Address, allow: Collection[IPv4Network | IPv6Network]) -> bool:
    # the version check matters: ipaddress tests an IPv6 address against an IPv4 network by its low bits
    return any(ip.version == net.version and ip in net for net in allow) or is_public(ip)


def check_url(url: httpx.URL, resolve: Resolver, allow: Collection[IPv4Network | IPv6Network]) -> str:
    """The address to connect to for url, once every address of its host is known to be public; else ToolError."""
    if url.scheme not in SCHEMES:
        raise ToolError(f"refused: {url.scheme or 'no'} scheme in {url}, only http and https are fetched")
    host = url.raw_host.decode("ascii")
    if not host:
        raise ToolError(f"refused: no host in {url}")
    try:
        literal: Address | None = ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if not _allowed(literal, allow):
            raise ToolError(f"refused: {literal} is not a public address")
        return str(literal)
    try:
        found = resolve(host, url.port or (443 if url.scheme == "https" else 80))
    except OSError as e:
        raise ToolError(f"cannot resolve {host}: {e}") from None
    if not found:
        raise ToolError(f"refused: {host} has no address")
    for text in found:
        try:
            ip = ip_address(text)
        except ValueError:  # e.g. a scoped IPv6 address: link-local anyway
            raise ToolError(f"refused: {host} resolves to {text}, not a public address") from None
        if not _allowed(ip, allow):
            raise ToolError(f"refused: {host} resolves to {ip}, not a public address")
    return str(ip_address(found[0]))


def fetch_public(url: str, *, timeout_s: float, max_bytes: int, resolve: Resolver = resolve_host,
                 allow: Collection[IPv4Network | IPv6Network] = frozenset()) -> Page:
    """GET url from a public address, following at most MAX_REDIRECTS redirects, all within timeout_s; the body is
    cut at max_bytes. Refusals and failures raise ToolError. allow: networks treated as public (tests only)."""
    deadline = time.monotonic() + timeout_s
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise ToolError(f"refused: {url!r} is not a valid URL ({e})") from None
    for redirects in range(MAX_REDIRECTS + 1):
        ip = check_url(current, lambda h, p: resolve_within(resolve, h, p, deadline - time.monotonic()), allow)
        host = current.raw_host.decode("ascii")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ToolError(f"fetch of {url} timed out")
        # identity: a compressed body would be inflated past max_bytes before it could be cut
        headers = {"Host": current.netloc.decode("ascii"), "Accept-Encoding": "identity"}
        extensions = {"sni_hostname": host} if current.scheme == "https" else {}
        try:
            # a client per hop: a pooled TLS connection to the same IP must not serve a different name
            with httpx.Client(timeout=remaining, trust_env=False) as client:
                request = client.build_request("GET", current.copy_with(host=ip), headers=headers,
                                               extensions=extensions)
                response = client.send(request, stream=True)
                try:
                    if not response.is_redirect:
                        return _page(current, response, max_bytes, deadline)
                    location = response.headers["Location"]
                finally:
                    response.close()
        except httpx.HTTPError as e:
            reason = "timed out" if isinstance(e, httpx.TimeoutException) else str(e) or type(e).__name__
            raise ToolError(f"fetch of {host} failed: {reason}") from None
        if redirects == MAX_REDIRECTS:
            break
        try:
            current = current.join(location)
        except httpx.InvalidURL as e:
            raise ToolError(f"refused: bad redirect from {host} ({e})") from None
    raise ToolError(f"refused: {url} redirects more than {MAX_REDIRECTS} times")


def _page(url: httpx.URL, response: httpx.Response, max_bytes: int, deadline: float) -> Page:
    body, truncated = bytearray(), False
    for chunk in response.iter_bytes():
        body += chunk[:max_bytes - len(body)]
        if len(body) >= max_bytes:
            truncated = True
            break
        # httpx's read timeout is per read: a body trickled in can overrun the deadline by one read at most
        if time.monotonic() > deadline:
            raise ToolError(f"fetch of {url.host} timed out")
    try:
        text = body.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return Page(str(url), response.status_code, content_type, text, truncated)


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: list[str] = []
        self.text: list[str] = []
        self.skipping = 0
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in INLINE_TAGS:  # other tags separate words: <p>a</p><p>b</p> is "a b", a<b>b</b> is "ab"
            self.text.append(" ")
        if tag in SKIPPED_TAGS:
            self.skipping += 1
        elif tag == "title":
            self.in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag not in INLINE_TAGS:
            self.text.append(" ")
        if tag in SKIPPED_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "title":
            self.in_title = False

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.skipping:
            self.text.append(data)


def _collapse(parts: list[str]) -> str:
    return " ".join("".join(parts).split())


def page_text(page: Page) -> tuple[str, str]:
    """(title, visible text) of an HTML page, whitespace collapsed; ("", text) of a text/plain one."""
    if page.content_type in HTML_TYPES:
        parser = _TextParser()
        parser.feed(page.text)
        parser.close()
        return _collapse(parser.title), _collapse(parser.text)
    if page.content_type == "text/plain":
        return "", page.text.strip()
    raise ToolError(f"unsupported content type {page.content_type or '(none)'} at {page.url}")

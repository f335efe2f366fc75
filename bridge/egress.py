"""The one check every fetch a payload asks for goes through (no SSRF).

Some URLs the daemon fetches or posts to come from the outside: the AI bot's ``response_url`` is in
the callback, an attachment's URL is in the envelope. Left alone, a caller could aim the daemon at
``http://127.0.0.1:…/admin`` or the cloud's metadata address. :class:`Egress` allows a URL when:

1. its scheme is ``https`` or ``http`` and it names a host (no user:password);
2. the host is on the allow-list (``[http] fetch_hosts``: exact names, or ``.example.com`` for the
   domain and its subdomains; WeCom's and WeChat's own by default) — an IP literal only if listed;
3. every address the host resolves to is public, or inside a network of ``[http] fetch_private``
   (none by default): loopback, private (RFC 1918, ULA), link-local (the metadata address among them),
   CGNAT, multicast, reserved and unspecified addresses are refused.

Redirects are followed by :meth:`Egress.get` one hop at a time, each hop checked again.
Known limit: the address is checked when the check runs; the HTTP client resolves the name again
when it connects (a DNS answer that changes in between is not caught; see the README).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from bridge.errors import EgressRefused

#: WeCom's and WeChat's own hosts: the API (qyapi.weixin.qq.com, api.weixin.qq.com), media and
#: pictures (*.qpic.cn, *.qlogo.cn)
DEFAULT_HOSTS = (".weixin.qq.com", ".qq.com", ".qpic.cn", ".qlogo.cn")
#: redirects :meth:`Egress.get` follows, each checked
MAX_REDIRECTS = 3

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _internal(addr: _Addr) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_global or addr.is_multicast


class Egress:
    """The allow-list and the address rule, from ``[http] fetch_hosts`` and ``fetch_private``."""

    def __init__(self, hosts: Iterable[str] = DEFAULT_HOSTS, private: Iterable[str] = ()) -> None:
        self.exact: set[str] = set()
        self.suffixes: tuple[str, ...] = ()
        suffixes = []
        for h in hosts:
            h = h.strip().lower().rstrip(".")
            if h.startswith("."):
                suffixes.append(h)
            elif h:
                self.exact.add(h.strip("[]"))
        self.suffixes = tuple(suffixes)
        self.private: tuple[_Net, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in private)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.exact or any(host.endswith(s) or host == s[1:] for s in self.suffixes)

    def address_allowed(self, addr: _Addr) -> bool:
        return not _internal(addr) or any(addr in n for n in self.private)

    def check_url(self, url: str) -> str:
        """The URL's host when scheme, form and allow-list pass (no DNS); else :class:`EgressRefused`."""
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            _ = parts.port  # a bad port raises here
        except ValueError:
            raise EgressRefused("refused URL: malformed") from None
        if parts.scheme not in ("https", "http") or not host:
            raise EgressRefused("refused URL: not an http(s) URL with a host")
        if parts.username is not None or parts.password is not None:
            raise EgressRefused("refused URL: credentials in the URL")
        if not self.host_allowed(host):
            raise EgressRefused(f"refused URL: host {host[:80]} is not in [http] fetch_hosts")
        return host

    async def check(self, url: str) -> None:
        """:meth:`check_url`, then every address the host resolves to must be allowed."""
        host = self.check_url(url)
        try:
            addrs: list[_Addr] = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError:
                return  # unresolvable: the fetch itself fails (and may be retried)
            addrs = [ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos]
        for a in addrs:
            if not self.address_allowed(a):
                raise EgressRefused(
                    f"refused URL: {host[:80]} resolves to an internal address "
                    "(allow it with [http] fetch_private)"
                )

    @asynccontextmanager
    async def get(self, session: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
        """``session.get(url)`` with every hop checked, redirects followed by hand (at most
        :data:`MAX_REDIRECTS`)."""
        for _ in range(MAX_REDIRECTS + 1):
            await self.check(url)
            async with session.get(url, allow_redirects=False, **kw) as resp:
                location = resp.headers.get("Location")
                if resp.status in (301, 302, 303, 307, 308) and location:
                    url = urljoin(url, location)
                    continue
                yield resp
                return
        raise EgressRefused("refused URL: too many redirects")

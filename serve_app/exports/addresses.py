"""Where an export webhook connects: the addresses its host resolves to, whether each is public, and the
request pinned to an address that was checked (a second lookup, by the HTTP client, could answer otherwise:
DNS rebinding)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import httpx

IPAddress = IPv4Address | IPv6Address

NAT64 = ip_network("64:ff9b::/96")
"""The well-known NAT64 prefix (RFC 6052): the low 32 bits are the IPv4 address the translator reaches."""
WRAPPING_NETWORKS = (ip_network("64:ff9b:1::/48"), ip_network("::/96"))
"""IPv6 ranges that reach IPv4 addresses the check cannot read back, never public: local-use NAT64 (RFC 8215)
and the deprecated IPv4-compatible addresses."""


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address ``address`` leads to: IPv4-mapped (``::ffff:0:0/96``), 6to4 (``2002::/16``) or NAT64
    (``64:ff9b::/96``); None for any other."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether a webhook may connect to ``address``: it is global, and so is any IPv4 address it wraps
    (``ipaddress`` calls ``64:ff9b::7f00:1`` or ``2002:7f00:1::`` global though they lead to 127.0.0.1)."""
    if not address.is_global:
        return False
    if isinstance(address, IPv4Address):
        return True
    if any(address in network for network in WRAPPING_NETWORKS):
        return False
    inner = embedded_ipv4(address)
    return inner is None or inner.is_global


async def resolve(host: str) -> list[IPAddress]:
    """Every address ``host`` resolves to (a literal: itself), in the resolver's order, each once; OSError when
    it resolves to none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ip_address(str(info[4][0]).split("%")[0]) for info in infos))


@dataclass(frozen=True)
class Pinned:
    """A request to a URL sent to one address of its host."""

    url: str
    """The URL with the address for its host; scheme, credentials, port, path and query as they were."""
    headers: dict[str, str] = field(default_factory=dict)
    """The ``Host`` header the URL itself would send."""
    extensions: dict[str, str] = field(default_factory=dict)
    """For https, ``sni_hostname``: the name TLS sends and checks the certificate against (httpcore reads it)."""


def pinned(url: str, address: IPAddress) -> Pinned:
    """The request for ``url`` connected to ``address`` (one its host resolved to)."""
    original = httpx.URL(url)
    target = original.copy_with(host=str(address))  # httpx brackets an IPv6 address
    extensions = {"sni_hostname": original.raw_host.decode("ascii")} if original.scheme == "https" else {}
    return Pinned(str(target), {"Host": original.netloc.decode("ascii")}, extensions)

"""The one policy for every URL the server fetches or posts to on a client's behalf: input
images and masks, webhooks, and LoRA weights (server/worker/lora/cache.py streams those to disk,
checking every hop with `FetchPolicy.check`).

- http and https only;
- the host's addresses are checked before each connection, and again for every redirect:
  link-local addresses (169.254.0.0/16, fe80::/10; cloud metadata services live there),
  the known metadata addresses and names, unspecified and multicast addresses are refused;
- `--fetch-deny` hosts and networks are refused; with `--fetch-allow` set, only listed hosts
  and networks are allowed;
- LAN and loopback addresses stay allowed by default: studios serve their files on their own
  network (deny `127.0.0.0/8` or private ranges explicitly where that is not wanted);
- timeouts and a size cap on every download.

Entries of the allow and deny lists are host names (`files.lan`), name patterns
(`*.studio.lan`), addresses (`10.0.0.5`) or networks (`10.0.0.0/8`).

The check resolves the name and then lets httpx connect, so a DNS answer that changes in
between (rebinding) is not caught; deny lists by name and network cover the common cases.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from server.config import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchRefused(ValueError):
    """The URL may not be fetched; the message says why, for the client."""


@dataclass(frozen=True)
class HostRules:
    names: tuple[str, ...]  # exact names and "*.domain" patterns, lower case
    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, entries: list[str]) -> HostRules:
        names: list[str] = []
        networks: list[Network] = []
        for entry in entries:
            entry = entry.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.append(entry)
        return cls(tuple(names), tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.names or self.networks)

    def matches_name(self, host: str) -> bool:
        return any(host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in self.names)

    def matches_address(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class FetchPolicy:
    allow: HostRules
    deny: HostRules

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls(allow=HostRules.parse(settings.fetch_allow), deny=HostRules.parse(settings.fetch_deny))

    async def check(self, url: str) -> None:
        """Raise FetchRefused unless `url` may be fetched now (its addresses resolved)."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower().rstrip(".")
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchRefused(f"invalid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise FetchRefused("only absolute http:// and https:// URLs are fetched")
        if host in METADATA_NAMES:
            raise FetchRefused(f"{host} is a cloud metadata service")
        if self.deny.matches_name(host):
            raise FetchRefused(f"{host} is on this server's deny list")
        addresses = await resolve(host, port)
        if not addresses:
            raise FetchRefused(f"{host} does not resolve")
        for address in addresses:
            reason = refused_address(address)
            if reason:
                raise FetchRefused(f"{host} resolves to {address}, {reason}")
            if self.deny.matches_address(address):
                raise FetchRefused(f"{host} ({address}) is on this server's deny list")
        if self.allow and not (
            self.allow.matches_name(host) or all(self.allow.matches_address(a) for a in addresses)
        ):
            raise FetchRefused(f"{host} is not on this server's allow list")


def refused_address(address: Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "not a host address"
    return None


async def resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    # Scope ids ("fe80::1%eth0") are not part of the address.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


class TooLarge(Exception):
    """The body is over the size cap."""


class FetchFailed(Exception):
    """The server answered, but not with the file (the message has the HTTP status)."""


async def fetch(url: str, policy: FetchPolicy, *, max_bytes: int, timeout: float) -> bytes:
    """GET `url` under the policy, following redirects (each one checked again). Raises
    FetchRefused, TooLarge, FetchFailed (an answer other than 200) or httpx.HTTPError."""
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await policy.check(url)
            async with client.stream("GET", url) as response:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchFailed(f"HTTP {response.status_code} from {url}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise TooLarge
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge
                    chunks.append(chunk)
                return b"".join(chunks)
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")

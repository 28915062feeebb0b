"""The one policy for every URL the server fetches or posts to on a client's behalf: input
images and masks, webhooks, and LoRA weights (server/worker/lora/cache.py streams those to disk).

Closed by default (a client must not make the server reach the box itself or its cloud):
- http and https only;
- loopback (127.0.0.0/8, ::1, `localhost`), link-local (169.254.0.0/16, fe80::/10), the cloud
  metadata addresses and names (169.254.169.254, fd00:ec2::254, metadata.google.internal, ...),
  unspecified (0.0.0.0, ::), multicast and reserved addresses are refused, also when written
  inside an IPv6 address (::ffff:127.0.0.1, 64:ff9b::7f00:1, 2002:7f00:1::);
- `--outbound-allow` opens hosts and networks among those (a test rig, a webhook receiver on the
  same box); a metadata address opens only when listed exactly (its /32 or /128, or its name);
- private ranges (10/8, 172.16/12, 192.168/16, fc00::/7, 100.64/10) stay allowed: studios fetch
  inputs and LoRAs from, and post webhooks to, their own network. Close them with `--fetch-deny`;
- `--fetch-deny` hosts and networks are refused; with `--fetch-allow` set, only listed hosts
  and networks are reached at all.

No DNS rebinding: a host's name is resolved once per connection, every address it resolves
to is checked, and the connection goes to the checked address itself (`Target`), with the
original Host header and TLS server name (certificates are verified against the name). Each
redirect is a new target, checked again. Pinned connections are never reused for another
name (no keep-alive), so a TLS session verified for one name never carries another's request.

Entries of every list are host names (`files.lan`), name patterns (`*.studio.lan`), addresses
(`10.0.0.5`) or networks (`10.0.0.0/8`).
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
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Pinned connections are used once: see the module's docstring.
PINNED_LIMITS = httpx.Limits(max_keepalive_connections=0)


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
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.append(entry)
        return cls(tuple(names), tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.names or self.networks)

    def matches_name(self, host: str) -> bool:
        return any(host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in self.names)

    def matches_address(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def lists_address(self, address: Address) -> bool:
        """The address itself is an entry (a network of one address)."""
        return any(network.num_addresses == 1 and address in network for network in self.networks)


def embedded_ipv4(address: Address) -> Address:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, compatible), else itself:
    each of them may reach that IPv4 host."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if int(address) >> 32 == 0 and int(address) > 1:  # ::a.b.c.d (deprecated "compatible")
        return ipaddress.IPv4Address(int(address))
    return address


def closed_reason(address: Address) -> str | None:
    """Why an address is closed by default, or None (public and private hosts). An IPv6
    address that carries an IPv4 one is judged by the IPv4 host it leads to."""
    host = embedded_ipv4(address)
    if host in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if host.is_loopback:
        return "a loopback address"
    if host.is_link_local:
        return "a link-local address"
    if host.is_unspecified:
        return "an unspecified address"
    if host.is_multicast or host.is_reserved:
        return "not a host address"
    return None


@dataclass(frozen=True)
class Target:
    """One checked connection: the URL as given, and the address to connect to."""

    url: str
    host: str  # lower case, as in the URL (for the Host header and TLS)
    address: Address

    def request(self, client: httpx.AsyncClient, method: str, **kwargs: object) -> httpx.Request:
        """A request to `url` sent to `address`: the URL's host is replaced by the address, the
        Host header and the TLS server name (SNI, certificate check) stay the URL's."""
        url = httpx.URL(self.url)
        pinned = url.copy_with(host=str(self.address))
        headers = httpx.Headers(kwargs.pop("headers", None))  # type: ignore[arg-type]
        headers["Host"] = url.netloc.decode("ascii")
        extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
        return client.build_request(method, pinned, headers=headers, extensions=extensions, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FetchPolicy:
    allow: HostRules
    deny: HostRules
    # Closed destinations the operator opened (`--outbound-allow`).
    open: HostRules = HostRules((), ())

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls(
            allow=HostRules.parse(settings.fetch_allow),
            deny=HostRules.parse(settings.fetch_deny),
            open=HostRules.parse(settings.outbound_allow),
        )

    def check_static(self, url: str) -> tuple[str, int]:
        """What can be refused without a DNS lookup (scheme, metadata and loopback names,
        address literals, the name lists); returns `(host, port)`. Raises FetchRefused."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower().rstrip(".")
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchRefused(f"invalid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise FetchRefused("only absolute http:// and https:// URLs are fetched")
        if host in METADATA_NAMES and not self.open.matches_name(host):
            raise FetchRefused(f"{host} is a cloud metadata service")
        if (host in LOOPBACK_NAMES or host.endswith(".localhost")) and not self.open.matches_name(host):
            raise FetchRefused(f"{host} is this machine (a loopback name); see --outbound-allow")
        if self.deny.matches_name(host):
            raise FetchRefused(f"{host} is on this server's deny list")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return host, port
        self._check_address(host, literal)
        return host, port

    async def target(self, url: str) -> Target:
        """Check `url`, resolve its host once, check every address; the address to connect
        to. Raises FetchRefused."""
        host, port = self.check_static(url)
        addresses = await resolve(host, port)
        if not addresses:
            raise FetchRefused(f"{host} does not resolve")
        for address in addresses:
            self._check_address(host, address)
        if self.allow and not (
            self.allow.matches_name(host) or all(self.allow.matches_address(a) for a in addresses)
        ):
            raise FetchRefused(f"{host} is not on this server's allow list")
        return Target(url=url, host=host, address=addresses[0])

    async def check(self, url: str) -> None:
        """Raise FetchRefused unless `url` may be fetched now (its addresses resolved)."""
        await self.target(url)

    def _check_address(self, host: str, address: Address) -> None:
        reason = closed_reason(address)
        if reason is not None and not self._opened(host, address):
            where = host if host == str(address) else f"{host} resolves to {address}"
            raise FetchRefused(f"{where}, {reason}, which this server does not reach (see --outbound-allow)")
        if self.deny.matches_address(address):
            raise FetchRefused(f"{host} ({address}) is on this server's deny list")

    def _opened(self, host: str, address: Address) -> bool:
        if self.open.matches_name(host):
            return True
        if embedded_ipv4(address) in METADATA_ADDRESSES or address in METADATA_ADDRESSES:
            return self.open.lists_address(address)
        return self.open.matches_address(address)


async def resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    # Scope ids ("fe80::1%eth0") are not part of the address.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


class TooLarge(Exception):
    """The body is over the size cap."""


class FetchFailed(Exception):
    """The server answered, but not with the file (the message has the HTTP status)."""


class DeadlineExceeded(httpx.TimeoutException):
    """The whole fetch (every redirect, connection and read) took longer than allowed."""


def pinned_client(timeout: float) -> httpx.AsyncClient:
    """A client for `Target.request`s: per-operation timeouts, no redirects followed by itself,
    no connection reuse."""
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, limits=PINNED_LIMITS)


async def get_following_redirects(
    client: httpx.AsyncClient, url: str, policy: FetchPolicy
) -> tuple[httpx.Response, str]:
    """GET `url` (streamed: the caller reads and closes the response), following redirects,
    each to a target checked again. Returns the final response and its URL."""
    for _ in range(MAX_REDIRECTS + 1):
        target = await policy.target(url)
        response = await client.send(target.request(client, "GET"), stream=True)
        if response.status_code in REDIRECTS and "location" in response.headers:
            await response.aclose()
            url = urljoin(url, response.headers["location"])
            continue
        return response, url
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


async def fetch(url: str, policy: FetchPolicy, *, max_bytes: int, timeout: float) -> bytes:
    """GET `url` under the policy, following redirects (each one checked again), all within
    `timeout` seconds in total. Raises FetchRefused, TooLarge, FetchFailed (an answer other
    than 200) or httpx.HTTPError (DeadlineExceeded past the deadline)."""
    try:
        return await asyncio.wait_for(_fetch(url, policy, max_bytes=max_bytes, timeout=timeout), timeout)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"took longer than {timeout:g} s in all") from None


async def _fetch(url: str, policy: FetchPolicy, *, max_bytes: int, timeout: float) -> bytes:
    async with pinned_client(timeout) as client:
        response, url = await get_following_redirects(client, url, policy)
        try:
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
        finally:
            await response.aclose()

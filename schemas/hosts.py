"""Which network hosts a job may make the worker (or the local endpoint) reach: public ones only.

A URL a job names (an http(s) dataset path, a webhook) is checked twice, by the same rule:
- `check_url(url, env)` at validation, on the text alone: the scheme is http(s); the host is not a
  private, loopback, link-local, unspecified, multicast or otherwise non-public IP literal (IPv6
  forms that embed an IPv4 address are unwrapped first); not a numeric spelling that is not the
  canonical dotted quad (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`); and not a name that
  only means something inside a network (`localhost`, cloud metadata names, `*.internal`, …).
- `allowed_addresses(host, port, env)` at fetch time: the name is resolved once and every address
  must pass; the caller connects to one of the returned addresses, never resolves again, so a DNS
  answer cannot change between the check and the connection (DNS rebinding). Every redirect hop
  goes through both checks.

The operator widens the rule with FTW_ALLOWED_HOSTS: comma-separated host names (which are then
trusted, whatever they resolve to) and IP ranges in CIDR form (`10.0.0.0/8`, `127.0.0.1`,
`fd00::/8`). Import-light (stdlib only): validation runs it in the orchestrator.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

ALLOW_ENV = "FTW_ALLOWED_HOSTS"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# one answer of socket.getaddrinfo: (family, type, proto, canonname, sockaddr); typeshed's sockaddr also
# admits (int, bytes), a Python built without IPv6
SocketAddress = tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]
AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, SocketAddress]
# names that resolve to a machine's own services or a cloud's instance metadata
INTERNAL_NAMES = frozenset(
    {
        "localhost",
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "host.docker.internal",
        "gateway.docker.internal",
    }
)
INTERNAL_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa", ".svc", ".cluster.local")
# IPv6 prefixes whose low 32 bits are an IPv4 address a packet may end up at
EMBEDDED_V4 = (
    ipaddress.ip_network("::/96"),
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
)
NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*$", re.I)
WIDEN = f"or ask the endpoint operator to allow the host in {ALLOW_ENV}"


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HostPolicy:
        names, networks = set(), []
        for item in (env.get(ALLOW_ENV) or "").split(","):
            item = item.strip().lower().rstrip(".")
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            # a URL or host:port written where a host is meant: the host is what the operator means
            host = urlsplit(item if "://" in item else f"//{item}").hostname or item
            try:
                networks.append(ipaddress.ip_network(host, strict=False))
            except ValueError:
                names.add(host.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def name_allowed(self, host: str) -> bool:
        return host in self.names

    def address_problem(self, address: IPAddress) -> str | None:
        """None when `address` is public or inside an allowed range; else why it is refused."""
        if any(address in net for net in self.networks if net.version == address.version):
            return None
        inner = embedded_v4(address)
        if inner is not None:
            problem = self.address_problem(inner)
            return problem and f"{problem} (written as the IPv6 address {address})"
        kind = non_public_kind(address)
        return f"{address} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} address" if kind else None


def embedded_v4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in net for net in EMBEDDED_V4) and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def non_public_kind(address: IPAddress) -> str | None:
    for kind, test in (
        ("unspecified", "is_unspecified"),
        ("loopback", "is_loopback"),
        ("link-local", "is_link_local"),
        ("multicast", "is_multicast"),
        ("private", "is_private"),
        ("reserved", "is_reserved"),
    ):
        if getattr(address, test):
            return kind
    return None if address.is_global else "non-public"


def host_of(url: str) -> tuple[str, int]:
    """The URL's host (lowercase, no trailing dot, no brackets) and port; ValueError if it has none."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("no host")
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def literal_problem(host: str, policy: HostPolicy) -> str | None:
    """What is wrong with a host as written (no DNS): internal names, non-public or odd numeric forms."""
    if policy.name_allowed(host):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        address = None
    if address is not None:
        return policy.address_problem(address)
    if NUMERIC_HOST.fullmatch(host):
        return (
            f"host {host[:80]!r} is a numeric address written in a non-standard form (hex, octal, decimal or shortened)"
        )
    if host in INTERNAL_NAMES or host.endswith(INTERNAL_SUFFIXES) or "." not in host:
        return f"host {host[:80]!r} names a machine inside a network (local, metadata or cluster-internal name)"
    return None


def check_url(url: str, env: Mapping[str, str], what: str = "URL") -> str | None:
    """None when a job may name `url`; else the message (validation: the text alone, no DNS)."""
    try:
        if urlsplit(url).scheme not in ("http", "https"):
            return f"{what} must be http:// or https://"
        host, _ = host_of(url)
    except ValueError as e:
        return f"{what} {shorten(public_form(url))!r} has no valid host ({e})"
    problem = literal_problem(host, HostPolicy.from_env(env))
    return problem and f"{what} {shorten(public_form(url))!r} is refused: {problem}; use a public host, {WIDEN}"


def allowed_addresses(host: str, port: int, env: Mapping[str, str]) -> Sequence[AddressInfo]:
    """getaddrinfo's answers for (host, port), all checked; OSError (with the reason) when any is refused.

    Connect to these and nothing else: the name is not resolved again.
    """
    policy = HostPolicy.from_env(env)
    problem = literal_problem(host, policy)
    if problem:
        raise PermissionError(f"{problem}; {WIDEN}")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if policy.name_allowed(host):
        return infos
    for info in infos:
        problem = policy.address_problem(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        if problem:
            raise PermissionError(f"host {host[:80]!r} resolves to a refused address: {problem}; {WIDEN}")
    return infos


def public_form(url: str) -> str:
    """A URL as messages may show it: no user:password, no query string (presigned signatures)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return url.split("://", 1)[0] + "://(unparsable)"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"

"""Where a notification may connect: every address it reaches must be public or explicitly allowed.

One rule (:func:`address_problem`), applied twice:

- :func:`host_problem` checks a host named in a URL, before anything is sent (at submit and again when
  the notify task starts): a name is resolved, and each of its addresses must pass.
- :func:`guarded` wraps the send itself: every name that code resolves through Python's ``socket`` module
  while the guard is on (requests, smtplib, apprise's plugins) is checked as it is resolved, and an
  address that fails is never handed to the caller. The address checked is the address connected to, so
  a name that changes its answer between the check and the request (DNS rebinding) gains nothing, and a
  host no parser saw (an apprise plugin's own redirect, an SMTP server named in a query) is caught too.

Refused: loopback, private, link-local, unspecified (``0.0.0.0`` reaches the host itself), multicast,
reserved and every other non-global range; IPv4 inside IPv6 (``::ffff:127.0.0.1``, NAT64) is judged by
its IPv4 address. Numeric IPv4 forms that the C resolver accepts (``0x7f000001``, ``2130706433``,
``127.1``) are read as the address they name, and ``localhost``, ``localhost.`` and ``*.localhost`` are
loopback without asking DNS (RFC 6761). ``GPUYARD_NOTIFY_ALLOWED_NETWORKS`` lists the exceptions.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_HINT = "allowed: public addresses or GPUYARD_NOTIFY_ALLOWED_NETWORKS"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_NUMERIC = frozenset("0123456789abcdefxABCDEFX.")


def allowed_networks(settings: Settings) -> list[Network]:
    """``GPUYARD_NOTIFY_ALLOWED_NETWORKS`` as networks (the setting was validated at start-up)."""
    return [
        ipaddress.ip_network(n.strip(), strict=False) for n in settings.notify_allowed_networks.split(",") if n.strip()
    ]


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _kind(address: Address) -> str | None:
    """What makes ``address`` internal ("a loopback address"), or None for a public one."""
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "the unspecified address (this host)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "a non-public address"
    return None


def address_problem(address: Address | str, allowed: Sequence[Network]) -> str | None:
    """Why ``address`` may not be reached ("127.0.0.1, a loopback address"), or None when it may."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is not part of the address
    inner = _embedded_ipv4(address)
    candidates = [address, inner] if inner is not None else [address]
    if any(candidate in network for candidate in candidates for network in allowed):
        return None
    if inner is not None and (kind := _kind(inner)):
        return f"{address} (IPv4 {inner}), {kind}"
    kind = _kind(address)
    return f"{address}, {kind}" if kind else None


def literal_address(host: str) -> Address | None:
    """The address ``host`` spells without DNS: an IP literal (``[::1]`` too) or a numeric IPv4 form the
    C resolver accepts (``0x7f000001``, ``2130706433``, ``127.1``); None for a name."""
    bare = host.strip("[]").split("%", 1)[0]
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(bare)
    if bare and set(bare) <= _IPV4_NUMERIC and any(c.isdigit() for c in bare):
        with contextlib.suppress(OSError):
            return ipaddress.IPv4Address(socket.inet_aton(bare))
    return None


def is_localhost_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def host_problem(host: str, port: int | None, allowed: Sequence[Network]) -> str | None:
    """Why a connection to ``host`` would be refused ("resolves to 127.0.0.1, a loopback address; …"),
    or None when every address it resolves to may be reached.

    Raises:
        socket.gaierror: the name does not resolve now (it may later; the send checks again).
    """
    literal = literal_address(host)
    if literal is not None:
        addresses: list[Address | str] = [literal]
    elif is_localhost_name(host):
        addresses = [ipaddress.ip_address("127.0.0.1")]
    else:
        addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
    for address in addresses:
        problem = address_problem(address, allowed)
        if problem is not None:
            return f"resolves to {problem}; {ALLOWED_HINT}"
    return None


# ── the guard around a send ──────────────────────────────────────────────────────────────────────────
@dataclass
class Guard:
    """The policy of one send, and what it refused (shared with threads that copy the context)."""

    allowed: list[Network]
    refused: list[str] = field(default_factory=list)


_active: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("gpuyard_egress_guard", default=None)
_install_lock = threading.Lock()
_installs = 0
_inner_getaddrinfo: Any = None


def _guarded_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    results = _inner_getaddrinfo(host, port, *args, **kwargs)
    guard = _active.get()
    if guard is None:
        return results
    for info in results:
        problem = address_problem(str(info[4][0]), guard.allowed)
        if problem is not None:
            name = host.decode() if isinstance(host, bytes) else str(host)
            guard.refused.append(f"{name} resolves to {problem}; {ALLOWED_HINT}")
            # A resolver error is what every client library already handles as "cannot connect".
            raise socket.gaierror(socket.EAI_NONAME, f"gpuyard refused {name}: {problem}")
    return results


@contextlib.contextmanager
def guarded(allowed: Sequence[Network]) -> Iterator[Guard]:
    """Check every name resolved in this context (and threads that copy it) while the block runs.

    ``socket.getaddrinfo`` is wrapped while at least one guard is on anywhere in the process; outside a
    guard the wrapper only passes through. Refusals are listed on the yielded :class:`Guard`.
    """
    global _installs, _inner_getaddrinfo
    guard = Guard(list(allowed))
    with _install_lock:
        if _installs == 0:
            _inner_getaddrinfo = socket.getaddrinfo
            socket.getaddrinfo = _guarded_getaddrinfo
        _installs += 1
    token = _active.set(guard)
    try:
        yield guard
    finally:
        _active.reset(token)
        with _install_lock:
            _installs -= 1
            if _installs == 0:
                socket.getaddrinfo = _inner_getaddrinfo
                _inner_getaddrinfo = None

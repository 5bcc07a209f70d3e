"""Which URLs a webhook may be sent to.

A webhook URL is chosen by whoever holds an API key, and the server that sends to it sits in
the operator's network: left open, an endpoint on ``http://169.254.169.254/…`` or
``http://10.0.0.5/admin`` would make lorafleet a proxy into places no key holder should reach.
So only ``http(s)`` URLs of public addresses are allowed, unless the operator sets
``LORAFLEET_WEBHOOK_ALLOW_PRIVATE_TARGETS`` (receivers on the same host or private network).

The check runs twice: when an endpoint is registered (a clear 400 naming ``url``), and before
every send on the addresses the host resolves to *then*; the send connects to the address that
was checked, so a DNS answer that changes in between (rebinding) cannot redirect it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

from shared.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
# Names that reach the host itself or a cloud provider's metadata service without DNS.
_FORBIDDEN_NAMES = ("localhost", "metadata.google.internal", "metadata.goog")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# In this order: 169.254.0.0/16 is private as well, but "link-local" says more.
_KINDS = (("loopback", "a loopback address"), ("link_local", "a link-local address"),
          ("private", "a private address"), ("multicast", "a multicast address"),
          ("reserved", "a reserved address"), ("unspecified", "an unspecified address"))


class ForbiddenTarget(InvalidRequest):
    """A webhook URL that is not ``http(s)``, or whose host is not a public address."""

    code = "invalid_url"

    def __init__(self, message: str):
        super().__init__(message, param="url")


def parse_url(url: str) -> SplitResult:
    """``url`` split, once it is an absolute ``http(s)`` URL with a host.

    Raises:
        ForbiddenTarget: another scheme, no host, a bad port, or longer than 2048 characters.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ForbiddenTarget(f"url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ForbiddenTarget(f"url is not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise ForbiddenTarget(f"url must start with http:// or https://, not '{url[:40]}'")
    if not parts.hostname:
        raise ForbiddenTarget("url has no host")
    if port == 0:
        raise ForbiddenTarget("url has port 0")
    return parts


def forbidden_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not receive webhooks (``None``: it may): loopback, private,
    link-local (cloud metadata lives there), multicast, reserved or unspecified."""
    embedded = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is not None:
        return forbidden_reason(embedded)
    for kind, words in _KINDS:
        if getattr(address, f"is_{kind}"):
            return words
    if not address.is_global:
        return "not a public address"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_url(url: str, *, allow_private: bool) -> None:
    """The registration check: a valid ``http(s)`` URL whose host is not, and does not resolve
    to, a forbidden address. A name that does not resolve (yet) is accepted: every send checks
    again.

    Raises:
        ForbiddenTarget: naming ``url`` and why.
    """
    parts = parse_url(url)
    if allow_private:
        return
    host = parts.hostname or ""
    if host.rstrip(".").lower().endswith(_FORBIDDEN_NAMES):
        raise ForbiddenTarget(f"url host '{host}' is a local or metadata name; private "
                              "targets are off (LORAFLEET_WEBHOOK_ALLOW_PRIVATE_TARGETS)")
    with contextlib.suppress(OSError):
        resolve(parts, allow_private=False)


def resolve(parts: SplitResult, *, allow_private: bool) -> list[str]:
    """The addresses to send to for a parsed URL, all of them checked.

    Raises:
        ForbiddenTarget: the host is, or resolves to, a forbidden address (any of them: one
            good answer next to a bad one is still a way in).
        OSError: the host does not resolve (a retry may succeed).
    """
    host = parts.hostname or ""
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0])
                                       for info in infos))
    if not allow_private:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                shown = host if literal is not None else f"{host} ({address})"
                raise ForbiddenTarget(
                    f"url host {shown} is {reason}; private targets are off "
                    "(LORAFLEET_WEBHOOK_ALLOW_PRIVATE_TARGETS)")
    return [str(a) for a in addresses]

"""Which webhook URLs are refused, at registration and again at every send."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from shared.webhook_targets import ForbiddenTarget, check_url, parse_url, resolve

REFUSED = [
    "ftp://hooks.example.com/x",
    "file:///etc/passwd",
    "hooks.example.com/no-scheme",
    "http:///no-host",
    "http://127.0.0.1:8080/hook",
    "http://localhost/hook",
    "http://api.localhost/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.10/hook",
    "http://172.16.5.4/hook",
    "http://100.64.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://0.0.0.0:8000/",
    "http://[::1]:8000/",
    "http://[fe80::1]/",
    "http://[fd00:ec2::254]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://224.0.0.1/",
    "http://hooks.example.com:0/",
    "https://" + "a" * 2048 + ".com/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_refused_urls_name_the_url_field(url: str) -> None:
    with pytest.raises(ForbiddenTarget) as caught:
        check_url(url, allow_private=False)
    assert caught.value.param == "url" and caught.value.status == 400


@pytest.mark.parametrize("url", ["https://8.8.8.8/hook", "http://[2606:4700::1111]:8080/x",
                                 "https://hooks.example.invalid/never-resolves"])
def test_public_addresses_and_unresolved_names_are_accepted(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_answer(*_: Any, **__: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_answer)  # every send checks again
    check_url(url, allow_private=False)


def test_the_operator_may_allow_private_targets_but_never_other_schemes() -> None:
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/", "http://localhost/"):
        check_url(url, allow_private=True)
    with pytest.raises(ForbiddenTarget):
        check_url("gopher://127.0.0.1/", allow_private=True)


def _resolving_to(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_name_that_resolves_to_a_private_address_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving_to(monkeypatch, "93.184.215.14", "10.0.0.7")  # one bad answer is enough
    with pytest.raises(ForbiddenTarget, match=r"hooks.example.com \(10.0.0.7\) is a private"):
        check_url("https://hooks.example.com/x", allow_private=False)
    with pytest.raises(ForbiddenTarget):
        resolve(parse_url("https://hooks.example.com/x"), allow_private=False)


def test_resolve_returns_the_checked_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving_to(monkeypatch, "93.184.215.14", "2606:2800:21f::1", "93.184.215.14")
    assert resolve(parse_url("https://hooks.example.com/x"), allow_private=False) == [
        "93.184.215.14", "2606:2800:21f::1"]

"""The suite is offline: the guard conftest installs refuses the network, and a test that tries it fails."""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.request

import pytest
from helpers import NETWORK_GUARD, NetworkBlocked


def test_hub_offline_variables_are_set_for_every_test():
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # read at import: conftest set it before anything imported the hub


@pytest.mark.parametrize("address", [("203.0.113.7", 443), ("2001:db8::1", 443), ("::ffff:203.0.113.7", 80)])
def test_a_connection_beyond_this_machine_is_refused_and_recorded(address):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(NetworkBlocked, match=f"connect to {address[0]}:{address[1]}"):
            sock.connect(address)
        with pytest.raises(NetworkBlocked):
            sock.connect_ex(address)
    assert NETWORK_GUARD.take_attempts() == [f"connect to {address[0]}:{address[1]}"] * 2  # taken: this test passes


def test_dns_lookups_and_http_libraries_are_refused_too():
    with pytest.raises(NetworkBlocked, match="DNS lookup of 'huggingface.co'"):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(urllib.error.URLError, match="network access in a test"):
        urllib.request.urlopen("http://example.com/", timeout=1)
    import httpx

    with pytest.raises(httpx.ConnectError, match="network access in a test"):
        httpx.get("http://203.0.113.7/", timeout=1)
    assert len(NETWORK_GUARD.take_attempts()) == 4


def test_a_swallowed_refusal_still_fails_the_test(pytester, request):
    """What the autouse fixture does when a library catches the error and carries on."""
    [conftest] = [p for p in request.config.pluginmanager.get_plugins() if hasattr(p, "_no_network")]
    pytester.makepyfile("""
        import socket

        def test_quietly_online():
            try:
                socket.create_connection(("203.0.113.7", 80), timeout=1)
            except OSError:
                pass  # as a library falling back to its cache would
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", plugins=[conftest])
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*tried the network: connect to 203.0.113.7:80*"])


def test_loopback_and_unix_sockets_still_work(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        accepted = threading.Thread(target=lambda: server.accept()[0].close())
        accepted.start()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            pass
        accepted.join(timeout=5)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "s"))
        listener.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s"))
    assert NETWORK_GUARD.take_attempts() == []

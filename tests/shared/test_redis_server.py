"""Ports for private child processes (redis-server, the services of `vlpipe up`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vlpipe.shared.redis_server import FREE_PORTS_ENV, PRIVATE_PORTS_FROM, free_port


def test_free_ports_are_below_the_range_outgoing_connections_take_and_bindable() -> None:
    # A port from the ephemeral range could be taken by any outgoing connection in the
    # seconds before the child process binds it.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    held: list[socket.socket] = []
    try:
        for _ in range(20):
            port = free_port()
            assert PRIVATE_PORTS_FROM <= port < low
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(listener)
            listener.bind(("127.0.0.1", port))  # free when given
            listener.listen()
        assert len({s.getsockname()[1] for s in held}) == len(held)
    finally:
        for listener in held:
            listener.close()


def test_free_ports_stay_in_the_range_given_and_are_never_given_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Parallel test workers each pick from a range of their own; within one, a port given
    # once is not given again (a server killed for a moment keeps its port).
    monkeypatch.setenv(FREE_PORTS_ENV, "29000-29099")
    ports = [free_port() for _ in range(50)]
    assert all(29000 <= port <= 29099 for port in ports)
    assert len(set(ports)) == len(ports)


def test_a_range_that_is_not_one_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FREE_PORTS_ENV, "29000:29099")
    with pytest.raises(ValueError, match="VLPIPE_FREE_PORTS='29000:29099': expected LOW-HIGH"):
        free_port()
    monkeypatch.setenv(FREE_PORTS_ENV, "29099-29000")
    with pytest.raises(ValueError, match="not a range of ports"):
        free_port()

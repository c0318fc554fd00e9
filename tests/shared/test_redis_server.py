"""Ports for private child processes (redis-server, the services of `vlpipe up`)."""

from __future__ import annotations

import socket
from pathlib import Path

from vlpipe.shared.redis_server import PRIVATE_PORTS_FROM, free_port


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

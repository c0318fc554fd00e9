"""What a wake-up costs on this machine: the floor under every hop of the pipeline.

    .venv/bin/python bench/wakeup_cost.py [--seconds 2]

Prints the CPU time this process spends, for a process idle 1, 5 and 20 ms at a time:

* per sleep (the process itself wakes from idle each time);
* per loopback TCP send (1300 bytes, a 20 ms audio append) to a reader in another process
  waiting in epoll, as an event loop does (each send wakes the idle reader), its own
  sleep not counted;

and per send when the sends go back to back (the reader is awake already).

On bare metal a wake-up costs a few µs. On a virtual machine it can cost tens: a vCPU
that idles halts, and waking it (a timer, or another vCPU's interrupt) goes through the
hypervisor, the more so the longer it idled. A hop that wakes a process for each 20 ms
frame pays that per frame; reading and writing in batches pays it per batch.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import time

MESSAGE = b"x" * 1300
PACES_S = (0.001, 0.005, 0.020)


def sleep_cost_us(pace_s: float, count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        time.sleep(pace_s)
    return (time.process_time() - started) / count * 1e6


def send_cost_us(sender: socket.socket, pace_s: float | None, count: int) -> float:
    """The sender's CPU per send, paced `pace_s` apart (its sleeps not counted) or back to
    back (None)."""
    sleeping = sleep_cost_us(pace_s, count) if pace_s else 0.0
    started = time.process_time()
    for _ in range(count):
        sender.send(MESSAGE)
        if pace_s:
            time.sleep(pace_s)
    return (time.process_time() - started) / count * 1e6 - sleeping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    seconds = parser.parse_args().seconds
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the reader: waits in epoll, as an event loop does
        reader = socket.create_connection(("127.0.0.1", port))
        poller = select.epoll()
        poller.register(reader.fileno(), select.EPOLLIN)
        while True:
            poller.poll()
            if not reader.recv(1 << 20):
                os._exit(0)
    sender, _ = listener.accept()
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"{os.cpu_count()} cores; CPU of this process per operation, µs")
    print("| idle between | a sleep (wakes itself) | a send that wakes the reader |")
    print("|---|---|---|")
    for pace_s in PACES_S:
        count = int(seconds / pace_s)
        print(f"| {pace_s * 1000:g} ms | {sleep_cost_us(pace_s, count):.1f} "
              f"| {send_cost_us(sender, pace_s, count):.1f} |")  # fmt: skip
    print(f"sends back to back (the reader awake): {send_cost_us(sender, None, 20_000):.1f}")
    sender.close()
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()

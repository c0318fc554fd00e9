"""What a wake-up costs on this machine: the floor under every hop of the pipeline.

    .venv/bin/python bench/wakeup_cost.py [--count 3000]

Prints the CPU time this process spends

* per 1 ms sleep (the process wakes from idle each time),
* per TCP send on loopback to a reader in another process, when the sends are 1 ms apart
  (each wakes the idle reader) and back to back (the reader is already awake), for a
  20 ms audio append (1.3 KB) and a 100 ms answer delta (6.5 KB).

On bare metal a wake-up costs a few µs; on a virtual machine it can cost tens (the idle
CPU halts, and waking it goes through the hypervisor). A hop that wakes its process for
each 20 ms frame pays that per frame: what reading and writing in batches saves.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import time


def sleep_cost_us(count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        time.sleep(0.001)
    return (time.process_time() - started) / count * 1e6


def send_costs_us(count: int, size: int) -> tuple[float, float]:
    """(paced 1 ms apart, back to back): the sender's CPU per send, sleeps not counted."""
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
    message = b"x" * size
    sleeping = sleep_cost_us(count)
    started = time.process_time()
    for _ in range(count):
        sender.send(message)
        time.sleep(0.001)
    paced = (time.process_time() - started) / count * 1e6 - sleeping
    started = time.process_time()
    for _ in range(count):
        sender.send(message)
    together = (time.process_time() - started) / count * 1e6
    sender.close()
    os.waitpid(pid, 0)
    return paced, together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    count = parser.parse_args().count
    print(f"{os.cpu_count()} cores; CPU per operation, µs (the process's own CPU time)")
    print(f"sleep 1 ms (wake from idle): {sleep_cost_us(count):.1f}")
    for size in (1300, 6500):
        paced, together = send_costs_us(count, size)
        print(f"loopback TCP send of {size} B: waking an idle reader {paced:.1f}, "
              f"to a reader already awake {together:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()

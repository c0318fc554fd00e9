"""The Redis ACL file: one user per role from one table, hashes and never passwords.

Whether the roles are right is proven by running the whole pipeline under them
(tests/integration/test_redis_security.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shared.procs import ROOT
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_acl import AclTable

ROLES = ("ingest", "broker", "egress", "producer", "consumer", "monitor")


def passwords() -> dict[str, str]:
    return {f"VLPIPE_REDIS_PASSWORD_{r.upper()}": f"{r}-secret-password" for r in ROLES}


def test_every_role_is_a_user_with_the_hash_of_its_password_and_the_default_user_only_pings() -> (
    None
):
    text = AclTable(StreamKeys("vl")).render(passwords())
    lines = text.splitlines()
    assert lines[0] == "user default on nopass resetkeys resetchannels -@all +ping"
    assert [line.split()[1] for line in lines[1:]] == list(ROLES)
    for line in lines[1:]:
        assert line.split()[3].startswith("#") and len(line.split()[3]) == 65  # SHA-256
        assert "-@all" in line and "~*" not in line and "+@all" not in line
    assert "secret-password" not in text


def test_keys_carry_the_deployments_prefix() -> None:
    text = AclTable(StreamKeys("acme")).render(passwords())
    assert "~acme:sessions" in text and "vl:" not in text


def test_a_missing_password_is_named() -> None:
    partial = passwords()
    del partial["VLPIPE_REDIS_PASSWORD_BROKER"], partial["VLPIPE_REDIS_PASSWORD_MONITOR"]
    with pytest.raises(
        ValueError, match="VLPIPE_REDIS_PASSWORD_BROKER, VLPIPE_REDIS_PASSWORD_MONITOR"
    ):
        AclTable().render(partial)


def test_the_command_prints_or_writes_the_file(tmp_path: Path) -> None:
    env = {**os.environ, **passwords(), "VLPIPE_STREAM_PREFIX": "vl"}
    run = [sys.executable, "-m", "vlpipe", "redis-acl"]
    printed = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert printed.stdout == AclTable().render(passwords())
    subprocess.run([*run, "--out", str(tmp_path / "users.acl"), "--prefix", "x"], cwd=ROOT,
                   env=env, check=True)  # fmt: skip
    assert (tmp_path / "users.acl").read_text().count(" ~x:sessions ") == 3  # the services
    env.pop("VLPIPE_REDIS_PASSWORD_INGEST")
    missing = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "VLPIPE_REDIS_PASSWORD_INGEST" in missing.stderr

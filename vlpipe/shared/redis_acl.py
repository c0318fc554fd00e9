"""Least-privilege Redis users: one per role, generated from the one table below.

Each role gets the keys it reads (`%R~`), writes (`%W~`) or both (`~`), and the commands
it runs, nothing else. Redis (7.0 or later) checks a script twice: EVALSHA itself needs
read *and* write on every key it names (its KEYS), and each command the script runs is
checked like any other. So a service's user has EVALSHA, EVAL and SCRIPT LOAD, read and
write on the keys its fenced writes name (vlpipe.shared.fencing), and the commands those
writes run. A selector (`(...)`) grants a few commands on a wider set of keys, all in one
(Redis checks a command's keys against one selector at a time): the last write of a
session by the service that makes its outputs (the broker, or egress) names every key of
it to set their expiry, frames included, yet egress may not write frames: its selector
allows EVALSHA and EXPIRE there, not XADD.

To let a role do something new, add its keys or commands here: `vlpipe redis-acl` prints
the file and the pipeline test that runs every service as its own user (tests/integration/
test_redis_security.py) shows what is missing (Redis's ACL LOG names it).

Passwords come from `VLPIPE_REDIS_PASSWORD_<ROLE>`; the file holds only their SHA-256
(`#<hex>`), never the passwords.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from vlpipe.shared.keys import StreamKeys

ANY = "*"

CONNECTION = ("@connection", "-@admin", "-@dangerous", "cluster|slots", "cluster|shards",
              "cluster|nodes", "cluster|info", "cluster|myid")  # fmt: skip
"""What a client library sends on connecting (AUTH, HELLO, PING, SELECT, CLIENT SETNAME and,
from Redis 7.2, CLIENT SETINFO, which 7.0 cannot name), without CLIENT KILL, LIST, PAUSE;
and what a Redis Cluster client needs to learn which node serves which slot: CLUSTER SLOTS
(redis-py, and go-redis, which KEDA's scaler uses), SHARDS or NODES (other clients), INFO
and MYID. @connection holds READONLY, READWRITE, ASKING (before a command sent to a slot
being migrated) and COMMAND (GETKEYS, which redis-py's cluster client asks for XREAD's
keys). Harmless on a standalone Redis."""
READ_STREAMS = ("xread", "xrange", "xrevrange", "xlen", "xinfo|stream")
GROUPS = ("xreadgroup", "xack", "xautoclaim", "xclaim", "xpending", "xgroup|create",
          "xgroup|createconsumer", "xgroup|delconsumer", "xinfo|groups", "xinfo|consumers")  # fmt: skip
WRITE_STREAMS = ("xadd", "xtrim")
HASHES = ("hget", "hmget", "hgetall", "hset", "hsetnx", "hdel", "hincrby")
KEYSPACE = ("exists", "expire")
SCRIPTS = ("eval", "evalsha", "script|load", "script|exists")
TRANSACTIONS = ("multi", "exec", "discard")
SERVICE_COMMANDS = (*CONNECTION, *READ_STREAMS, *GROUPS, *WRITE_STREAMS, *HASHES, *KEYSPACE,
                    *SCRIPTS, *TRANSACTIONS)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Role:
    """One Redis user: its key patterns by access, its commands, and extra selectors."""

    name: str
    purpose: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    selectors: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()
    """(keys, commands) pairs: those commands only, on those keys only (read and write)."""

    @property
    def password_env(self) -> str:
        return f"VLPIPE_REDIS_PASSWORD_{self.name.upper()}"

    def rules(self) -> str:
        """This role's ACL rules, after the user name and password."""
        parts = ["resetkeys", "resetchannels", "-@all"]
        parts += [c if c.startswith("-") else f"+{c}" for c in self.commands]
        parts += [f"~{k}" for k in self.read_write]
        parts += [f"%R~{k}" for k in self.read]
        parts += [f"%W~{k}" for k in self.write]
        for keys, commands in self.selectors:
            parts.append("(" + " ".join([*(f"~{k}" for k in keys),
                                         *(f"+{c}" for c in commands)]) + ")")  # fmt: skip
        return " ".join(parts)


def relayed(keys: StreamKeys, shared: str, name: str) -> tuple[str, str]:
    """On a Redis Cluster, a shared stream's per-session outboxes and relay markers
    (vlpipe.shared.outbox): written by the service that writes the shared stream."""
    return keys.outbox(name, ANY), f"{{{shared}}}:relayed:{ANY}"


@dataclass(frozen=True, slots=True)
class AclTable:
    """Every role of a deployment whose keys carry `keys.prefix`."""

    keys: StreamKeys = field(default_factory=StreamKeys)
    cluster: bool = False
    """Also the users a self-run Redis Cluster needs (`replica`, `operator`); a managed one
    (Azure Managed Redis) replicates and reshards by itself."""

    def roles(self) -> tuple[Role, ...]:
        """Every user of the file, in order."""
        return (*self.service_roles(), *(self.cluster_roles() if self.cluster else ()))

    def service_roles(self) -> tuple[Role, ...]:
        k = self.keys
        wake = f"{k.prefix}:wake:*"
        # What every per-session service does: session ownership through its consumer group
        # on the sessions stream, its checkpoint and fencing epoch in the session's hash,
        # its own wake-up stream, status entries (in its fenced writes) and dead letters.
        owner_rw = (k.sessions, k.session_state(ANY), wake, k.status(ANY))
        scripts = ("evalsha", "eval")
        # The outputs (transcripts, audio out, the playback position) and, with the last
        # write of a session, the expiry of every key of it (`vlpipe.services.egress.writing`):
        # the broker's or egress's, whichever makes a session's outputs (the broker's
        # `outputs_by`, kept per session, so both during a rolling change).
        outputs = (
            k.transcript(ANY), k.transcripts, *relayed(k, k.transcripts, "transcripts"),
            k.audio_out(ANY), k.playback(ANY),
        )  # fmt: skip
        expiry = (((*k.session_streams(ANY), k.transcripts), (*scripts, "expire")),)
        return (
            Role(
                "ingest",
                "reads producers' raw audio, writes frames",
                read_write=(*owner_rw, k.audio(ANY), k.frames(ANY)),
                write=(k.dead,),
                commands=SERVICE_COMMANDS,
            ),
            Role(
                "broker",
                "reads frames (or a direct-input session's raw audio) and control, writes "
                "events and tool calls (trimmed behind their consumer groups)",
                read_write=(
                    *owner_rw,
                    k.audio(ANY),
                    k.frames(ANY),
                    k.ctl(ANY),
                    k.events(ANY),
                    k.tool_calls,
                    *relayed(k, k.tool_calls, "tool-calls"),
                    *outputs,
                ),
                write=(k.dead,),
                commands=SERVICE_COMMANDS,
                selectors=expiry,
            ),
            Role(
                "egress",
                "reads events, writes transcripts and audio out; its gateway is a "
                "producer (sessions, raw audio, text turns) and a consumer (outputs)",
                read_write=(*owner_rw, k.events(ANY), *outputs, k.audio(ANY)),
                write=(k.dead, k.ctl(ANY)),
                commands=SERVICE_COMMANDS,
                selectors=expiry,
            ),
            Role(
                "producer",
                "announces sessions, appends raw audio and control (tool results)",
                write=(k.sessions, k.audio(ANY), k.ctl(ANY)),
                commands=(*CONNECTION, "xadd"),
            ),
            Role(
                "consumer",
                "reads transcripts, audio out and status; consumer groups on "
                "every final transcript and on tool calls",
                read=(k.transcript(ANY), k.audio_out(ANY), k.status(ANY)),
                read_write=(k.transcripts, k.tool_calls),
                commands=(*CONNECTION, *READ_STREAMS, *GROUPS),
            ),
            Role(
                "monitor",
                "reads everything, writes nothing: dashboards, KEDA's scaler, "
                "`vlpipe sessions`, `vlpipe tail`, `vlpipe doctor`",
                read=(f"{k.prefix}:*",),
                commands=(
                    *CONNECTION,
                    *READ_STREAMS,
                    "xinfo|groups",
                    "xinfo|consumers",
                    "xpending",
                    "hget",
                    "hmget",
                    "hgetall",
                    "exists",
                    "info",
                ),
            ),
        )

    def cluster_roles(self) -> tuple[Role, ...]:
        """A self-run cluster's own users. Its replicas sync from their master as `replica`
        (`masteruser replica` and `masterauth` in every node's config: the default user only
        pings). `operator` builds the cluster and changes it (`redis-cli --cluster create`,
        `reshard`, CLUSTER FAILOVER); MIGRATE moves keys of any name, so it has every key."""
        return (
            Role(
                "replica",
                "a replica syncing from its master",
                commands=("psync", "replconf", "ping"),
            ),
            Role(
                "operator",
                "creates the cluster, moves slots, fails masters over; reads no stream",
                read_write=(ANY,),
                commands=(
                    *CONNECTION,
                    "cluster",
                    "info",
                    "role",
                    "config|get",
                    "wait",
                    "migrate",
                    "restore-asking",
                ),
            ),
        )

    def render(self, passwords: Mapping[str, str]) -> str:
        """The ACL file: the default user may only PING (health checks), and each role's
        user its rules, with the SHA-256 of its password from `passwords` (by env var).
        ValueError naming every variable that is missing."""
        roles = self.roles()
        missing = [r.password_env for r in roles if not passwords.get(r.password_env)]
        if missing:
            raise ValueError(f"set {', '.join(missing)}: each role's Redis password")
        # An ACL file holds user lines only (no comments).
        lines = ["user default on nopass resetkeys resetchannels -@all +ping"]
        for role in roles:
            digest = hashlib.sha256(passwords[role.password_env].encode()).hexdigest()
            lines.append(f"user {role.name} on #{digest} {role.rules()}")
        return "\n".join(lines) + "\n"

"""Redis locked down: every service as its own ACL user, and the whole pipeline over TLS.

* The ACL file `vlpipe redis-acl` generates, loaded into a real redis-server, runs the
  whole pipeline with each service as its own user: a call through the gateway, a
  producer's text session, a consumer reading transcripts and a consumer group, the
  monitor reading the live sessions. Redis's ACL LOG, which records every command refused,
  stays empty; then each user is refused a command outside its role. Logs (at DEBUG),
  metrics and spans hold no password, token or signing key.
* A redis-server with TLS only, requiring client certificates, all made here with
  `cryptography`, runs the whole pipeline over `rediss://`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError

from tests.integration.pipeline import (
    SIGNING_KEY,
    TOKEN,
    Pipeline,
    outputs_done,
    running_pipeline,
    send_paced,
)
from tests.otlp_receiver import otlp_receiver
from tests.tls_certs import make_certificates
from tests.waiting import wait_until
from vlpipe.services.engine.server import running_engine
from vlpipe.shared.contracts import TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_acl import AclTable
from vlpipe.shared.redis_server import RedisServer, ServerTLS
from vlpipe.shared.redis_tls import RedisTLS
from vlpipe.shared.streams import connect
from vlpipe.tools.sessions import live_sessions

ADMIN_PASSWORD = secrets.token_urlsafe(16)
"""The test's own user (not generated: only to read Redis's ACL LOG)."""


def speech(speech_wav: Path) -> bytes:
    with wave.open(str(speech_wav)) as w:
        return w.readframes(w.getnframes()) + b"\0\0" * 16000 * 2


async def finals(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> list[TranscriptPiece]:
    pieces = [decode(TranscriptPiece, f) for _, f in await redis.xrange(keys.transcript(sid))]
    return [p for p in pieces if p.final]


async def done(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> bool:
    return await outputs_done(redis, keys, sid)


@pytest.fixture
async def acl_redis(
    tmp_path: Path,
) -> AsyncIterator[tuple[RedisServer, StreamKeys, dict[str, str]]]:
    """A redis-server with the generated ACL file; each role's URL by role name."""
    keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
    table = AclTable(keys)
    passwords = {role.password_env: secrets.token_urlsafe(24) for role in table.roles()}
    acl = tmp_path / "users.acl"
    acl.write_text(table.render(passwords) + f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n")
    server = RedisServer(tmp_path / "redis", acl_file=acl)
    server.start()
    base = f"127.0.0.1:{server.port}/0"
    urls = {role.name: f"redis://{role.name}:{passwords[role.password_env]}@{base}"
            for role in table.roles()}  # fmt: skip
    urls["admin"] = f"redis://admin:{ADMIN_PASSWORD}@{base}"
    yield server, keys, urls
    server.stop()


@pytest.mark.parametrize("outputs_by", ["egress", "broker"])
async def test_each_service_runs_as_its_own_redis_user_and_no_user_may_step_outside_its_role(
    acl_redis: tuple[RedisServer, StreamKeys, dict[str, str]],
    speech_wav: Path,
    tmp_path: Path,
    outputs_by: str,
) -> None:
    """`outputs_by`: the service that makes the outputs (the broker's `outputs_by`), whose
    user writes them."""
    _, keys, urls = acl_redis
    clients = {name: connect(url, name=f"test-{name}") for name, url in urls.items()}
    producer, consumer, admin = clients["producer"], clients["consumer"], clients["admin"]
    call_token = Pipeline.token("acl-call")
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {"VLPIPE_LOG_LEVEL": "DEBUG", "VLPIPE_OUTPUTS_BY": outputs_by}
    try:
        with otlp_receiver() as otlp:
            env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
                    "OTEL_METRIC_EXPORT_INTERVAL": "500"}  # fmt: skip
            try:
                async with (
                    running_engine(model="local", output_pace=0) as engine,
                    running_pipeline(
                        urls["egress"],
                        keys.prefix,
                        engine.endpoint,
                        logs=logs,
                        service_urls=urls,
                        **env,
                    ) as pipeline,
                ):
                    await consumer.xgroup_create(keys.transcripts, "archive", id="0", mkstream=True)
                    await asyncio.gather(
                        call_through_the_gateway(pipeline, call_token, speech(speech_wav)),
                        text_session_of_a_producer(producer, consumer, keys),
                    )
                    # The monitor sees the live sessions (`vlpipe sessions`).
                    assert isinstance(await live_sessions(urls["monitor"], keys), list)
            except BaseException as exc:
                # What a role lacks: Redis names the user, the command and the key.
                exc.add_note(f"ACL LOG: {await refusals(admin)}")
                raise
            said = {sid: await finals(admin, keys, sid) for sid in ("acl-call", "acl-text")}
            payloads = b"".join(otlp.payloads)
        # The consumer group got every final transcript of both sessions.
        archived: Any = await consumer.xreadgroup(
            "archive", "a1", {keys.transcripts: ">"}, count=1000
        )
        assert len(archived[0][1]) == len(said["acl-call"]) + len(said["acl-text"])
        await consumer.xack(keys.transcripts, "archive", *[i for i, _ in archived[0][1]])
        # Not one command of any service was refused in the whole run.
        assert await refusals(admin) == []
        assert {p.speaker for p in said["acl-call"]} == {"user", "assistant"}
        assert "fail better" in " ".join(p.text for p in said["acl-call"]).lower()
        assert [p.text for p in said["acl-text"] if p.speaker == "assistant"]

        # Each role refused a command outside it: by key, and by command.
        sid = "acl-call"
        outside = {
            "producer": ("XRANGE", keys.transcript(sid), "-", "+"),  # reading transcripts
            "consumer": ("XADD", keys.audio(sid), "*", "audio", "x"),  # writing audio
            "ingest": ("XADD", keys.events(sid), "*", "m", "x"),
            "broker": ("XRANGE", keys.dead, "-", "+"),  # reading dead letters
            "egress": ("XADD", keys.frames(sid), "*", "m", "x"),  # writing frames
            "monitor": ("XADD", keys.status(sid), "*", "kind", "x"),
        }
        for role, command in outside.items():
            for refused in (command, ("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*")):
                with pytest.raises(NoPermissionError):
                    await clients[role].execute_command(*refused)
        # Egress may name frames in a script (to set their expiry), not write them there.
        with pytest.raises(ResponseError, match="can't access"):
            await clients["egress"].eval(
                "return redis.call('XADD', KEYS[1], '*', 'm', 'x')", 1, keys.frames(sid)
            )
        assert {e["username"] for e in await admin.acl_log(count=100)} == set(outside)

        # No secret anywhere: logs at DEBUG, metrics and spans.
        secret_words = [*(u.rsplit("@", 1)[0].rsplit(":", 1)[1] for u in urls.values()),
                        SIGNING_KEY, TOKEN, call_token]  # fmt: skip
        for service in ("ingest", "broker", "egress"):
            text = (logs / f"{service}.log").read_text()
            assert text.count("\n") > 10, f"{service} logged almost nothing at DEBUG"
            for word in secret_words:
                assert word not in text, f"{service} logged a secret"
        assert payloads, "no metric or span was exported"
        for word in secret_words:
            assert word.encode() not in payloads, "a secret was exported in a metric or span"
    finally:
        for client in clients.values():
            await client.aclose()


async def refusals(admin: aioredis.Redis) -> list[tuple[str, str, str]]:
    """Redis's ACL LOG: who was refused what (user, reason, command or key)."""
    log: Any = await admin.acl_log(count=100)
    return [(e["username"], e["reason"], e["object"]) for e in log]


async def call_through_the_gateway(pipeline: Pipeline, token: str, pcm: bytes) -> None:
    """A caller: speech in, with its call token; a played position once the answer comes."""
    async with pipeline.connect("/v1/call?session=acl-call&input=pcm16&rate=16000",
                                token=token) as call:  # fmt: skip
        assert json.loads(await call.recv())["type"] == "session"
        chunks = [pcm[i : i + 3200] for i in range(0, len(pcm), 3200)]
        await send_paced(call, chunks, len(pcm) / 32000)

        async def answered() -> None:
            async for message in call:
                if isinstance(message, str):
                    data = json.loads(message)
                    if data["type"] == "transcript" and data["speaker"] == "assistant":
                        await call.send(json.dumps({"type": "played", "ms": 100,
                                                    "response_id": data["response_id"]}))  # fmt: skip
                        if data["final"]:
                            return

        await asyncio.wait_for(answered(), timeout=90)
        await call.send(json.dumps({"type": "end"}))


async def text_session_of_a_producer(
    producer: aioredis.Redis, consumer: aioredis.Redis, keys: StreamKeys
) -> None:
    """A producer's session with a text turn, ended once the consumer read the answer."""
    sid = "acl-text"
    await producer.xadd(keys.sessions, {"type": "start", "session": sid})
    await producer.xadd(keys.ctl(sid), {"type": "text", "text": "Are you still there."})
    last = "0-0"

    async def answered() -> None:
        nonlocal last
        while True:
            reply: Any = await consumer.xread({keys.transcript(sid): last}, block=1000)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if fields[b"speaker"] == b"assistant" and fields[b"final"] == b"1":
                        return

    await asyncio.wait_for(answered(), timeout=90)
    await producer.xadd(keys.sessions, {"type": "end", "session": sid})


async def test_the_whole_pipeline_runs_over_tls_with_client_certificates(
    tmp_path: Path, speech_wav: Path
) -> None:
    certs = make_certificates(tmp_path / "certs")
    server = RedisServer(
        tmp_path / "redis",
        tls=ServerTLS(certs.server_cert, certs.server_key, certs.ca,
                      client_cert_file=certs.client_cert, client_key_file=certs.client_key),
    )  # fmt: skip
    server.start()
    tls = RedisTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
    redis = connect(server.url, tls=tls)
    env = {"VLPIPE_REDIS_CA_FILE": str(certs.ca), "VLPIPE_REDIS_CERT_FILE": str(certs.client_cert),
           "VLPIPE_REDIS_KEY_FILE": str(certs.client_key)}  # fmt: skip
    try:
        assert server.url.startswith("rediss://")
        # Without its certificate, or trusting only the system's CAs, a client gets nowhere.
        for refused in (RedisTLS(str(certs.ca)), RedisTLS()):
            stranger = connect(server.url, tls=refused)
            with pytest.raises(RedisConnectionError):
                await stranger.ping()
            await stranger.aclose()
        plain = connect(server.url.replace("rediss://", "redis://"))
        with pytest.raises(RedisConnectionError):
            await plain.ping()
        await plain.aclose()

        pcm = speech(speech_wav)
        config = {"input_audio_format": "pcm16_16000hz",
                  "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}}  # fmt: skip
        async with (
            running_engine(model="local", output_pace=0) as engine,
            running_pipeline(server.url, keys.prefix, engine.endpoint, **env),
        ):
            sid = "tls1"
            await redis.xadd(keys.sessions, {"type": "start", "session": sid,
                                             "config": json.dumps(config)})  # fmt: skip
            for seq, start in enumerate(range(0, len(pcm), 3200)):
                await redis.xadd(keys.audio(sid), {"audio": pcm[start : start + 3200],
                                                   "rate": "16000", "seq": str(seq)})  # fmt: skip
                await asyncio.sleep(0.025)  # 100 ms of audio at 4x real time
            await redis.xadd(keys.sessions, {"type": "end", "session": sid})
            await wait_until(lambda: done(redis, keys, sid), within=90)
        said = await finals(redis, keys, sid)
        assert "fail better" in " ".join(p.text for p in said if p.speaker == "user").lower()
        assert [p for p in said if p.speaker == "assistant"]
    finally:
        await redis.aclose()
        server.stop()


def test_tls_files_without_a_tls_url_are_a_clear_error(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="not rediss://"):
        RedisTLS(str(ca)).client_options("redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="both VLPIPE_REDIS_CERT_FILE and VLPIPE_REDIS_KEY_FILE"):
        RedisTLS(str(ca), cert_file=str(ca)).client_options("rediss://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="no such file"):
        RedisTLS(str(tmp_path / "missing.pem")).client_options("rediss://127.0.0.1:6379/0")
    assert RedisTLS(str(ca)).client_options("rediss://h:1/0") == {"ssl_ca_certs": str(ca)}

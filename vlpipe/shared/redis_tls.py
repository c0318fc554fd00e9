"""The files of a TLS connection to Redis (`rediss://`), and how redis-py takes them.

Its own module, importing nothing of vlpipe: the settings and the stream runtime both use
it, and the runtime is imported by modules the settings import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class RedisTLS:
    """The files of a TLS connection to Redis (`rediss://`): all optional."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def client_options(self, url: str) -> dict[str, Any]:
        """redis-py's connection options for `url`; ValueError for files that cannot apply."""
        given = {name: value for name, value in (
            ("ssl_ca_certs", self.ca_file), ("ssl_certfile", self.cert_file),
            ("ssl_keyfile", self.key_file)) if value}  # fmt: skip
        if not url.startswith("rediss://"):
            if given:
                raise ValueError(
                    "VLPIPE_REDIS_CA_FILE, VLPIPE_REDIS_CERT_FILE or VLPIPE_REDIS_KEY_FILE is "
                    "set, but the Redis URL is not rediss:// (TLS)"
                )
            return {}
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError(
                "a client certificate needs both VLPIPE_REDIS_CERT_FILE and VLPIPE_REDIS_KEY_FILE"
            )
        for name, path in given.items():
            if not Path(path).is_file():
                raise ValueError(f"{name.replace('ssl_', 'Redis TLS ')} {path!r}: no such file")
        return given

"""A service's command line: `--help` lists its settings, read from its settings class.

Services are configured by environment variables only, so their help is the list of those
variables: for each field of the settings class, the variable name(s) pydantic-settings
reads, the default and the field's description. Nothing is written twice: a field added to
a settings class appears here as it is. `service_parser` makes the `argparse` parser that
prints it for `-h`/`--help` and exits 0, and refuses anything else with exit code 2 —
before the service reads its settings or connects to anything.
"""

from __future__ import annotations

import argparse
import textwrap
import typing
from collections.abc import Collection
from dataclasses import dataclass

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo

from vlpipe.shared.config import ServiceSettings, redact_url


@dataclass(frozen=True)
class SettingDoc:
    """One setting as an operator sees it."""

    field: str
    env: tuple[str, ...]
    """The environment variables that set it (the first is the one to use)."""
    default: str
    description: str


def env_names(settings: type[ServiceSettings], name: str, field: FieldInfo) -> tuple[str, ...]:
    """The environment variables pydantic-settings reads for the field `name`.

    Without an alias it is the class's prefix and the field's name; an alias replaces
    that, and its upper-case choices are the variables (its lower-case one, the field's
    name, is for code that builds the settings).
    """
    alias = field.validation_alias
    if alias is None:
        prefix = str(settings.model_config.get("env_prefix", ""))
        return (f"{prefix}{name}".upper(),)
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    names = [c for c in choices if isinstance(c, str)]
    return tuple(c for c in names if c.isupper()) or tuple(c.upper() for c in names)


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
        if "://" not in value:
            return "(secret)" if value else "unset"
        return redact_url(value)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def _choices(field: FieldInfo) -> str:
    """`one of: a, b` for a field typed as a Literal (possibly optional), else ""."""
    kinds = [field.annotation, *typing.get_args(field.annotation)]
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal:
            return "One of: " + ", ".join(str(c) for c in typing.get_args(kind)) + "."
    return ""


def settings_docs(
    settings: type[ServiceSettings], only: Collection[str] | None = None
) -> list[SettingDoc]:
    """The settings of `settings` (those named in `only`, if given), in the order the class
    declares them."""
    docs = []
    for name, field in settings.model_fields.items():
        if only is not None and name not in only:
            continue
        description = " ".join(p for p in (field.description or "", _choices(field)) if p)
        docs.append(
            SettingDoc(name, env_names(settings, name, field), _default(field), description)
        )
    return docs


def settings_help(
    settings: type[ServiceSettings], service: str, only: Collection[str] | None = None
) -> str:
    """The settings as help text: variable, default, and the description below."""
    lines = [f"settings (environment variables; `vlpipe config {service}` shows those in effect):"]
    for doc in settings_docs(settings, only):
        lines.append(f"  {' or '.join(doc.env)}  (default: {doc.default})")
        if doc.description:
            lines += textwrap.wrap(
                doc.description, width=88, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines)


def service_parser(
    service: str,
    settings: type[ServiceSettings],
    description: str,
    only: Collection[str] | None = None,
) -> argparse.ArgumentParser:
    """The command line of `vlpipe <service>`: no arguments but `-h`/`--help`, which
    prints `description` and the settings (those in `only`, if given) and exits 0;
    anything else exits 2."""
    return argparse.ArgumentParser(
        prog=f"vlpipe {service}",
        description=description,
        epilog=settings_help(settings, service, only),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

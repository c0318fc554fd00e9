"""Strict checks of server events against the official SDK's typed models."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from azure.ai.voicelive.models import ServerEvent
from azure.ai.voicelive.models._models import RequestAudioContentPart

# Polymorphic bases: an event or item that deserializes to one of these was not recognized.
_BASES = {"ServerEvent", "ResponseItem", "ContentPart", "ResponseStatusDetails", "Tool"}
_BASES |= {"TurnDetection", "ToolChoiceSelection"}
# Like the service, user audio items do not echo the audio back; the SDK marks it required.
_OMITTED = {(RequestAudioContentPart, "audio")}


def parse_server_event(event: dict[str, Any]) -> ServerEvent:
    """The SDK's typed model of `event`, checked to be the specific event class with every
    required field present, recursively through nested models."""
    model = ServerEvent._deserialize(event, [])
    _check(model, event, event.get("type", "?"))
    return typing.cast(ServerEvent, model)


def _annotation(cls: type, attr: str) -> Any:
    for klass in cls.__mro__:
        annotations = inspect.get_annotations(klass)
        if attr in annotations:
            return annotations[attr]
    return None


def _optional(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return annotation.startswith("Optional")
    return type(None) in typing.get_args(annotation)


def _check(model: Any, raw: Any, path: str) -> None:
    cls = type(model)
    assert cls.__name__ not in _BASES, f"{path}: not a known {cls.__name__} subtype: {raw!r}"
    for attr, field in cls._attr_to_rest_field.items():
        name = field._rest_name
        if name not in raw:
            if not _optional(_annotation(cls, attr)) and (cls, attr) not in _OMITTED:
                raise AssertionError(f"{path}: required field {name!r} missing in {raw!r}")
            continue
        value = getattr(model, attr)
        if hasattr(value, "_attr_to_rest_field"):
            _check(value, raw[name], f"{path}.{name}")
        elif isinstance(value, list):
            for index, element in enumerate(value):
                if hasattr(element, "_attr_to_rest_field"):
                    _check(element, raw[name][index], f"{path}.{name}[{index}]")

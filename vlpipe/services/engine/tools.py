"""Which declared function an utterance calls, and the JSON arguments it fills in.

The rule is deterministic and documented in docs/engine.md:

- A tool's keywords are the words of its name (split on `_`, `-`, `.` and camelCase) and of
  its description, lower-cased, without stop words and words under three letters.
- An utterance scores 2 for each name keyword it contains and 1 for each other keyword
  (a trailing "s" is ignored, so "cities" does not match "city" but "forecasts" matches
  "forecast").
- `tool_choice` "auto" calls the best tool scoring at least 2 (ties: declaration order);
  "required" calls the best tool whatever its score; {"type": "function", "name": X} calls
  X; "none" calls nothing.
- Arguments come from the tool's JSON Schema: an `enum` value named in the utterance; the
  first number in the utterance (digits or number words) for numbers; for strings, the
  words after the last of "in", "for", "at", "to", "about", "of", "called", "named" (else
  the whole utterance). Required properties always get a value (the schema's `default`,
  else the enum's first value, `minimum` or 0, the utterance, false, [] or {}); optional
  ones only when the utterance supplies one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vlpipe.services.engine.session_config import FunctionTool

MATCH_SCORE = 2

_STOP_WORDS = frozenset(
    """the and for with from that this what which when where who how are was were will
    would can could should has have had get set its it's into about your you our out use
    using given call returns return value current""".split()
)
_PREPOSITIONS = ("in", "for", "at", "to", "about", "of", "called", "named")
_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        """zero one two three four five six seven eight nine ten eleven twelve thirteen
        fourteen fifteen sixteen seventeen eighteen nineteen twenty""".split()
    )
} | {"thirty": 30, "forty": 40, "fifty": 50, "hundred": 100}
_NEGATIONS = frozenset("no not don't dont disable off false never without".split())


def words(text: str) -> list[str]:
    """Lower-case words of `text` (letters, digits and apostrophes)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def keywords(text: str) -> set[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).replace("_", " ").replace("-", " ")
    return {w for w in words(spaced.replace(".", " ")) if len(w) >= 3 and w not in _STOP_WORDS}


def match_score(tool: FunctionTool, utterance: str) -> int:
    """How strongly `utterance` asks for `tool` (see the module docstring)."""
    said = {_stem(w) for w in words(utterance)}
    name_words = {_stem(w) for w in keywords(tool.name)}
    other_words = {_stem(w) for w in keywords(tool.description)} - name_words
    return 2 * len(name_words & said) + len(other_words & said)


def choose_tool(
    tools: Sequence[FunctionTool], tool_choice: str | dict[str, Any], utterance: str
) -> FunctionTool | None:
    """The tool `utterance` calls under `tool_choice`, or None."""
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        return next((t for t in tools if t.name == tool_choice.get("name")), None)
    scored = [(match_score(tool, utterance), -index, tool) for index, tool in enumerate(tools)]
    best_score, _, best = max(scored, key=lambda entry: entry[:2])
    if tool_choice == "required" or best_score >= MATCH_SCORE:
        return best
    return None


def fill_arguments(schema: dict[str, Any], utterance: str) -> dict[str, Any]:
    """Arguments for a function whose parameters follow the object schema `schema`."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    required = set(schema.get("required") or ())
    arguments: dict[str, Any] = {}
    for name, spec in properties.items():
        spec = spec if isinstance(spec, dict) else {}
        value = _from_utterance(spec, utterance)
        if value is None and name in required:
            value = _fallback(spec, utterance)
        if value is not None:
            arguments[name] = value
    return arguments


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _kind(spec: dict[str, Any]) -> str:
    kind = spec.get("type", "string")
    if isinstance(kind, list):  # e.g. ["string", "null"]
        kind = next((k for k in kind if k != "null"), "string")
    return str(kind)


def _from_utterance(spec: dict[str, Any], utterance: str) -> Any:
    enum = spec.get("enum")
    said = words(utterance)
    if isinstance(enum, list) and enum:
        for option in enum:
            if words(str(option)) and _contains(said, words(str(option))):
                return option
        return None
    kind = _kind(spec)
    if kind in ("integer", "number"):
        number = first_number(utterance)
        if number is None:
            return None
        return _clamp(int(number) if kind == "integer" else number, spec)
    if kind == "string":
        return phrase_after_preposition(utterance)
    return None


def _fallback(spec: dict[str, Any], utterance: str) -> Any:
    if "default" in spec:
        return spec["default"]
    enum = spec.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = _kind(spec)
    if kind in ("integer", "number"):
        low = spec.get("minimum", 0)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return not (_NEGATIONS & set(words(utterance)))
    if kind == "array":
        return []
    if kind == "object":
        return {}
    if kind == "null":
        return None
    return utterance.strip()


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _clamp(value: float, spec: dict[str, Any]) -> Any:
    low, high = spec.get("minimum"), spec.get("maximum")
    if isinstance(low, int | float) and value < low:
        value = type(value)(low)
    if isinstance(high, int | float) and value > high:
        value = type(value)(high)
    return value


def first_number(utterance: str) -> float | None:
    """The first number in `utterance`, written in digits or as a word up to a hundred."""
    for token in re.findall(r"-?\d+(?:\.\d+)?|[A-Za-z]+", utterance):
        if token[0].isdigit() or token[0] == "-":
            return float(token)
        if token.lower() in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[token.lower()])
    return None


def phrase_after_preposition(utterance: str) -> str | None:
    """The words after the last preposition ("in Paris" -> "Paris"), or None."""
    tokens = re.findall(r"[\w'-]+", utterance)
    for index in range(len(tokens) - 1, -1, -1):
        if tokens[index].lower() in _PREPOSITIONS and index + 1 < len(tokens):
            return " ".join(tokens[index + 1 :])
    return None

"""The deterministic local "model": what the engine says or calls in reply to a turn.

It is not a language model. `reply_to` applies these rules, first match wins:

1. Tool results: if function outputs arrived after the last user message (and no
   assistant message has answered them yet), speak them: "From get weather:
   temperature is 21, unit is celsius." (JSON objects read as "key is value" pairs).
2. Tool call: if the session declares tools, the last user message has not been answered
   by a call yet, and the tool rule in `tools` picks one, call it with arguments filled
   from the utterance.
3. Fixed reply: if the instructions contain a quoted phrase introduced by say, reply,
   respond, answer or greet (e.g. `Always answer "Hello from vlpipe."`) and that sentence
   contains "always", say exactly that phrase.
4. Greeting: with no user message yet, say the instructions' quoted phrase if there is
   one, else "Hello, this is the local voice engine. How can I help you?"
5. Nothing heard: if the user's turn transcribed to nothing, "Sorry, I did not catch that."
6. Acknowledge: otherwise "You said: <what the user said>."
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from vlpipe.services.engine.session_config import FunctionTool
from vlpipe.services.engine.tools import choose_tool, fill_arguments

DEFAULT_GREETING = "Hello, this is the local voice engine. How can I help you?"
NOTHING_HEARD = "Sorry, I did not catch that."

_PHRASE = re.compile(
    r"\b(?:say|reply|respond|answer|greet)\w*\b[^\".\n“]*?[\"“]([^\"”]+)[\"”]", re.IGNORECASE
)


@dataclass(frozen=True)
class Say:
    """Speak (or write) `text`."""

    text: str


@dataclass(frozen=True)
class CallTool:
    """Call the function `name` with `arguments` (a JSON object)."""

    name: str
    arguments: dict[str, Any]


Reply = Say | CallTool


@dataclass(frozen=True)
class ToolResult:
    name: str
    output: str


@dataclass(frozen=True)
class TurnContext:
    """What the responder knows when a response starts.

    `utterance` is the last user message's words (None if the user has said nothing yet);
    `tool_results` are function outputs after it not yet answered; `tool_called` is true
    when a function call already follows it.
    """

    instructions: str = ""
    utterance: str | None = None
    tool_results: tuple[ToolResult, ...] = ()
    tool_called: bool = False
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: str | dict[str, Any] = "auto"


def reply_to(context: TurnContext) -> Reply:
    """The reply to `context`, by the rules in the module docstring."""
    if context.tool_results:
        return Say(" ".join(speak_tool_result(result) for result in context.tool_results))
    if context.utterance and not context.tool_called:
        tool = choose_tool(context.tools, context.tool_choice, context.utterance)
        if tool is not None:
            return CallTool(tool.name, fill_arguments(tool.parameters, context.utterance))
    phrase, always = instructed_phrase(context.instructions)
    if phrase and always:
        return Say(phrase)
    if context.utterance is None:
        return Say(phrase or DEFAULT_GREETING)
    if not context.utterance.strip():
        return Say(NOTHING_HEARD)
    return Say(f"You said: {_sentence(context.utterance)}")


def instructed_phrase(instructions: str) -> tuple[str | None, bool]:
    """The quoted phrase the instructions tell the engine to say, and whether "always"."""
    match = _PHRASE.search(instructions)
    if match is None:
        return None, False
    sentence_start = max(instructions.rfind(".", 0, match.start()), 0)
    always = "always" in instructions[sentence_start : match.end()].lower()
    return match.group(1).strip(), always


def speak_tool_result(result: ToolResult) -> str:
    """A sentence that reads a function's output aloud."""
    label = " ".join(re.sub(r"([a-z])([A-Z])", r"\1 \2", result.name).replace("_", " ").split())
    try:
        value = json.loads(result.output)
    except ValueError:
        value = result.output
    return f"From {label}: {_sentence(_spoken(value))}"


def _spoken(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} is {_spoken(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_spoken(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "nothing"
    return str(value).strip()


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else f"{text}."

"""The deterministic responder and its tool rule."""

from __future__ import annotations

from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from vlpipe.services.engine.responder import (
    DEFAULT_GREETING,
    NOTHING_HEARD,
    CallTool,
    Say,
    ToolResult,
    TurnContext,
    reply_to,
)
from vlpipe.services.engine.session_config import FunctionTool
from vlpipe.services.engine.tools import choose_tool, fill_arguments

WEATHER = FunctionTool(
    "get_weather",
    "Get the current weather for a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit"],
    },
)
ALARM = FunctionTool(
    "setAlarm",
    "Wake the user up at a time",
    {
        "type": "object",
        "properties": {"hour": {"type": "integer"}, "loud": {"type": "boolean"}},
        "required": ["hour", "loud"],
    },
)


def test_a_tool_is_called_when_the_utterance_names_it() -> None:
    assert choose_tool([ALARM, WEATHER], "auto", "What's the weather in Paris?") is WEATHER
    assert choose_tool([WEATHER, ALARM], "auto", "Set an alarm for seven") is ALARM


def test_a_single_description_word_is_not_enough() -> None:
    assert choose_tool([WEATHER], "auto", "Which city do you like?") is None


def test_tool_choice_forces_or_forbids() -> None:
    assert choose_tool([WEATHER, ALARM], {"type": "function", "name": "setAlarm"}, "hi") is ALARM
    assert choose_tool([WEATHER, ALARM], "required", "hello there") is WEATHER
    assert choose_tool([WEATHER], "none", "weather in Paris") is None


def test_arguments_are_filled_from_the_utterance() -> None:
    args = fill_arguments(WEATHER.parameters, "Weather for 3 days in fahrenheit in Paris")
    assert args == {"city": "Paris", "unit": "fahrenheit", "days": 3}
    args = fill_arguments(WEATHER.parameters, "What's the weather in Paris?")
    assert args == {"city": "Paris", "unit": "celsius"}
    assert fill_arguments(ALARM.parameters, "wake me at seven, not loud") == {
        "hour": 7,
        "loud": False,
    }


def test_numbers_are_clamped_to_the_schema() -> None:
    assert fill_arguments(WEATHER.parameters, "weather for 30 days")["days"] == 7


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_filled_arguments_always_validate_against_the_schema(utterance: str) -> None:
    for tool in (WEATHER, ALARM):
        jsonschema.validate(fill_arguments(tool.parameters, utterance), tool.parameters)


def context(**fields: Any) -> TurnContext:
    return TurnContext(**fields)


def test_acknowledges_what_it_heard() -> None:
    assert reply_to(context(utterance="ever tried")) == Say("You said: ever tried.")


def test_greets_before_the_user_speaks_and_admits_hearing_nothing() -> None:
    assert reply_to(context()) == Say(DEFAULT_GREETING)
    assert reply_to(context(utterance="")) == Say(NOTHING_HEARD)


def test_follows_a_fixed_greeting_and_an_always_rule() -> None:
    greet = 'You are a helpful agent. Greet the caller with "Welcome to vlpipe." Be brief.'
    assert reply_to(context(instructions=greet)) == Say("Welcome to vlpipe.")
    assert reply_to(context(instructions=greet, utterance="hi")) == Say("You said: hi.")
    always = 'Always answer "I am a test engine."'
    assert reply_to(context(instructions=always, utterance="hi")) == Say("I am a test engine.")


def test_calls_a_matching_tool_once_then_speaks_its_output() -> None:
    ask = context(utterance="Weather in Oslo please", tools=(WEATHER,))
    assert reply_to(ask) == CallTool("get_weather", {"city": "Oslo please", "unit": "celsius"})
    answered = context(
        utterance="Weather in Oslo please",
        tools=(WEATHER,),
        tool_called=True,
        tool_results=(ToolResult("get_weather", '{"temperature": 21, "sky": "clear"}'),),
    )
    assert reply_to(answered) == Say("From get weather: temperature is 21, sky is clear.")

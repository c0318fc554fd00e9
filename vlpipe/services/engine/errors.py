"""The client mistakes the engine reports as `error` events, keeping the connection open."""

from __future__ import annotations


class ClientError(Exception):
    """A client event the engine cannot honour.

    `code` and `param` follow the realtime API (`invalid_value`, `missing_required_parameter`,
    `input_audio_buffer_commit_empty`, ...; `param` names the offending field, dotted).
    """

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type


def invalid_value(param: str, message: str) -> ClientError:
    return ClientError("invalid_value", message, param)


def missing(param: str) -> ClientError:
    return ClientError(
        "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    )


def invalid_type(param: str, expected: str) -> ClientError:
    return ClientError("invalid_type", f"Invalid type for '{param}': expected {expected}.", param)

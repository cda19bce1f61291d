"""What the server reads and writes: OpenAI's request bodies as pydantic models (checked by type
and range before any route runs) and its error shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant"]


def _integral(v: Any) -> Any:
    """OpenAI accepts 1.0 where it documents an integer: so do we (1.5 stays an error)."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v


Int = Annotated[int, BeforeValidator(_integral)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    # strict: "5" is not a number. Fields OpenAI defines that this server does not implement are
    # declared, so that a value other than their neutral one is refused by name (unsupported()).
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None
    top_k: Int = Field(default=0, ge=0)  # extensions beyond OpenAI's parameters
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100.0)
    # a prompt longer than the context: true keeps its last tokens instead of a 400
    truncate: bool = False
    # special tokens (the chat template's) are not written into the text
    skip_special_tokens: bool = True
    # Declared to be refused when used (see UNSUPPORTED); the neutral values pass.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: bool = False
    logprobs: Int | None = Field(default=None, ge=0, le=20)  # per token: its own and the top N
    suffix: str | None = None
    best_of: Int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Role
    content: str | list[TextPart]


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: Int | None = Field(default=None, ge=0)
    # or "oldest_turns": drop the oldest exchanges, system messages kept (ChatTemplate.fit)
    truncate: bool | Literal["oldest_turns"] = False


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    input: str | list[str]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
    )


class ApiError(HTTPException):
    """An error with OpenAI's shape. An HTTPException, so that FastAPI passes it through unchanged
    even when it is raised while the body is being read (the size limit)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(status, message)
        self.status, self.message, self.code, self.param = status, message, code, param


ERRORS = {
    400: "invalid request (message, param and code say what)",
    401: "missing or wrong API key",
    404: "no such model or path",
    413: "request body too large",
    429: "the server's queue is full; retry shortly",
    500: "generation failed",
}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    k: {"model": ErrorResponse, "description": v} for k, v in ERRORS.items()
}


STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a JSON object; with stream: true, server-sent events ending in data: "
        "[DONE]",
        # Each event's data is a chunk object, or [DONE] at the end.
        "content": {"application/json": {}, "text/event-stream": {"schema": {}}},
    }
}


# Each declared-but-unimplemented field, with the values that mean "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "suffix": (None, ""),
    "best_of": (None, 1),
}

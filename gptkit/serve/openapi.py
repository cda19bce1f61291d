"""The OpenAPI document at /openapi.json, with the limits this server enforces written into the
request schemas."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from gptkit.serve.guard import ServeConfig
from gptkit.serve.protocol import UNSUPPORTED
from gptkit.template import ChatTemplate
from gptkit.tokenizer import Tokenizer


def openapi_schema(
    app: FastAPI,
    sc: ServeConfig,
    tok: Tokenizer,
    template: ChatTemplate,
    block: int,
    classifies: bool = False,
) -> dict[str, Any]:
    """The schema as this server behaves, so that a request valid by it is accepted: 400 (not
    FastAPI's 422) for invalid bodies, bearer auth on /v1 when a key is set, errors in OpenAI's
    shape, and this model's own limits (its name, max_tokens cap, prompts that fit its context
    and, for a character-level model, only the characters it knows). FastAPI generates the
    request schemas from the pydantic models (`protocol`); this adds what depends on the model
    and the server's settings."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _as_served(schema, sc)
    schemas = schema["components"]["schemas"]
    text, chat_text, ids = _text_limits(tok, template, block)
    for model_name in ("CompletionRequest", "ChatRequest"):
        props = schemas[model_name]["properties"]
        props.update({k: v for k, v in _sampling_limits(sc).items() if k in props})
    schemas["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [
            text,
            {"type": "array", "items": text, "minItems": 1, "maxItems": PROMPTS},
            ids,
            {"type": "array", "items": ids, "minItems": 1, "maxItems": PROMPTS},
        ]
    }
    schemas["ChatRequest"]["properties"]["messages"].update(maxItems=PROMPTS)
    schemas["ChatMessage"]["properties"]["content"] = {
        "anyOf": [
            chat_text,
            {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}, "maxItems": 1},
        ]
    }
    schemas["TextPart"]["properties"]["text"] = chat_text
    if classifies:  # a text longer than the context is cut to fit, so no maxLength
        item = {k: v for k, v in text.items() if k != "maxLength"} | {"minLength": 1}
        many = {"type": "array", "items": item, "minItems": 1, "maxItems": sc.max_classify_inputs}
        props = schemas["ClassifyRequest"]["properties"]
        props["input"] = {"anyOf": [item, many]}
        props["model"] = {"anyOf": [{"type": "string", "enum": [sc.model_name]}, {"type": "null"}]}
    else:  # only a classification run has the endpoint
        schema["paths"].pop("/v1/classify", None)
        schemas.pop("ClassifyRequest", None)
    _refused_combinations(schemas)
    app.openapi_schema = schema
    return schema


# Prompts per request and messages per conversation that the schema promises (the API takes more).
PROMPTS = 4


def _as_served(schema: dict[str, Any], sc: ServeConfig) -> None:
    """No 422 (invalid bodies get 400 in OpenAI's shape), and bearer auth when a key is set."""
    for path, ops in schema["paths"].items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            if path.startswith("/v1") and sc.api_key is not None:
                op["security"] = [{"bearer": []}]
    comps = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.get("schemas", {}).pop(name, None)
    if sc.api_key is not None:
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}


def _text_limits(
    tok: Tokenizer, template: ChatTemplate, block: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Schemas of a prompt's text, a chat message's text and a prompt's token ids that surely fit
    the context: a byte-level BPE token covers at least one byte, a character at most four."""
    per_char = 1 if tok.kind == "char" else 4
    text: dict[str, Any] = {"type": "string", "maxLength": block // per_char}
    if tok.kind == "char":
        known = "".join(
            c if c.isalnum() else f"\\u{ord(c):04x}"
            for c in getattr(tok, "chars", [])
            if ord(c) < 0x10000
        )
        text["pattern"] = f"^[{known}]*$"
    ids = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": tok.vocab_size - 1},
        "minItems": 1,
        "maxItems": block,
    }
    marker = max(len(v) for k, v in template.marker.items() if k != "end") + len(
        template.marker["end"]
    )
    room = block - len(template.marker["assistant"]) - PROMPTS * marker
    chat_text = {**text, "maxLength": max(0, room // PROMPTS // per_char)}
    return text, chat_text, ids


def _sampling_limits(sc: ServeConfig) -> dict[str, Any]:
    """The sampling fields as this server bounds them, and the unsupported ones at their neutral
    values only (protocol.UNSUPPORTED)."""
    max_tokens = {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": sc.max_tokens_cap},
            {"type": "null"},
        ]
    }
    limits: dict[str, Any] = {
        "model": {"type": "string", "enum": [sc.model_name]},
        "max_tokens": max_tokens,
        "max_completion_tokens": max_tokens,
        "n": {
            "type": "integer",
            "minimum": 1,
            "maximum": max(1, min(16, sc.queue_limit // PROMPTS)),
            "default": 1,
            "description": "samples per prompt; n x prompts x max_tokens may be at most "
            f"{sc.max_request_work}",
        },
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                {"type": "null"},
            ]
        },
        "logit_bias": {
            "anyOf": [
                {
                    "type": "object",
                    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                },
                {"type": "null"},
            ]
        },
    }
    for name, values in UNSUPPORTED.items():
        limits[name] = {"enum": [v for v in values if not isinstance(v, (dict, list))]}
    limits["response_format"] = {
        "anyOf": [
            {"type": "null"},
            {
                "type": "object",
                "properties": {"type": {"enum": ["text"]}},
                "required": ["type"],
                "additionalProperties": False,
            },
        ]
    }
    for name in ("tools", "functions"):
        limits[name] = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}
    limits["suffix"] = {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]}
    return limits


def _refused_combinations(schemas: dict[str, Any]) -> None:
    """Combinations refused with 400: scoring a prompt (echo, max_tokens 0) once per request, and
    top_logprobs only with logprobs: true."""
    top = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 20}, {"type": "null"}]}
    schemas["CompletionRequest"]["properties"]["logprobs"] = top
    schemas["ChatRequest"]["properties"]["top_logprobs"] = top
    schemas["CompletionRequest"]["if"] = {
        "properties": {"echo": {"const": True}, "max_tokens": {"const": 0}},
        "required": ["echo", "max_tokens"],
    }
    schemas["CompletionRequest"]["then"] = {"properties": {"n": {"const": 1}}}
    schemas["ChatRequest"]["if"] = {
        "properties": {"logprobs": {"const": True}},
        "required": ["logprobs"],
    }
    schemas["ChatRequest"]["else"] = {"properties": {"top_logprobs": {"type": "null"}}}

"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json.

Request and response bodies come from the msgspec Structs the server decodes and encodes
(`msgspec.json.schema_components` emits JSON Schema 2020-12, which OpenAPI 3.1 uses as is), so
the document cannot drift from what the server accepts. The few endpoints that answer plain dicts
(/tokenize, /detokenize, /version) get small inline schemas. Every operation documents the
OpenAI error body for its 4xx/503 answers; the fuzz test (tests/e2e/test_fuzz.py) generates
requests from this document and checks that none gets a 5xx other than a documented 503.
"""

from __future__ import annotations

from typing import Any

import msgspec

from frontend import openai as api

_REF = "#/components/schemas/{name}"
_ERROR = {"$ref": _REF.format(name="ErrorResponse")}
_ERROR_CODES = {"400": "Invalid request (bad JSON, wrong types, invalid values)",
                "401": "Missing or wrong API key", "404": "Unknown model or route",
                "413": "Request body too large", "503": "The engine is dead"}
_TOKENIZE_RESPONSE = {"type": "object", "required": ["count", "max_model_len", "tokens"],
                      "properties": {
                          "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                          "tokens": {"type": "array", "items": {"type": "integer"}},
                          "token_strs": {"anyOf": [{"type": "array", "items": {"type": "string"}},
                                                   {"type": "null"}]}}}
_OBJECT = {"type": "object"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _operation(summary: str, ok: dict[str, Any] | None, body: dict[str, Any] | None = None,
               secured: bool = False, stream: bool = False,
               ok_type: str = "application/json") -> dict[str, Any]:
    """One operation: its 200 answer (a schema of `ok_type`, None: no body), optional JSON
    body, documented errors."""
    answer: dict[str, Any] = {"description": "OK"}
    if ok is not None:
        answer["content"] = {ok_type: {"schema": ok}}
    if stream:  # `"stream": true` answers server-sent events of chunk objects
        answer["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    op: dict[str, Any] = {"summary": summary, "responses": {"200": answer}}
    for code, text in _ERROR_CODES.items():
        if code == "401" and not secured:
            continue
        op["responses"][code] = {"description": text,
                                 "content": {"application/json": {"schema": _ERROR}}}
    if body is not None:
        op["requestBody"] = _json_body(body)
    if secured:
        op["security"] = [{"bearer": []}]
    return op


def build_openapi_spec(version: str, bodies: dict[str, type[msgspec.Struct]],
                       secured: bool = False) -> dict[str, Any]:
    """The OpenAPI document; `bodies` maps the extra routes' paths to their request Structs
    (/tokenize, /detokenize), `secured` marks /v1/* as needing the bearer API key."""
    types = [api.CompletionRequest, api.ChatCompletionRequest, api.CompletionResponse,
             api.ChatCompletionResponse, api.ModelList, api.ErrorResponse, *bodies.values()]
    refs, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    ref = dict(zip(types, refs, strict=True))
    paths: dict[str, Any] = {
        "/v1/completions": {"post": _operation(
            "Complete a prompt", ref[api.CompletionResponse], ref[api.CompletionRequest],
            secured, stream=True)},
        "/v1/chat/completions": {"post": _operation(
            "Reply to a chat", ref[api.ChatCompletionResponse], ref[api.ChatCompletionRequest],
            secured, stream=True)},
        "/v1/models": {"get": _operation("List the served models", ref[api.ModelList],
                                         secured=secured)},
        "/health": {"get": _operation("200 (empty) while the engine is alive", None)},
        "/version": {"get": _operation("Package version", {
            "type": "object", "properties": {"version": {"type": "string"}}})},
        "/metrics": {"get": _operation("Prometheus metrics", {"type": "string"},
                                       ok_type="text/plain")},
        "/reset_prefix_cache": {"post": _operation("Drop the cached prefix blocks", {
            "type": "object", "properties": {"success": {"type": "boolean"}}})},
        "/openapi.json": {"get": _operation("This document", _OBJECT)},
    }
    answers = {"/tokenize": _TOKENIZE_RESPONSE,
               "/detokenize": {"type": "object", "properties": {"prompt": {"type": "string"}}}}
    for path, struct in bodies.items():
        paths[path] = {"post": _operation(f"POST {path}", answers.get(path, _OBJECT),
                                          ref[struct])}
    components: dict[str, Any] = {"schemas": schemas}
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.1.0",
            "info": {"title": "tinyllm-serve OpenAI-compatible API", "version": version},
            "paths": paths, "components": components}

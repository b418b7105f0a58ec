"""Structured outputs through the HTTP API with the official `openai` client.

The server runs with `--structured-outputs-config '{"backend": "guidance",
"disable_any_whitespace": true}'`, so `response_format` requests (which cannot set whitespace
options themselves) give compact JSON that completes well within max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from e2e_server import TINY_ENGINE_FLAGS, http

MESSAGES = [{"role": "user", "content": "give me a person"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age"]}


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir):
    return server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--structured-outputs-config",
                           '{"backend": "guidance", "disable_any_whitespace": true}'])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model=client.models.list().data[0].id,
                                          messages=MESSAGES, max_tokens=120, temperature=0.0,
                                          **kw).choices[0]


def test_response_format_json_schema_strict(client):
    choice = chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}})
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content)
    jsonschema.validate(value, {**PERSON, "additionalProperties": False})


def test_response_format_json_object_streamed(client):
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=120,
        temperature=0.8, seed=5, stream=True, response_format={"type": "json_object"})
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[-1].finish_reason == "stop"
    assert isinstance(json.loads("".join(c.delta.content or "" for c in chunks)), dict)


def test_extra_body_structured_outputs_and_deprecated_aliases(client):
    out = chat(client, extra_body={"structured_outputs": {"regex": "[a-d]{2}-[0-9]{3}"}})
    assert re.fullmatch("[a-d]{2}-[0-9]{3}", out.message.content) and out.finish_reason == "stop"
    out = chat(client, extra_body={"structured_outputs": {"choice": ["sun", "moon"]}})
    assert out.message.content in ("sun", "moon")
    out = chat(client, extra_body={"guided_choice": ["left", "right"]})
    assert out.message.content in ("left", "right")
    completion = client.completions.create(
        model=client.models.list().data[0].id, prompt="numbers:", max_tokens=60,
        temperature=0.0, extra_body={"guided_json": {"type": "array", "maxItems": 3, "items": {
            "type": "integer", "minimum": 0, "maximum": 9}}})
    assert completion.choices[0].finish_reason == "stop"
    assert all(0 <= x <= 9 for x in json.loads(completion.choices[0].text))
    out = chat(client, extra_body={"structured_outputs": {
        "grammar": 'start: "go " DIR\nDIR: "north" | "south"'}})
    assert out.message.content in ("go north", "go south")


@pytest.mark.parametrize("body, needle", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "unclosed group"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "missing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "exactly one"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "nowhere"),
])
def test_bad_constraints_answer_400_with_the_reason(server, body, needle):
    status, reply = http("POST", server.url + "/v1/chat/completions",
                         {"messages": MESSAGES, "max_tokens": 5, **body})
    assert status == 400, reply
    assert needle in reply["error"]["message"] and reply["error"]["code"] == 400
    assert http("GET", server.url + "/health")[0] == 200


def test_unknown_backend_refuses_to_start(tiny_model_dir):
    from frontend.__main__ import serve

    code = serve([tiny_model_dir, "--structured-outputs-config", '{"backend": "xgrammar"}',
                  "--port", "0"])
    assert code == 2

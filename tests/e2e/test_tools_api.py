"""Tool calling and reasoning through the real server and the official `openai` client.

One server: the tiny random model with a Hermes-style chat template that renders `tools`, tool
calls and tool results, and opens a `<think>` block unless `enable_thinking` is false;
`--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3`. A random model
never calls a tool on its own, so forced calls (a named function, "required") are the ones a
grammar makes it produce; their arguments must parse and follow the tool's schema.
"""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest
from e2e_server import TINY_ENGINE_FLAGS

from frontend.tokenizer import Tokenizer

MODEL = "tiny"
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "what is the weather in the cache?"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sampling.structured") is None,
                                reason="forced tool calls need structured outputs (issue #5)")


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TEMPLATE)
    return server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--served-model-name", MODEL,
                           "--chat-template", str(template), "--enable-auto-tool-choice",
                           "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def create(client: openai.OpenAI, thinking: bool = False, **kw):
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0.0, "max_tokens": 16, **kw}
    return client.chat.completions.create(**body, extra_body={} if thinking else NO_THINK)


def streamed(client: openai.OpenAI, **kw) -> tuple[str, list[tuple[str, str, str]], str]:
    """(content, [(id, name, arguments)], finish_reason) reassembled from the chunks."""
    content, calls, finish = "", {}, None
    for chunk in create(client, stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            entry = calls.setdefault(d.index, ["", "", ""])
            entry[0] += d.id or ""
            entry[1] += d.function.name or ""
            entry[2] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"unit", "days"} and args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7


def test_tools_go_through_the_chat_template(client, tiny_model_dir):
    tok = Tokenizer.from_pretrained(tiny_model_dir)

    def num_tokens(**kw) -> int:
        text = tok.apply_chat_template(MESSAGES, chat_template=TEMPLATE, enable_thinking=False,
                                       **kw)
        return len(tok.encode(text, add_special_tokens=False))

    with_tools = create(client, tools=TOOLS, tool_choice="auto")
    assert with_tools.usage.prompt_tokens == num_tokens(tools=TOOLS)
    # "none" still shows the tools to the model (vLLM's default).
    assert create(client, tools=TOOLS, tool_choice="none").usage.prompt_tokens == \
        num_tokens(tools=TOOLS)
    assert create(client).usage.prompt_tokens == num_tokens() < num_tokens(tools=TOOLS)


def test_auto_and_none_give_text_when_the_model_calls_nothing(client):
    auto = create(client, tools=TOOLS, tool_choice="auto")
    none = create(client, tools=TOOLS, tool_choice="none")
    for reply in (auto, none):
        assert reply.choices[0].message.tool_calls in (None, [])
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert auto.choices[0].message.content == none.choices[0].message.content
    content, calls, finish = streamed(client, tools=TOOLS, tool_choice="auto")
    assert (content, calls, finish) == (auto.choices[0].message.content, [],
                                        auto.choices[0].finish_reason)


def test_named_tool_choice_forces_a_valid_call(client):
    reply = create(client, tools=TOOLS, tool_choice=NAMED, max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    check_weather_args(call.function.arguments)
    content, calls, finish = streamed(client, tools=TOOLS, tool_choice=NAMED, max_tokens=64)
    assert content == "" and finish == "stop"
    assert [(name, args) for _, name, args in calls] == [("get_weather",
                                                           call.function.arguments)]
    assert calls[0][0].startswith("chatcmpl-tool-")


def test_required_tool_choice_forces_calls_from_the_list(client):
    reply = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                   max_tokens=96)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls  # parallel_tool_calls=False: exactly one
    assert call.function.name in ("get_weather", "now")
    if call.function.name == "get_weather":
        check_weather_args(call.function.arguments)
    else:
        assert json.loads(call.function.arguments) == {}
    content, calls, finish = streamed(client, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=96)
    assert finish == "tool_calls" and content == ""
    assert [(name, args) for _, name, args in calls] == [(call.function.name,
                                                           call.function.arguments)]


def test_tool_results_in_the_conversation(client):
    call = {"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"unit": "celsius", "days": 1}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "sunny"}]
    reply = create(client, tools=TOOLS, messages=messages)
    assert reply.usage.prompt_tokens > create(client, tools=TOOLS).usage.prompt_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_bad_tool_choice_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        create(client, tools=TOOLS,
               tool_choice={"type": "function", "function": {"name": "missing"}})
    assert "missing" in err.value.message
    with pytest.raises(openai.BadRequestError):
        create(client, tool_choice="required")  # no tools


def test_reasoning_fields(client):
    # The template opens <think> and the random model never closes it: all reasoning.
    reply = create(client, thinking=True)
    message = reply.choices[0].message
    assert message.reasoning and message.model_extra["reasoning_content"] == message.reasoning
    assert not message.content
    text = ""
    for chunk in create(client, thinking=True, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content
        text += delta.model_extra.get("reasoning") or ""
        assert delta.model_extra.get("reasoning_content") == delta.model_extra.get("reasoning")
    assert text == message.reasoning
    # enable_thinking false: no thought, plain content.
    plain = create(client).choices[0].message
    assert plain.content and plain.model_extra.get("reasoning") is None

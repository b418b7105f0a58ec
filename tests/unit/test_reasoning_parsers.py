"""Reasoning parsers over recorded replies (whole and streamed in random chunks), and the chat
plan that combines them with tool parsing and structured outputs."""

from __future__ import annotations

import json
import random

import pytest

from frontend import openai as api
from frontend.chat import ChatFeatures, ChoiceParser
from frontend.cli import ServerConfig
from frontend.reasoning import ReasoningStreamer, get_reasoning_parser
from frontend.tokenizer import Tokenizer
from frontend.tools import get_tool_parser

QWEN_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
R1_PROMPT = "<|User|>hi<|Assistant|><think>\n"

# parser, prompt, chat_template_kwargs, reply, expected (reasoning, content)
CASES = [
    ("qwen3", QWEN_PROMPT, {}, "<think>\nLet me think.\n</think>\n\nParis.",
     ("\nLet me think.\n", "Paris.")),
    ("qwen3", QWEN_PROMPT, {}, "Paris, no thought.", (None, "Paris, no thought.")),
    ("qwen3", QWEN_PROMPT, {}, "<think>cut off while thin", ("cut off while thin", "")),
    ("qwen3", QWEN_PROMPT, {"enable_thinking": False}, "<think>x</think>y",
     (None, "<think>x</think>y")),
    ("qwen3", QWEN_PROMPT + "<think>\n\n</think>\n\n", {}, "<think>x</think>y",
     (None, "<think>x</think>y")),  # the template closed an empty thought: thinking is off
    ("qwen3", QWEN_PROMPT + "<think>\n", {}, "opened by the prompt</think>answer",
     ("opened by the prompt", "answer")),
    ("think", "", {}, "  <think>a < b </thinking? no</think> done", ("a < b </thinking? no",
                                                                    "done")),
    ("think", "", {"thinking": False}, "<think>a</think>b", (None, "<think>a</think>b")),
    ("deepseek_r1", R1_PROMPT, {}, "Hmm, 2+2.\n</think>\n\n4", ("Hmm, 2+2.\n", "4")),
    ("deepseek_r1", R1_PROMPT, {}, "<think>again</think>4", ("again", "4")),
    ("deepseek_r1", R1_PROMPT, {}, "never finishes", ("never finishes", "")),
    ("deepseek_r1", "", {}, "<thin", ("<thin", "")),
]


def chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 30))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(("name", "prompt", "kwargs", "reply", "expected"), CASES)
def test_whole_and_streamed(name, prompt, kwargs, reply, expected):
    factory = get_reasoning_parser(name)
    parsed = factory(prompt, kwargs).parse(reply, final=True)
    assert (parsed.reasoning, parsed.content) == expected
    for seed in range(25):
        streamer = ReasoningStreamer(factory(prompt, kwargs))
        pieces = chunks(reply, random.Random(seed))
        reasoning = content = ""
        for i, piece in enumerate(pieces):
            r, c = streamer.feed(piece, final=i == len(pieces) - 1)
            reasoning, content = reasoning + r, content + c
        assert (reasoning, content) == (expected[0] or "", expected[1]), seed


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3, think"):
        get_reasoning_parser("nope")


def test_tool_calls_come_from_the_content_only():
    reasoning = get_reasoning_parser("qwen3")(QWEN_PROMPT, {})
    tools = get_tool_parser("hermes")([])
    reply = ('<think>maybe <tool_call>{"name": "no", "arguments": {}}</tool_call>?</think>\n'
             'Calling.\n<tool_call>{"name": "yes", "arguments": {"a": 1}}</tool_call>')
    whole, called = ChoiceParser(reasoning, tools, None, True).message(reply)
    assert called and [c.function.name for c in whole.tool_calls] == ["yes"]
    assert whole.reasoning == whole.reasoning_content == \
        'maybe <tool_call>{"name": "no", "arguments": {}}</tool_call>?'
    assert whole.content == "Calling."
    parser = ChoiceParser(get_reasoning_parser("qwen3")(QWEN_PROMPT, {}),
                          get_tool_parser("hermes")([]), None, True)
    pieces = chunks(reply, random.Random(3))
    deltas = [parser.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert "".join(d.reasoning or "" for d in deltas) == whole.reasoning
    assert all(d.reasoning == d.reasoning_content for d in deltas)
    assert "".join(d.content or "" for d in deltas) == "Calling."
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert calls[0].function.name == "yes"
    assert "".join(t.function.arguments or "" for t in calls) == '{"a": 1}'
    assert parser.finish_reason("stop", parser.tools_called) == "tool_calls"
    hidden, _ = ChoiceParser(get_reasoning_parser("qwen3")(QWEN_PROMPT, {}), None, None,
                             False).message("<think>x</think>y")
    assert hidden.reasoning is None and hidden.content == "y"


# ---------------------------------------------------------------------- the chat plan

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def chat(**body) -> api.ChatCompletionRequest:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return api.chat_request_decoder.decode(json.dumps(body))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


def test_plan_checks_tool_choice(tokenizer):
    plain = ChatFeatures(ServerConfig(), tokenizer)
    with pytest.raises(ValueError, match='"auto" needs the server started with'):
        plain.plan(chat(tools=TOOLS))  # tools and no tool_choice mean "auto"
    with pytest.raises(ValueError, match="no tool named 'nope'"):
        plain.plan(chat(tools=TOOLS, tool_choice={"type": "function",
                                                  "function": {"name": "nope"}}))
    with pytest.raises(ValueError, match="needs a non-empty tools list"):
        plain.plan(chat(tool_choice="required"))
    assert plain.plan(chat(tools=TOOLS, tool_choice="none")).template_tools == TOOLS
    hide = ChatFeatures(ServerConfig(exclude_tools_when_tool_choice_none=True), tokenizer)
    assert hide.plan(chat(tools=TOOLS, tool_choice="none")).template_tools is None
    auto = ChatFeatures(ServerConfig(enable_auto_tool_choice=True, tool_call_parser="hermes"),
                        tokenizer)
    plan = auto.plan(chat(tools=TOOLS))
    assert plan.tool_choice == "auto" and plan.choice_parser() is not None
    assert auto.plan(chat(tools=TOOLS, tool_choice="none")).choice_parser() is None
    with pytest.raises(ValueError, match="unknown parser"):
        ServerConfig(tool_call_parser="nope").validate()
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServerConfig(enable_auto_tool_choice=True).validate()


def test_forced_choice_becomes_a_constraint_after_reasoning(tokenizer):
    from sampling.params import SamplingParams, StructuredOutputsParams

    features = ChatFeatures(ServerConfig(reasoning_parser="qwen3"), tokenizer)
    plan = features.plan(chat(tools=TOOLS, tool_choice="required"))
    params = plan.sampling_params(SamplingParams())
    so = params.structured_outputs
    assert so is not None and so.json["type"] == "array" and so.disable_any_whitespace
    assert so.reasoning_end_token_ids == tokenizer.encode("</think>", add_special_tokens=False)
    named = features.plan(chat(tools=TOOLS, tool_choice={"type": "function",
                                                         "function": {"name": "get_weather"}}))
    assert named.sampling_params(SamplingParams()).structured_outputs.json == \
        TOOLS[0]["function"]["parameters"]
    with pytest.raises(ValueError, match="cannot be combined"):
        plan.sampling_params(SamplingParams(structured_outputs=StructuredOutputsParams(
            regex="a")))
    # Thinking off: the constraint applies from the first token.
    off = features.plan(chat(tools=TOOLS, tool_choice="required",
                             chat_template_kwargs={"enable_thinking": False}))
    assert off.sampling_params(SamplingParams()).structured_outputs.reasoning_end_token_ids \
        is None
    # A response_format constraint also waits for the reasoning to end.
    so = features.plan(chat()).sampling_params(SamplingParams(
        structured_outputs=StructuredOutputsParams(json_object=True))).structured_outputs
    assert so.reasoning_end_token_ids


def test_template_messages_carry_tool_calls_and_reasoning(tokenizer):
    plan = ChatFeatures(ServerConfig(), tokenizer).plan(chat())
    messages = plan.template_messages([
        {"role": "assistant", "reasoning": "hmm", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    assert messages[0]["reasoning_content"] == "hmm"
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[1] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}

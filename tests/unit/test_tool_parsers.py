"""Tool parsers over recorded model outputs: whole replies, the same replies streamed in random
chunks (the deltas must add up to the whole-reply result), and malformed replies, which come back
as plain content."""

from __future__ import annotations

import json
import random

import pytest

from frontend import tools as T

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "opts": {"type": "object"}}}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]

# parser, model output, expected content, expected [(name, arguments as data)]
WELL_FORMED = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris", "days": 3}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": '
               '{}}\n</tool_call>', "Let me check.",
     [("get_weather", {"city": "Paris", "days": 3}), ("now", {})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tok\\"yo} <x>"}}\n'
               '</tool_call>', None, [("get_weather", {"city": 'Tok"yo} <x>'})]),
    ("hermes", '<tool_call>{"arguments": {"city": "Rome"}, "name": "get_weather"}</tool_call>',
     None, [("get_weather", {"city": "Rome"})]),
    ("hermes", '<tool_call>\n{"name": "now", "arguments": {}}', None, [("now", {})]),  # cut
    ("hermes", "Just text, <b>no</b> tools <tool", "Just text, <b>no</b> tools <tool", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "now", "parameters": {}}', None,
     [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"opts": {"a": [1, '
                    '2]}}}', None, [("get_weather", {"opts": {"a": [1, 2]}})]),
    ("llama3_json", "The answer is {not json}", "The answer is {not json}", []),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "now", "arguments": {}}]', "Sure.",
     [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 2}[TOOL_CALLS]now[ARGS]{}',
     None, [("get_weather", {"city": "Rome", "days": 2}), ("now", {})]),
    ("mistral", "No calls [TOOL here", "No calls [TOOL here", []),
    ("pythonic", '[get_weather(city="Paris", days=3, metric=True), now()]', None,
     [("get_weather", {"city": "Paris", "days": 3, "metric": True}), ("now", {})]),
    ("pythonic", "<|python_start|>[get_weather(opts={'k': [1, None], 'j': false}, city='a,b')]"
                 "<|python_end|>", None,
     [("get_weather", {"opts": {"k": [1, None], "j": False}, "city": "a,b"})]),
    ("pythonic", "Hello [world]", "Hello [world]", []),
    ("qwen3_xml", "I will look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan "
                  "Francisco\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>"
                  "\nTrue\n</parameter>\n<parameter=opts>\n{\"a\": 1}\n</parameter>\n</function>\n"
                  "</tool_call>\n<tool_call>\n<function=now>\n</function>\n</tool_call>",
     "I will look.", [("get_weather", {"city": "San Francisco", "days": 3, "metric": True,
                                       "opts": {"a": 1}}), ("now", {})]),
    ("qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n"
                  "</function>\n</tool_call>", None, [("get_weather", {"city": "42"})]),
]

# Malformed: the whole text comes back as content, streamed or not.
MALFORMED = [
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>"),
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    ("hermes", '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>'),
    ("llama3_json", '{"nam'),
    ("llama3_json", '{"name" 5, "parameters": {}}'),
    ("mistral", "[TOOL_CALLS]oops"),
    ("mistral", "[TOOL_CALLS][1, 2]"),
    ("pythonic", "[1, 2, 3]"),
    ("pythonic", "[f(1, 2)]"),
    ("qwen3_xml", "<tool_call>\nno function here\n</tool_call>"),
]


def stream(parser: T.ToolParser, text: str, rng: random.Random,
           max_calls: int | None = None) -> tuple[str, list[tuple[str, str]], list]:
    """Feed text in random chunks; return (content, [(name, arguments)], all deltas)."""
    streamer = T.ToolCallStreamer(parser, max_calls)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 40))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    content, calls, deltas = "", {}, []
    for i, piece in enumerate(pieces):
        new_content, new_calls = streamer.feed(piece, final=i == len(pieces) - 1)
        content += new_content
        for d in new_calls:
            deltas.append(d)
            entry = calls.setdefault(d.index, ["", ""])
            entry[0] += d.function.name or ""
            entry[1] += d.function.arguments or ""
    return content, [tuple(calls[i]) for i in sorted(calls)], deltas


@pytest.mark.parametrize(("name", "text", "content", "expected"), WELL_FORMED)
def test_whole_reply(name, text, content, expected):
    got = T.extract_tool_calls(T.get_tool_parser(name)(TOOLS), text)
    assert got.content == (text if not expected else content)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got.tool_calls] == \
        expected
    assert len({c.id for c in got.tool_calls}) == len(expected)
    if name == "mistral":
        assert all(len(c.id) == 9 and c.id.isalnum() for c in got.tool_calls)


@pytest.mark.parametrize(("name", "text", "content", "expected"), WELL_FORMED)
def test_streamed_equals_whole(name, text, content, expected):
    factory = T.get_tool_parser(name)
    whole = T.extract_tool_calls(factory(TOOLS), text)
    for seed in range(25):
        got_content, got_calls, deltas = stream(factory(TOOLS), text, random.Random(seed))
        assert got_content == (whole.content or ""), seed
        assert got_calls == [(c.function.name, c.function.arguments) for c in whole.tool_calls]
        # OpenAI's delta shape: the first delta of a call carries id, type and name; the rest
        # only pieces of the arguments.
        firsts = {}
        for d in deltas:
            if d.index not in firsts:
                firsts[d.index] = d
                assert d.id and d.type == "function" and d.function.name
            else:
                assert d.id is None and d.function.name is None and d.function.arguments
        assert sorted(firsts) == list(range(len(expected)))


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_malformed_is_content(name, text):
    factory = T.get_tool_parser(name)
    got = T.extract_tool_calls(factory(TOOLS), text)
    assert got.content == text and got.tool_calls == []
    for seed in range(10):
        content, calls, _ = stream(factory(TOOLS), text, random.Random(seed))
        assert (content, calls) == (text, [])


# Malformed only after a call went out in the stream: streaming cannot take the call back, so
# the rest of the reply follows as content; the whole-reply parse is all content.
BROKEN_AFTER_CALL = [
    ("hermes", '<tool_call>{"name": "now", "arguments": {"a": 1</tool_call> and more',
     [("now", '{"a": 1')]),
    ("llama3_json", '{"name": "now", "parameters": {"a": }}', [("now", '{"a": ')]),
    ("pythonic", "[now(a=open('x'))]", [("now", "{")]),
    ("pythonic", "[now(a=1", [("now", "{")]),  # cut off
]


@pytest.mark.parametrize(("name", "text", "calls"), BROKEN_AFTER_CALL)
def test_malformed_after_a_streamed_call_flushes_the_rest_as_content(name, text, calls):
    factory = T.get_tool_parser(name)
    got = T.extract_tool_calls(factory(TOOLS), text)
    assert got.content == text and got.tool_calls == []
    content, streamed, _ = stream(factory(TOOLS), text, random.Random(0))
    assert streamed[0][0] == calls[0][0] and calls[0][1].startswith(streamed[0][1])
    assert content == text  # nothing is lost


@pytest.mark.parametrize("name", ["hermes", "mistral", "pythonic", "qwen3_xml"])
def test_parallel_tool_calls_false_keeps_the_first(name):
    text = next(t for n, t, _, calls in WELL_FORMED if n == name and len(calls) == 2)
    parser = T.get_tool_parser(name)(TOOLS)
    got = T.extract_tool_calls(parser, text, max_calls=1)
    assert [c.function.name for c in got.tool_calls] == ["get_weather"]
    _, calls, _ = stream(parser, text, random.Random(1), max_calls=1)
    assert [c[0] for c in calls] == ["get_weather"]


def test_forced_tool_choice_schema_and_parsers():
    params = TOOLS[0]["function"]["parameters"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert T.forced_tool_schema(TOOLS, named) == params
    assert T.forced_tool_schema(TOOLS, "auto") is None
    schema = T.forced_tool_schema(TOOLS, "required", parallel_tool_calls=False)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    options = schema["items"]["anyOf"]
    assert [o["properties"]["name"]["enum"] for o in options] == [["get_weather"], ["now"]]
    assert options[0]["properties"]["parameters"] == params
    # Named: the whole reply is the arguments, streamed as they come.
    text = ' {"city": "Oslo"} '
    whole = T.extract_tool_calls(T.forced_tool_parser(named), text)
    assert whole.content is None and whole.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert stream(T.forced_tool_parser(named), text, random.Random(2))[1] == [
        ("get_weather", '{"city": "Oslo"}')]
    # Required: a JSON list of {"name", "parameters"}.
    text = '[{"name": "get_weather", "parameters": {"days": 1}}, {"name": "now", "parameters": {}}]'
    whole = T.extract_tool_calls(T.forced_tool_parser("required"), text)
    assert [(c.function.name, c.function.arguments) for c in whole.tool_calls] == [
        ("get_weather", '{"days": 1}'), ("now", "{}")]
    for seed in range(10):
        assert stream(T.forced_tool_parser("required"), text, random.Random(seed))[1] == [
            ("get_weather", '{"days": 1}'), ("now", "{}")]
    cut = T.extract_tool_calls(T.forced_tool_parser("required"), text[:30])
    assert cut.tool_calls == [] and cut.content == text[:30]


def test_plugin_registers_a_parser(tmp_path):
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from frontend.tools import ParsedCall, ToolParse, random_call_id, register_tool_parser\n"
        "\n"
        "@register_tool_parser('bang')\n"
        "class BangParser:\n"
        "    markers = ('!',)\n"
        "    call_id = staticmethod(random_call_id)\n"
        "    def __init__(self, tools):\n"
        "        pass\n"
        "    def parse(self, text, final):\n"
        "        if text.startswith('!'):\n"
        "            return ToolParse('', [ParsedCall(text[1:].strip(), '{}', final)])\n"
        "        return ToolParse(text, [])\n")
    with pytest.raises(ValueError, match="unknown parser 'bang'"):
        T.get_tool_parser("bang")
    T.load_tool_parser_plugin(str(plugin))
    got = T.extract_tool_calls(T.get_tool_parser("bang")([]), "!now")
    assert got.tool_calls[0].function.name == "now"
    with pytest.raises(ValueError, match="neither a file nor a module"):
        T.load_tool_parser_plugin(str(tmp_path / "missing.py"))
    del T.TOOL_PARSERS["bang"]

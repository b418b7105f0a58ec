"""Tool calling: the `ToolParser` plug point, its registry, and the built-in parsers.

A parser turns model output text into a `ToolParse`: the text outside tool calls (`content`) and
the calls found (`name`, `arguments` as JSON text). One method serves both the whole reply and a
growing stream, through the `final` flag:

    final=True   the complete output; anything malformed makes it all plain content, no calls
    final=False  a prefix of the output; the parse must be *stable*: content is a prefix of the
                 final content, every name is final, every `arguments` is a prefix of the final
                 arguments (so a parser holds back what it is not yet sure of)

`extract_tool_calls` wraps a final parse into OpenAI tool calls; `ToolCallStreamer` re-parses the
growing text and sends only what is new, as OpenAI delta tool calls (id, index, name, pieces of
arguments). Streaming commits to a call once its name is out: if the output turns out malformed
after that, the rest of it comes back as content.

Built-ins (`--tool-call-parser`): hermes, llama3_json, mistral, pythonic, qwen3_xml. Users add
their own with `register_tool_parser` in a file named by `--tool-parser-plugin`. The JSON scanning
and the forced-choice parsers (named function, `required`) live in `frontend/tool_formats.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from frontend import openai as api
from frontend.registry import Registry, import_plugin
from frontend.tool_formats import (
    NamedToolParser,
    ParsedCall,
    RequiredToolParser,
    ToolParse,
    hold_back,
    json_args,
    json_call_list,
    python_call_list,
    qwen_xml_function,
    skip_ws,
)

__all__ = ["ParsedCall", "ToolParse", "ToolParser", "ToolCallStreamer", "extract_tool_calls",
           "register_tool_parser", "get_tool_parser", "load_tool_parser_plugin", "TOOL_PARSERS",
           "forced_tool_schema", "forced_tool_parser"]


class ToolParser(Protocol):
    """Finds tool calls in model output; built with the request's `tools` (OpenAI dicts)."""

    # Literal strings that start a tool call; when the tokenizer has them as special tokens the
    # server keeps special tokens in the detokenized text.
    markers: tuple[str, ...]

    def parse(self, text: str, final: bool) -> ToolParse:
        """Content and calls of `text` (see the module docstring for the `final` contract)."""
        ...

    def call_id(self) -> str:
        """A fresh tool call id."""
        ...


ToolParserFactory = Callable[[list[dict[str, Any]]], ToolParser]
TOOL_PARSERS: Registry[ToolParserFactory] = Registry("tool_call_parser")
# Class decorator: make a parser available as --tool-call-parser NAME.
register_tool_parser = TOOL_PARSERS.register
get_tool_parser = TOOL_PARSERS.get_factory


def load_tool_parser_plugin(path: str) -> None:
    """Import a user module (a .py file or a dotted module name) that registers parsers."""
    import_plugin(path, "tool_parser_plugin")


def random_call_id() -> str:
    """vLLM's tool call id shape."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def mistral_call_id() -> str:
    """Nine alphanumerics, the only shape Mistral's chat templates accept."""
    return uuid.uuid4().hex[:9]


# ---------------------------------------------------------------------- using a parser


@dataclass
class ExtractedToolCalls:
    """The whole reply split into content and OpenAI tool calls."""

    content: str | None
    tool_calls: list[api.ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


def extract_tool_calls(parser: ToolParser, text: str,
                       max_calls: int | None = None) -> ExtractedToolCalls:
    """Parse a complete output; with calls, content loses trailing whitespace (None if empty)."""
    parsed = parser.parse(text, final=True)
    calls = parsed.calls[:max_calls]
    if not calls:
        return ExtractedToolCalls(text, [])
    tool_calls = [api.ToolCall(id=parser.call_id(),
                               function=api.FunctionCall(name=c.name, arguments=c.arguments))
                  for c in calls]
    return ExtractedToolCalls(parsed.content.rstrip() or None, tool_calls)


@dataclass
class _SentCall:
    arguments: str = ""  # the arguments text sent so far


@dataclass
class ToolCallStreamer:
    """One choice's stream: feed output text as it grows, get content and delta tool calls.

    Content is sent up to its last non-whitespace character, so whitespace between the text and
    a following call never goes out; at the end it is flushed only if no call was made. Together
    the deltas equal what `extract_tool_calls` returns for the whole text.
    """

    parser: ToolParser
    max_calls: int | None = None
    text: str = ""
    content_sent: str = ""  # the content sent so far
    sent: list[_SentCall] = field(default_factory=list)

    @property
    def tools_called(self) -> bool:
        return bool(self.sent)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[api.DeltaToolCall]]:
        """Add `delta` to the output; return (new content, new tool call deltas)."""
        self.text += delta
        parsed = self.parser.parse(self.text, final=final)
        calls = parsed.calls[:self.max_calls]
        # A final parse without calls (none made, or malformed after one went out) flushes all.
        content = self._take_content(parsed.content, flush=final and not calls)
        deltas = [d for i, call in enumerate(calls) if (d := self._call_delta(i, call))]
        return content, deltas

    def _take_content(self, content: str, flush: bool) -> str:
        if not content.startswith(self.content_sent):
            return ""  # the parser broke its promise; send nothing rather than a contradiction
        end = len(content) if flush else len(content.rstrip())
        piece = content[len(self.content_sent):end]
        self.content_sent += piece
        return piece

    def _call_delta(self, i: int, call: ParsedCall) -> api.DeltaToolCall | None:
        if i > len(self.sent):
            return None  # an earlier call is missing from this parse: wait
        if i == len(self.sent):
            self.sent.append(_SentCall(call.arguments))
            return api.DeltaToolCall(
                index=i, id=self.parser.call_id(), type="function",
                function=api.DeltaFunctionCall(name=call.name, arguments=call.arguments))
        sent = self.sent[i]
        if not call.arguments.startswith(sent.arguments) or call.arguments == sent.arguments:
            return None
        piece = call.arguments[len(sent.arguments):]
        sent.arguments = call.arguments
        return api.DeltaToolCall(index=i, function=api.DeltaFunctionCall(arguments=piece))


# ---------------------------------------------------------------------- built-in parsers


class _TaggedCallParser:
    """Calls sit between an open and a close tag; text around them is content. Subclasses read
    one block with `parse_block`, raising ValueError when it is malformed (the whole reply then
    comes back as plain content)."""

    open_tag = "<tool_call>"
    close_tag = "</tool_call>"

    def __init__(self, tools: list[dict[str, Any]]):
        self.markers = (self.open_tag,)

    def call_id(self) -> str:
        return random_call_id()

    def parse_block(self, text: str, body: int, close: int, final: bool) -> list[ParsedCall]:
        """Calls of the block starting at `body` (close < 0: its close tag has not arrived)."""
        raise NotImplementedError

    def parse(self, text: str, final: bool) -> ToolParse:
        content: list[str] = []
        calls: list[ParsedCall] = []
        pos = 0
        try:
            while (start := text.find(self.open_tag, pos)) >= 0:
                content.append(text[pos:start])
                body = start + len(self.open_tag)
                close = text.find(self.close_tag, body)
                calls += self.parse_block(text, body, close, final)
                if close < 0:
                    return ToolParse("".join(content), calls)
                pos = close + len(self.close_tag)
        except ValueError:
            return ToolParse(text, []) if final else ToolParse("".join(content), calls)
        rest = text[pos:]
        content.append(rest if final else rest[:len(rest) - hold_back(rest, self.open_tag)])
        return ToolParse("".join(content), calls)


class _TaggedJSONParser(_TaggedCallParser):
    """Calls are JSON objects between the tags."""

    def parse_block(self, text: str, body: int, close: int, final: bool) -> list[ParsedCall]:
        block = text[body:close] if close >= 0 else \
            text[body:len(text) - hold_back(text, self.close_tag)]
        found, end = json_call_list(block, skip_ws(block, 0), "")
        if close < 0:
            if final and not (end is not None and found):  # EOS inside an unfinished call
                raise ValueError("unterminated tool call")
            return found
        if end is None or block[end:].strip() or not found:
            raise ValueError("tool call block is not JSON calls")
        return found


@register_tool_parser("hermes")
class HermesToolParser(_TaggedJSONParser):
    """Hermes 2 Pro / Qwen2.5: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`."""


@register_tool_parser("llama3_json")
class Llama3JSONToolParser:
    """Llama 3.x: the reply is `{"name": ..., "parameters": {...}}` (several joined by `;`),
    optionally after `<|python_tag|>`; anything else is plain content."""

    tag = "<|python_tag|>"

    def __init__(self, tools: list[dict[str, Any]]):
        self.markers = (self.tag, "{")

    def call_id(self) -> str:
        return random_call_id()

    def parse(self, text: str, final: bool) -> ToolParse:
        start = skip_ws(text, 0)
        if text.startswith(self.tag, start):
            start = skip_ws(text, start + len(self.tag))
        elif not final and self.tag.startswith(text[start:]):
            return ToolParse("", [])  # maybe the tag, maybe not: wait
        if start == len(text) and not final:
            return ToolParse("", [])
        if not text.startswith("{", start):
            return ToolParse(text, [])
        return _call_sequence(text, start, ";", final)


@register_tool_parser("mistral")
class MistralToolParser:
    """Mistral: content, then `[TOOL_CALLS]` and a JSON list of calls (v3 tokenizers) or
    `name[ARGS]{...}` per call (v11+ tokenizers)."""

    tag = "[TOOL_CALLS]"
    args_tag = "[ARGS]"

    def __init__(self, tools: list[dict[str, Any]]):
        self.markers = (self.tag,)

    def call_id(self) -> str:
        return mistral_call_id()

    def parse(self, text: str, final: bool) -> ToolParse:
        first = text.find(self.tag)
        if first < 0:
            return ToolParse(text if final else text[:len(text) - hold_back(text, self.tag)], [])
        content = text[:first]
        start = skip_ws(text, first + len(self.tag))
        if start < len(text) and text[start] in "[{":
            parsed = _call_sequence(text, start, "", final)
            return ToolParse(content + parsed.content, parsed.calls) if parsed.calls or \
                not final else ToolParse(text, [])
        calls: list[ParsedCall] = []
        try:
            for piece in text[first + len(self.tag):].split(self.tag):
                name, sep, args = piece.partition(self.args_tag)
                if not sep:
                    if final:
                        raise ValueError("no [ARGS] after a tool name")
                    break
                arguments, end = json_args(args, skip_ws(args, 0))
                if final and (end is None or args[end:].strip()):
                    raise ValueError("bad arguments")
                calls.append(ParsedCall(name.strip(), arguments, end is not None))
        except ValueError:
            return ToolParse(text, []) if final else ToolParse(content, calls)
        return ToolParse(content, calls)


@register_tool_parser("pythonic")
class PythonicToolParser:
    """The reply is a Python list of calls, `[get_weather(city="Paris"), f(x=1)]`, optionally
    between Llama 4's `<|python_start|>` and `<|python_end|>`; anything else is content."""

    wrappers = ("<|python_start|>", "<|python_end|>")

    def __init__(self, tools: list[dict[str, Any]]):
        self.markers = ("[", self.wrappers[0])

    def call_id(self) -> str:
        return random_call_id()

    def parse(self, text: str, final: bool) -> ToolParse:
        body = text.strip() if final else text.lstrip()
        for tag in self.wrappers:
            body = body.replace(tag, "")
        if not final and (not body or self.wrappers[0].startswith(body)):
            return ToolParse("", [])
        if not body.startswith("["):
            return ToolParse(text, [])
        try:
            calls, done = python_call_list(body)
        except (ValueError, SyntaxError, TypeError, RecursionError):
            return ToolParse(text, []) if final else ToolParse("", [])
        if final and not (done and calls):
            return ToolParse(text, [])
        return ToolParse("", calls)


@register_tool_parser("qwen3_xml")
@register_tool_parser("qwen3_coder")
class Qwen3XMLToolParser(_TaggedCallParser):
    """Qwen3-Coder: `<tool_call><function=NAME><parameter=KEY>value</parameter>...</function>
    </tool_call>`; values are converted by the tool's parameter schema (strings stay raw)."""

    def __init__(self, tools: list[dict[str, Any]]):
        super().__init__(tools)
        self.schemas = {t["function"]["name"]: t["function"].get("parameters") or {}
                        for t in tools if isinstance(t.get("function"), dict)
                        and "name" in t["function"]}

    def parse_block(self, text: str, body: int, close: int, final: bool) -> list[ParsedCall]:
        block = text[body:] if close < 0 else text[body:close]
        call = qwen_xml_function(block, self.schemas, final or close >= 0)
        if close < 0:
            if final and call is None:
                raise ValueError("unterminated tool call")
            return [] if call is None else [call]
        if call is None:
            raise ValueError("tool call without a function")
        return [call]


# ---------------------------------------------------------------------- forced tool choice


def forced_tool_schema(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any],
                       parallel_tool_calls: bool = True) -> dict[str, Any] | None:
    """The JSON schema that forces a named function's arguments or, for "required", a list of
    `{"name", "parameters"}` calls; None for "none" and "auto"."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        function = next(t["function"] for t in tools if t["function"]["name"] == name)
        return function.get("parameters") or {"type": "object"}
    if tool_choice != "required":
        return None
    options = [{"type": "object",
                "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                               "parameters": t["function"].get("parameters")
                               or {"type": "object"}},
                "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def forced_tool_parser(tool_choice: str | dict[str, Any]) -> ToolParser:
    """The parser of a reply forced by `forced_tool_schema`."""
    if isinstance(tool_choice, dict):
        return NamedToolParser(tool_choice["function"]["name"], random_call_id)
    return RequiredToolParser(random_call_id)


def _call_sequence(text: str, start: int, sep: str, final: bool) -> ToolParse:
    """Calls as JSON from `start`, then content; final and malformed: all content."""
    try:
        calls, end = json_call_list(text, start, sep)
        if final and (end is None or not calls):
            raise ValueError("not a complete call")
    except ValueError:
        return ToolParse(text, []) if final else ToolParse("", [])
    return ToolParse("" if end is None else text[end:].lstrip(), calls)

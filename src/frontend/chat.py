"""Tools, tool choice and reasoning around one chat completion request.

`ChatFeatures` (one per API server) holds the `--tool-call-parser` / `--reasoning-parser`
choices. For each request it checks `tools` and `tool_choice` and makes a `ChatPlan`, which
    - gives the chat template its messages (assistant tool call arguments as objects, `reasoning`
      also as `reasoning_content`) and its tools (none with `tool_choice="none"` when the server
      says so),
    - adjusts the `SamplingParams`: a forced tool choice (a named function, "required") becomes a
      JSON-schema constraint; a constraint waits for the end of the reasoning; special tokens
      stay in the text when the parsers' markers are special tokens,
    - builds one `ChoiceParser` per choice: reasoning first, then tool calls from the content.

Tool choice modes: "none" (text only), "auto" (the model decides; needs
`--enable-auto-tool-choice` and a parser), "required" (one or more calls, forced by a grammar)
and a named function (one call to it, forced by a grammar).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from frontend import openai as api
from frontend.cli import ServerConfig
from frontend.reasoning import (
    ReasoningParser,
    ReasoningParserFactory,
    ReasoningStreamer,
    get_reasoning_parser,
)
from frontend.tokenizer import Tokenizer
from frontend.tools import (
    ToolCallStreamer,
    ToolParser,
    ToolParserFactory,
    extract_tool_calls,
    forced_tool_parser,
    forced_tool_schema,
    get_tool_parser,
    load_tool_parser_plugin,
)
from sampling.params import SamplingParams, StructuredOutputsParams


class ChatFeatures:
    """The server's tool and reasoning settings; `plan()` applies them to one request."""

    def __init__(self, config: ServerConfig, tokenizer: Tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        if config.tool_parser_plugin is not None:
            load_tool_parser_plugin(config.tool_parser_plugin)
        self.tool_parser: ToolParserFactory | None = (
            None if config.tool_call_parser is None else get_tool_parser(config.tool_call_parser))
        self.reasoning_parser: ReasoningParserFactory | None = (
            None if config.reasoning_parser is None
            else get_reasoning_parser(config.reasoning_parser))

    def plan(self, req: api.ChatCompletionRequest) -> ChatPlan:
        """Check the request's tool fields; ValueError ("field: why") when they are wrong."""
        tools = [msgspec.to_builtins(t) for t in req.tools or []]
        choice = req.tool_choice or ("auto" if tools else "none")
        choice_value: str | dict[str, Any] = (choice if isinstance(choice, str)
                                              else msgspec.to_builtins(choice))
        names = [t["function"]["name"] for t in tools]
        if choice_value not in ("none", "auto") and not tools:
            raise ValueError("tool_choice: needs a non-empty tools list")
        if isinstance(choice_value, dict) and choice_value["function"]["name"] not in names:
            raise ValueError(f"tool_choice: no tool named {choice_value['function']['name']!r} "
                             f"in tools")
        if choice_value == "auto" and tools and not (
                self.config.enable_auto_tool_choice and self.tool_parser is not None):
            raise ValueError('tool_choice: "auto" needs the server started with '
                             "--enable-auto-tool-choice and --tool-call-parser")
        template_kwargs = dict(req.chat_template_kwargs or {})
        hide_tools = choice_value == "none" and self.config.exclude_tools_when_tool_choice_none
        return ChatPlan(self, tools, choice_value if tools else "none", req.parallel_tool_calls,
                        req.include_reasoning, template_kwargs,
                        None if hide_tools or not tools else tools)


@dataclass
class ChatPlan:
    """One request's checked tool choice and parsers."""

    features: ChatFeatures
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]  # "none" | "auto" | "required" | {"function": {"name"}}
    parallel_tool_calls: bool
    include_reasoning: bool
    template_kwargs: dict[str, Any]
    template_tools: list[dict[str, Any]] | None  # what the chat template sees
    prompt: str = ""  # the rendered prompt (set once rendered; reasoning parsers read it)

    @property
    def forced(self) -> bool:
        """A grammar makes the reply a tool call (named function or "required")."""
        return self.tool_choice not in ("none", "auto")

    def template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as chat templates expect them (they read arguments as objects)."""
        out = []
        for m in messages:
            m = dict(m)
            if m.get("reasoning") is not None and m.get("reasoning_content") is None:
                m["reasoning_content"] = m["reasoning"]
            if m.get("tool_calls"):
                m["tool_calls"] = [_call_with_object_args(c) for c in m["tool_calls"]]
            out.append(m)
        return out

    def reasoning(self) -> ReasoningParser | None:
        """A fresh reasoning parser for one choice, None when this request does not reason."""
        factory = self.features.reasoning_parser
        parser = None if factory is None else factory(self.prompt, self.template_kwargs)
        return parser if parser is not None and parser.enabled else None

    def tool_parser(self) -> ToolParser | None:
        """A fresh tool parser for one choice, None when tool calls are not parsed."""
        if self.forced:
            return forced_tool_parser(self.tool_choice)
        factory = self.features.tool_parser
        if self.tool_choice != "auto" or factory is None:
            return None
        return factory(self.tools)

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """`params` with the tool-choice constraint, the reasoning gate and special tokens."""
        if self.forced:
            if params.structured_outputs is not None:
                raise ValueError("tool_choice: a forced tool call cannot be combined with "
                                 "another output constraint (response_format, ...)")
            schema = forced_tool_schema(self.tools, self.tool_choice, self.parallel_tool_calls)
            # Compact JSON: arguments are read by programs, and a grammar that allows any
            # whitespace lets a weak model pad forever.
            params = msgspec.structs.replace(params, structured_outputs=StructuredOutputsParams(
                json=schema, disable_any_whitespace=True))
        reasoning, tools = self.reasoning(), self.tool_parser()
        tokenizer = self.features.tokenizer
        if params.structured_outputs is not None and reasoning is not None:
            end_ids = tokenizer.encode(reasoning.end_tag, add_special_tokens=False)
            params = msgspec.structs.replace(params, structured_outputs=msgspec.structs.replace(
                params.structured_outputs, reasoning_end_token_ids=end_ids))
        markers = set(tools.markers if tools is not None else ())
        if reasoning is not None:
            markers.add(reasoning.end_tag)
        if markers & set(tokenizer.all_special_tokens):
            params = msgspec.structs.replace(params, skip_special_tokens=False)
        return params

    def choice_parser(self) -> ChoiceParser | None:
        """Per-choice parsing state, None when the reply is plain content."""
        reasoning, tools = self.reasoning(), self.tool_parser()
        if reasoning is None and tools is None:
            return None
        return ChoiceParser(reasoning, tools, None if self.parallel_tool_calls else 1,
                            self.include_reasoning, named=isinstance(self.tool_choice, dict))


@dataclass
class ChoiceParser:
    """Reasoning, content and tool calls of one choice, streamed (`feed`) or whole (`message`).

    Tool calls are parsed from the content only, never from the reasoning.
    """

    reasoning_parser: ReasoningParser | None
    tool_parser: ToolParser | None
    max_calls: int | None
    include_reasoning: bool
    named: bool = False  # a named tool choice ends with "stop", like OpenAI's
    _reasoning: ReasoningStreamer | None = field(init=False, default=None)
    _tools: ToolCallStreamer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None:
            self._reasoning = ReasoningStreamer(self.reasoning_parser)
        if self.tool_parser is not None:
            self._tools = ToolCallStreamer(self.tool_parser, self.max_calls)

    @property
    def tools_called(self) -> bool:
        return self._tools is not None and self._tools.tools_called

    def finish_reason(self, reason: str | None, tools_called: bool) -> str | None:
        """"tool_calls" for a reply that stopped after calling tools (auto and required)."""
        return "tool_calls" if reason == "stop" and tools_called and not self.named else reason

    def feed(self, delta: str, final: bool) -> api.DeltaMessage:
        """The chunk delta for `delta` more output (`final` on the last one)."""
        reasoning, content = "", delta
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(delta, final)
        calls: list[api.DeltaToolCall] = []
        if self._tools is not None:
            content, calls = self._tools.feed(content, final)
        reasoning = reasoning if self.include_reasoning and reasoning else None
        return api.DeltaMessage(content=content or None, reasoning=reasoning,
                                reasoning_content=reasoning, tool_calls=calls or None)

    def message(self, text: str) -> tuple[api.ChatResponseMessage, bool]:
        """The whole reply as a message, and whether it called tools."""
        reasoning, content = None, text
        if self.reasoning_parser is not None:
            parsed = self.reasoning_parser.parse(text, final=True)
            reasoning, content = parsed.reasoning, parsed.content
        tool_calls: list[api.ToolCall] = []
        if self.tool_parser is not None:
            extracted = extract_tool_calls(self.tool_parser, content, self.max_calls)
            content, tool_calls = extracted.content or "", extracted.tool_calls
        reasoning = reasoning if self.include_reasoning else None
        return api.ChatResponseMessage(
            content=content or (None if tool_calls or reasoning else content),
            reasoning=reasoning, reasoning_content=reasoning,
            tool_calls=tool_calls), bool(tool_calls)


def _call_with_object_args(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call whose JSON-text arguments are parsed (templates `tojson` them back)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        args = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(args, dict):
        return call
    return {**call, "function": {**function, "arguments": args}}

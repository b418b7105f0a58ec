"""Reasoning outputs: the `ReasoningParser` plug point, its registry, and think-tag parsers.

A reasoning model writes its thoughts first, between tags, then the answer:

    [<think>] step by step ... </think> the answer      ->  reasoning="step by step ...",
                                                            content="the answer"

A parser is built per request from the rendered prompt and `chat_template_kwargs`, because
whether the reply starts inside a thought depends on both: templates that open `<think>` in the
prompt (DeepSeek-R1, Qwen3 thinking models) leave it out of the reply, and `enable_thinking: false`
(or `thinking: false`) turns reasoning off. Its `parse(text, final)` follows the stability rule
of `frontend/tools.py`: with `final=False` the reasoning and the content are prefixes of what the
complete text gives, so `ReasoningStreamer` can send just the new characters.

Tool calls and structured outputs apply to the content only: the server hands the content to the
tool parser, and puts `end_tag`'s token ids into `StructuredOutputsParams.reasoning_end_token_ids`
so the grammar starts after the thought.

Built-ins (`--reasoning-parser`): deepseek_r1 (the reply is a thought until `</think>`, whose
opening tag is optional), qwen3 and think (a thought only when the reply opens `<think>` or the
prompt left one open).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from frontend.registry import Registry
from frontend.tool_formats import hold_back

__all__ = ["ReasoningParse", "ReasoningParser", "ReasoningStreamer", "REASONING_PARSERS",
           "register_reasoning_parser", "get_reasoning_parser", "thinking_enabled"]


@dataclass
class ReasoningParse:
    reasoning: str | None  # None: the reply has no thought at all
    content: str


class ReasoningParser(Protocol):
    """Splits a reply into reasoning and content; built per request."""

    end_tag: str  # the text that ends a thought (its token ids gate structured outputs)

    @property
    def enabled(self) -> bool:
        """Whether this request reasons at all (False: everything is content)."""
        ...

    def parse(self, text: str, final: bool) -> ReasoningParse:
        """Reasoning and content of `text`; with final=False both are stable prefixes."""
        ...


# Built from (rendered prompt text, chat_template_kwargs).
ReasoningParserFactory = Callable[[str, dict[str, Any]], ReasoningParser]
REASONING_PARSERS: Registry[ReasoningParserFactory] = Registry("reasoning_parser")
# Class decorator: make a parser available as --reasoning-parser NAME.
register_reasoning_parser = REASONING_PARSERS.register
get_reasoning_parser = REASONING_PARSERS.get_factory


def thinking_enabled(template_kwargs: dict[str, Any]) -> bool:
    """False when `chat_template_kwargs` turns thinking off (`enable_thinking` or `thinking`)."""
    return all(template_kwargs.get(k, True) is not False for k in ("enable_thinking", "thinking"))


@register_reasoning_parser("think")
@register_reasoning_parser("qwen3")
class ThinkTagReasoningParser:
    """A thought is `<think>...</think>` opening the reply, or the rest of one the prompt
    opened; a reply without either is all content."""

    start_tag = "<think>"
    end_tag = "</think>"
    # Whether a reply starts inside a thought even when neither it nor the prompt opens one.
    starts_in_thought = False

    def __init__(self, prompt: str, template_kwargs: dict[str, Any]):
        # A prompt that ends with a closed (empty) thought is a template's way to turn it off.
        self._enabled = thinking_enabled(template_kwargs) and \
            not prompt.rstrip().endswith(self.end_tag)
        self._open_in_prompt = prompt.rfind(self.start_tag) > prompt.rfind(self.end_tag)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def parse(self, text: str, final: bool) -> ReasoningParse:
        if not self._enabled:
            return ReasoningParse(None, text)
        start = len(text) - len(text.lstrip())
        thinking = self.starts_in_thought or self._open_in_prompt
        if text.startswith(self.start_tag, start):
            thinking, start = True, start + len(self.start_tag)
        elif not final and self.start_tag.startswith(text[start:]):
            return ReasoningParse(None, "")  # maybe the opening tag: wait
        if not thinking:
            return ReasoningParse(None, text)
        end = text.find(self.end_tag, start)
        if end < 0:  # still thinking (or cut off while thinking)
            stop = len(text) if final else len(text) - hold_back(text, self.end_tag)
            return ReasoningParse(text[start:stop], "")
        return ReasoningParse(text[start:end], text[end + len(self.end_tag):].lstrip())


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ThinkTagReasoningParser):
    """DeepSeek-R1 (and QwQ): the reply is a thought until `</think>`; the template usually
    puts `<think>` in the prompt, and the model may or may not repeat it."""

    starts_in_thought = True


@dataclass
class ReasoningStreamer:
    """One choice's stream: feed output text as it grows, get (new reasoning, new content)."""

    parser: ReasoningParser
    text: str = ""
    reasoning_sent: str = ""
    content_sent: str = ""
    answering: bool = False  # past the thought: every later delta is content as-is

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Add `delta`; return the reasoning and content characters that are new."""
        if self.answering:
            self.content_sent += delta
            return "", delta
        self.text += delta
        parsed = self.parser.parse(self.text, final)
        reasoning = _new_part(parsed.reasoning or "", self.reasoning_sent)
        content = _new_part(parsed.content, self.content_sent)
        self.reasoning_sent += reasoning
        self.content_sent += content
        # Once content has started (after a closed thought, or with none), it is content to the
        # end: later deltas skip the re-parse.
        self.answering = bool(self.content_sent)
        return reasoning, content


def _new_part(full: str, sent: str) -> str:
    return full[len(sent):] if full.startswith(sent) else ""

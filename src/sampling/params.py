"""`SamplingParams`: how one request turns logits into tokens.

A msgspec Struct so it crosses every process boundary as-is (frontend -> engine core -> workers).
Leaf module: imports nothing of ours and no torch. Field names follow vLLM's `SamplingParams`.
"""

from __future__ import annotations

from typing import Any

import msgspec

_SAMPLING_EPS = 1e-5


class StructuredOutputsParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A constraint on the output (vLLM's `StructuredOutputsParams`); exactly one kind is set."""

    json: str | dict | None = None  # a JSON schema (object or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark / EBNF as llguidance accepts
    json_object: bool | None = None  # any JSON object
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    # Filled by the frontend when a reasoning parser is on: the constraint starts after the
    # model emits this token sequence (the end of its reasoning).
    reasoning_end_token_ids: list[int] | None = None

    def kinds(self) -> list[str]:
        """Names of the constraint kinds that are set."""
        return [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                if getattr(self, k) not in (None, False)]


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Per-request sampling settings; `validate()` raises ValueError naming the bad field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per sampled token (plus the sampled one)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Filled by the frontend from `bad_words` (each word as a token sequence); workers read this.
    bad_words_token_ids: list[list[int]] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    extra_args: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Accept the OpenAI habit of a single stop string / None.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first invalid field."""
        _check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(self.temperature >= 0.0, "temperature",
               f"must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be -1 (disable) or positive, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty",
               f"must be in (0, 2], got {self.repetition_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, f"must be non-negative, got {value}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be a list of non-empty strings")
        if self.structured_outputs is not None:
            kinds = self.structured_outputs.kinds()
            _check(len(kinds) == 1, "structured_outputs",
                   f"must set exactly one of json, regex, choice, grammar, json_object, "
                   f"structural_tag; got {kinds or 'none'}")
        if vocab_size is not None:
            self._validate_token_ids(vocab_size)

    def _validate_token_ids(self, vocab_size: int) -> None:
        def in_vocab(ids: list[int]) -> bool:
            return all(0 <= t < vocab_size for t in ids)

        _check(in_vocab(self.stop_token_ids), "stop_token_ids", f"ids must be in [0, {vocab_size})")
        if self.logit_bias is not None:
            _check(in_vocab(list(self.logit_bias)), "logit_bias",
                   f"token ids must be in [0, {vocab_size})")
        if self.allowed_token_ids is not None:
            _check(bool(self.allowed_token_ids) and in_vocab(self.allowed_token_ids),
                   "allowed_token_ids", f"must be a non-empty list of ids in [0, {vocab_size})")
        for max_k in (self.logprobs, self.prompt_logprobs):
            _check(max_k is None or max_k <= vocab_size, "logprobs",
                   f"must be <= vocab size {vocab_size}")


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} {message}")

"""Structured outputs with llguidance: grammars from `StructuredOutputsParams`, and matchers.

Torch-free, so every process may use it: the frontend validates a request's constraint early
(`validate_structured_outputs` -> ValueError carrying llguidance's message, answered as a 400),
and the workers keep one `RequestGrammar` per constrained request (see docs/structured_outputs.md
for why matchers live in the workers):

    StructuredOutputsParams --build_grammar--> llguidance grammar text (JSON)
        --GrammarCompiler.compile (thread pool, cached per grammar)--> RequestGrammar
    each step:  fill_bitmasks(grammars, bitmask)   int32 [N, ceil(V/32)], bit t of row i = 1:
                                                   token t allowed for request i
                sampler applies the bitmask, samples
                RequestGrammar.accept_tokens([token])

llguidance drops the GIL while it compiles a grammar and while it fills masks, so compiling in a
thread pool and filling on the CPU while the GPU runs the forward pass both overlap real work.
A grammar that is complete allows only the EOS tokens next (the tokenizer is built with the
model's EOS ids), so the request ends through the scheduler's ordinary EOS check.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llguidance
import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from sampling.params import StructuredOutputsParams

logger = logging.getLogger("sampling.structured")

# Backends a config may name; vLLM's others are refused with a clear error (config.py checks).
SUPPORTED_BACKENDS = ("auto", "guidance")
_CACHE_SIZE = 256  # compiled grammars kept per compiler (LRU)
_ALL_ALLOWED = -1  # an int32 word with every bit set


# ------------------------------------------------------------------ grammar text


def build_grammar(params: StructuredOutputsParams) -> str:
    """The llguidance grammar for the one constraint kind `params` sets; ValueError if bad."""
    kinds = params.kinds()
    if len(kinds) != 1:
        raise ValueError("structured_outputs: must set exactly one of json, regex, choice, "
                         f"grammar, json_object, structural_tag; got {kinds or 'none'}")
    kind = kinds[0]
    if kind == "json":
        return _json_grammar(params, _load_json(params.json, "json"))
    if kind == "json_object":
        return _json_grammar(params, {"type": "object"})
    if kind == "regex":
        return LLMatcher.grammar_from_regex(params.regex or "")
    if kind == "choice":
        choices = params.choice or []
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("structured_outputs: choice must be a non-empty list of strings")
        return llguidance.grammar_from("choice", json.dumps(choices))
    if kind == "grammar":
        try:  # Lark as is; GBNF (`::=` rules) is converted to Lark by llguidance
            return llguidance.grammar_from("grammar", params.grammar or "")
        except ValueError as e:
            raise ValueError(f"structured_outputs: invalid grammar: {e}") from None
    return _structural_tag_grammar(params)


def _load_json(value: str | dict | None, field: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"structured_outputs: {field} is not valid JSON: {e}") from None


def _json_grammar(params: StructuredOutputsParams, schema: Any) -> str:
    if not isinstance(schema, dict | bool):
        raise ValueError("structured_outputs: json must be a JSON schema object")
    if params.disable_additional_properties and isinstance(schema, dict):
        schema = _no_additional_properties(schema)
    options: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
    if params.whitespace_pattern is not None:
        options["whitespace_pattern"] = params.whitespace_pattern
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except ValueError as e:
        raise ValueError(f"structured_outputs: invalid json: {e}") from None


def _no_additional_properties(schema: Any) -> Any:
    """A copy of `schema` where every object schema that does not say otherwise is closed."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _structural_tag_grammar(params: StructuredOutputsParams) -> str:
    """vLLM's structural tag: {"structures": [{begin, schema, end}], "triggers": [...]}."""
    spec = _load_json(params.structural_tag, "structural_tag")
    try:
        triggers = list(spec["triggers"])
        tags = []
        for s in spec["structures"]:
            trigger = next(t for t in triggers if s["begin"].startswith(t))
            tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"],
                                             grammar=s.get("schema", {}), end=s.get("end", "")))
        return llguidance.StructTag.to_grammar(tags)
    except (KeyError, TypeError, StopIteration, AssertionError) as e:
        raise ValueError("structured_outputs: structural_tag must be {\"structures\": [{\"begin\","
                         " \"schema\", \"end\"}], \"triggers\": [...]} with every begin starting "
                         f"with a trigger ({type(e).__name__}: {e})") from None


def validate_structured_outputs(params: StructuredOutputsParams,
                                tokenizer: LLTokenizer | None = None) -> None:
    """Raise ValueError with llguidance's message when the constraint cannot be compiled."""
    grammar = build_grammar(params)
    error = LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise ValueError(f"structured_outputs: invalid {params.kinds()[0]}: {error}")


# ------------------------------------------------------------------ tokenizer


@functools.cache
def load_lltokenizer(tokenizer_json: str, vocab_size: int,
                     eos_token_ids: tuple[int, ...]) -> LLTokenizer:
    """llguidance's tokenizer from a tokenizer.json text (cached: ~0.3 s at a 32k vocab).

    `vocab_size` is the model's (it may pad past the tokenizer's: those ids are never allowed);
    `eos_token_ids` are the ids a complete grammar allows (empty: the tokenizer's own EOS).
    """
    return LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                       eos_token=list(eos_token_ids) or None)


def tokenizer_json_of(model_dir: str) -> str:
    """The tokenizer.json text of a checkpoint directory (added tokens included)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).to_str()


# ------------------------------------------------------------------ matchers


class RequestGrammar:
    """One request's matcher: accept/validate/rollback tokens, fill its bitmask row.

    Created around a compile future; tokens accepted before compilation ends are kept and
    replayed, so only filling a mask (the request is about to sample) waits for the compile.
    With `reasoning_end_token_ids` the constraint starts after that sequence appears in the
    output (or right away when the prompt ends with it: reasoning turned off by the template);
    earlier tokens are unconstrained and never reach the matcher.
    """

    def __init__(self, compiled: Future[LLMatcher], reasoning_end: Sequence[int] | None = None,
                 output_token_ids: Sequence[int] = (),
                 prompt_token_ids: Sequence[int] = ()) -> None:
        self._compiled = compiled
        self._matcher: LLMatcher | None = None
        self._pending: list[int] = []
        self._reasoning_end = list(reasoning_end or [])
        end = self._reasoning_end
        self._active = not end or list(prompt_token_ids[len(prompt_token_ids) - len(end):]) == end
        self._recent: collections.deque[int] = collections.deque(maxlen=len(self._reasoning_end))
        self._num_accepted = 0  # tokens given to the matcher (for rollback bookkeeping)
        self._deferred: list[int] = []  # sampled, not yet consumed (`defer_tokens`)
        self._error_logged = False
        self.accept_tokens(output_token_ids)

    @property
    def matcher(self) -> LLMatcher:
        """The compiled matcher (waits for the compile), with pending tokens replayed."""
        if self._matcher is None:
            self._matcher = self._compiled.result()
            for token in self._pending:
                self._matcher.consume_token(token)
            self._pending = []
        return self._matcher

    @property
    def is_active(self) -> bool:
        """False while the output is still reasoning (before the reasoning end sequence)."""
        self._flush()
        return self._active

    def defer_tokens(self, token_ids: Sequence[int]) -> None:
        """Queue sampled tokens; they are consumed on the matcher's next use (mask, validate,
        rollback, accept), so the caller pays nothing now."""
        self._deferred.extend(token_ids)

    def _flush(self) -> None:
        if self._deferred:
            tokens, self._deferred = self._deferred, []
            self.accept_tokens(tokens)

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance past sampled tokens; False if the grammar rejected one (matcher errored)."""
        self._flush()
        for i, token in enumerate(token_ids):
            if not self._active:
                self._recent.append(token)
                self._active = list(self._recent) == self._reasoning_end
                continue
            rest = list(token_ids[i:])
            self._num_accepted += len(rest)
            if self._matcher is None:
                self._pending.extend(rest)
                return True
            # One by one: consume_tokens refuses EOS once the grammar is complete; consume_token
            # takes it (async scheduling samples EOS again before the core sees the first).
            ok = all(self._matcher.consume_token(t) for t in rest)
            if not ok and not self._error_logged:
                self._error_logged = True
                logger.warning("grammar rejected a token: %s", self._matcher.get_error())
            return ok
        return True

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of `token_ids` the grammar would accept (nothing changes)."""
        self._flush()
        if not self._active:
            return len(token_ids)
        return self.matcher.validate_tokens(list(token_ids))

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        self._flush()
        num_tokens = min(num_tokens, self._num_accepted)
        self._num_accepted -= num_tokens
        if self._matcher is None:
            del self._pending[len(self._pending) - num_tokens:]
        elif num_tokens:
            self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        """True once the grammar is complete (only EOS may follow) or has failed."""
        self._flush()
        return self._active and self.matcher.is_stopped()

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 words)."""
        self._flush()
        if not self._active:
            bitmask[row] = _ALL_ALLOWED
            return
        out = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)


def fill_bitmasks(grammars: Sequence[RequestGrammar], bitmask: np.ndarray) -> None:
    """Fill row i of `bitmask` (int32, C-contiguous, >= len(grammars) rows) for grammars[i].

    Active grammars are filled in parallel by llguidance's thread pool (no GIL).
    """
    assert bitmask.dtype == np.int32 and bitmask.ndim == 2 and bitmask.flags["C_CONTIGUOUS"]
    assert bitmask.shape[0] >= len(grammars), (bitmask.shape, len(grammars))
    work = []
    for row, grammar in enumerate(grammars):
        if grammar.is_active:
            work.append((grammar.matcher, row))
        else:
            bitmask[row] = _ALL_ALLOWED
    if len(work) == 1:
        grammars[work[0][1]].fill_bitmask(bitmask, work[0][1])
    elif work:
        _executor().unsafe_compute_mask_ptr(work, bitmask.ctypes.data, bitmask.shape[1] * 4,
                                            bitmask.shape[0])


@functools.cache
def _executor() -> LLExecutor:
    return LLExecutor()


class GrammarCompiler:
    """Compiles grammars for one tokenizer in a thread pool; compiled grammars are cached.

    The LLTokenizer is built on first use, so engines that never see a constraint pay nothing.
    A cached grammar is deep-copied for each request (copying skips the compile).
    """

    def __init__(self, tokenizer_dir: str, vocab_size: int, eos_token_ids: Sequence[int],
                 max_workers: int = 2) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._pool: ThreadPoolExecutor | None = None
        self._max_workers = max_workers
        self._cache: collections.OrderedDict[str, Future[LLMatcher]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @functools.cached_property
    def tokenizer(self) -> LLTokenizer:
        return load_lltokenizer(tokenizer_json_of(self.tokenizer_dir), self.vocab_size,
                                self.eos_token_ids)

    def compile(self, params: StructuredOutputsParams, output_token_ids: Sequence[int] = (),
                prompt_token_ids: Sequence[int] = ()) -> RequestGrammar:
        """Start compiling (or reuse) the grammar; `output_token_ids` were already generated."""
        compiled = self._compiled(build_grammar(params))
        copied: Future[LLMatcher] = Future()
        compiled.add_done_callback(lambda f: _copy_into(f, copied))
        return RequestGrammar(copied, params.reasoning_end_token_ids, output_token_ids,
                              prompt_token_ids)

    def _compiled(self, grammar: str) -> Future[LLMatcher]:
        with self._lock:
            future = self._cache.get(grammar)
            if future is not None:
                self._cache.move_to_end(grammar)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_workers, "grammar-compile")
            future = self._pool.submit(self._compile, grammar)
            self._cache[grammar] = future
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, grammar: str) -> LLMatcher:
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():  # the frontend validates first; reaching here is a direct caller
            logger.warning("grammar failed to compile: %s", matcher.get_error())
        return matcher

    def shutdown(self) -> None:
        """Stop the compile threads (pending compiles still finish)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _copy_into(source: Future[LLMatcher], target: Future[LLMatcher]) -> None:
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result().deep_copy())

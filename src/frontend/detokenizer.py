"""`IncrementalDetokenizer`: generated token ids -> streamed text deltas, with stop strings.

Decoding uses `tokenizers.decoders.DecodeStream`, primed with the tail of the prompt so the first
generated token decodes in context (a SentencePiece "▁word" continues the prompt as " word"). The
stream yields nothing while a multi-byte character is still incomplete, so no delta ever holds half
a character.

Stop strings. `_text` is everything decoded so far; `_emitted` chars of it have been released:

    _text: | released ............ | held back (could start a stop) |
           0                 _emitted                         len(_text)

After each token, the newly decoded chars (plus len(stop) - 1 chars before them) are searched for
every stop string; the earliest match ends the request, `_text` is cut before it (after it with
`include_stop_str_in_output`) and later tokens are ignored. Without a match, only the longest
suffix of `_text` that is a proper prefix of some stop string is held back.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from frontend.tokenizer import Tokenizer
from sampling.params import SamplingParams

# Prime the stream with 4..24 prompt tokens: the shortest tail that decodes to whole characters.
_MIN_CONTEXT, _MAX_CONTEXT = 4, 24
# Tokens decoded together with undecodable pending ids at flush(), for context.
_FLUSH_CONTEXT = 6
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas; stops at the earliest stop string."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []  # consumed tokens (none after a stop string)
        self.stop_string: str | None = None
        self._text = ""  # decoded so far; cut at the stop string once one matched
        self._emitted = 0
        self._finished = False
        self._stops = list(params.stop) if params.detokenize else []
        self._skip_special = params.skip_special_tokens
        self._context = _clean_tail(tokenizer, prompt_token_ids)
        self._stream = DecodeStream(ids=self._context, skip_special_tokens=self._skip_special)
        self._pending_from = 0  # token_ids[_pending_from:] have not produced text yet

    @property
    def output_text(self) -> str:
        """Text so far, held-back chars included; cut at the stop string once one matched."""
        return self._text

    @property
    def finished(self) -> bool:
        return self._finished

    def update(self, new_token_ids: list[int]) -> str:
        """Consume new tokens; return the text that can be released now."""
        if self._finished:
            return ""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            if not self.params.detokenize:
                continue
            piece = self._step(token_id)
            if piece is None:
                continue
            self._pending_from = len(self.token_ids)
            if self._append(piece):
                break
        return self._release()

    def flush(self) -> str:
        """Release the held-back text: the request finished for another reason than a stop."""
        if self._finished:
            return ""
        if self.params.detokenize and self._pending_from < len(self.token_ids):
            # The last tokens end mid-character: emit what a full decode would (U+FFFD).
            self._append(self._decode_pending())
        self._finished = True
        return self._release()

    # ------------------------------------------------------------------ internals

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self.tokenizer.backend, token_id)
        except Exception as e:
            # Some tokenizers decode a prefix differently once more tokens follow, which breaks
            # DecodeStream's bookkeeping. Restart it without context (which cannot mismatch) from
            # the first token that has not produced text yet.
            if "Invalid prefix" not in str(e):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special)
            return self._stream.step(self.tokenizer.backend, self.token_ids[self._pending_from:])

    def _append(self, piece: str) -> bool:
        """Add decoded text; on a stop string cut `text`, finish and return True."""
        start = len(self._text)
        self._text += piece
        if not self._stops or len(self.token_ids) <= self.params.min_tokens:
            return False
        hit = _find_earliest_stop(self._text, start, self._stops)
        if hit is None:
            return False
        at, stop = hit
        self.stop_string = stop
        self._text = self._text[: at + len(stop) if self.params.include_stop_str_in_output else at]
        self._finished = True
        return True

    def _release(self) -> str:
        end = len(self._text)
        if not self._finished and self._stops:
            end -= _held_back(self._text, self._stops)
        # Holding back means a stop never starts inside released text, so end >= _emitted.
        delta = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _decode_pending(self) -> str:
        ctx_start = max(0, self._pending_from - _FLUSH_CONTEXT)
        context = self.token_ids[ctx_start:self._pending_from]
        if not context:
            context = self._context[-_FLUSH_CONTEXT:]
        pending = self.token_ids[self._pending_from:]
        prefix = self.tokenizer.decode(context, skip_special_tokens=self._skip_special)
        full = self.tokenizer.decode(context + pending, skip_special_tokens=self._skip_special)
        return full[len(prefix):] if full.startswith(prefix) else full


def _clean_tail(tokenizer: Tokenizer, token_ids: list[int]) -> list[int]:
    """The shortest tail of `token_ids` (4 tokens or more when there are) that decodes to whole
    characters; empty when none does, since a stream primed mid-character re-emits its context."""
    shortest = min(_MIN_CONTEXT, len(token_ids))
    for n in range(shortest, min(len(token_ids), _MAX_CONTEXT) + 1):
        tail = token_ids[len(token_ids) - n:]
        if _REPLACEMENT_CHAR not in tokenizer.decode(tail, skip_special_tokens=False):
            return tail
    return []


def _find_earliest_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest (position, stop) among matches that end inside text[new_from:]."""
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `_text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest

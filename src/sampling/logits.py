"""Built-in logits processors over a batch of rows, built once per step.

Each processor reads the step's `SamplingParams` (plus prompt/output token lists where it needs
them) and turns them into a few small index tensors on the logits' device; `apply` then edits the
`[N, V]` logits in place with a handful of vectorized ops. Python loops run over rows and their
sparse settings (bias entries, bad words), never over the vocabulary.

Order inside `LogitsProcessors.apply` (the sampler's pipeline, see `sampler.py`):
allowed_token_ids -> bad words -> min_tokens -> logit_bias -> penalties.

Rows a processor does not touch are left bit-identical, so a greedy row without settings still
picks exactly `logits.argmax(-1)`.

Dimension legend:
    N  rows in the batch (one per sampling request)
    V  vocabulary size (logits width)
    M  rows a given processor touches (a subset of N)
    T  flat (row, token) pairs, e.g. every output token of every penalised row
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from sampling.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    ProcessorContext,
    update_sparse_state,
)
from sampling.params import SamplingParams

if TYPE_CHECKING:
    from sampling.batch_logits import BatchLogits


def to_device(data: Sequence | np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host list/array -> device tensor, copied without stalling the host on CUDA."""
    t = torch.as_tensor(data, dtype=dtype)
    if device.type == "cpu":
        return t
    # Pinned + non_blocking: the copy is queued on the stream instead of waiting for the forward.
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class TokenBans:
    """(row, token) pairs whose logits become -inf."""

    rows: Tensor  # [T] int64
    token_ids: Tensor  # [T] int64

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]], device: torch.device) -> TokenBans | None:
        """Build from host (row, token) pairs; None when there are none."""
        if not pairs:
            return None
        flat = to_device(pairs, torch.int64, device)  # [T, 2]
        return cls(flat[:, 0], flat[:, 1])

    def apply(self, logits: Tensor) -> None:
        """Set the banned entries of `logits` [N, V] to -inf in place."""
        logits.index_put_(
            (self.rows, self.token_ids), _scalar(-torch.inf, logits.dtype, logits.device)
        )


@dataclass
class AllowedTokens:
    """allowed_token_ids: rows that restrict sampling to a whitelist."""

    rows: Tensor  # [M] int64
    banned: Tensor  # [M, V] bool, True outside the row's whitelist

    @classmethod
    def build(
        cls, params: list[SamplingParams], vocab_size: int, device: torch.device
    ) -> AllowedTokens | None:
        """Whitelist masks for rows with allowed_token_ids; None when no row has one."""
        rows = [i for i, p in enumerate(params) if p.allowed_token_ids]
        if not rows:
            return None
        allowed_rows, allowed_ids = _flatten(
            [params[i].allowed_token_ids or [] for i in rows], device
        )
        banned = torch.ones(len(rows), vocab_size, dtype=torch.bool, device=device)
        banned.index_put_((allowed_rows, allowed_ids), _scalar(False, torch.bool, device))
        return cls(to_device(rows, torch.int64, device), banned)

    def apply(self, logits: Tensor) -> None:
        """Set every non-whitelisted logit of the touched rows to -inf in place."""
        logits[self.rows] = logits[self.rows].masked_fill(self.banned, float("-inf"))


def bad_words_bans(
    params: list[SamplingParams], output_token_ids: list[list[int]], device: torch.device
) -> TokenBans | None:
    """Ban the last token of every bad word whose other tokens end the output so far."""
    pairs = []
    for i, p in enumerate(params):
        output = output_token_ids[i]
        for word in p.bad_words_token_ids or ():
            prefix_len = len(word) - 1
            # A one-token word has an empty prefix, which every output ends with.
            if prefix_len <= len(output) and output[len(output) - prefix_len :] == word[:-1]:
                pairs.append((i, word[-1]))
    return TokenBans.from_pairs(pairs, device)


def min_tokens_bans(
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    eos_token_ids: list[int],
    device: torch.device,
) -> TokenBans | None:
    """Ban stop ids (and EOS unless ignore_eos) while a row has fewer than min_tokens outputs."""
    pairs = []
    for i, p in enumerate(params):
        if len(output_token_ids[i]) >= p.min_tokens:
            continue
        # With ignore_eos, EOS is an ordinary token (it cannot end the request), so leave it be.
        stops = p.stop_token_ids if p.ignore_eos else [*eos_token_ids, *p.stop_token_ids]
        pairs.extend((i, t) for t in stops)
    return TokenBans.from_pairs(pairs, device)


@dataclass
class LogitBias:
    """logit_bias: additive per-(row, token) offsets."""

    rows: Tensor  # [T] int64
    token_ids: Tensor  # [T] int64
    values: Tensor  # [T] float32

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> LogitBias | None:
        """Flatten every row's bias dict; None when no row has one."""
        rows, token_ids, values = [], [], []
        for i, p in enumerate(params):
            for t, bias in (p.logit_bias or {}).items():
                rows.append(i)
                token_ids.append(int(t))  # JSON object keys may arrive as strings
                values.append(bias)
        if not rows:
            return None
        return cls(
            to_device(rows, torch.int64, device),
            to_device(token_ids, torch.int64, device),
            to_device(values, torch.float32, device),
        )

    def apply(self, logits: Tensor) -> None:
        """Add the biases to `logits` [N, V] in place."""
        logits.index_put_((self.rows, self.token_ids), self.values, accumulate=True)


@dataclass
class Penalties:
    """repetition (prompt + output), frequency and presence (output only) penalties."""

    rows: Tensor  # [M] int64
    repetition: Tensor  # [M, 1] float32; 1.0 = off
    frequency: Tensor  # [M, 1] float32; 0.0 = off
    presence: Tensor  # [M, 1] float32; 0.0 = off
    seen: Tensor  # [M, V] bool: token occurs in the prompt or the output
    output_counts: Tensor  # [M, V] float32: occurrences in the output

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device,
    ) -> Penalties | None:
        """Token statistics for the rows with any penalty set; None when no row has one."""
        rows = [i for i, p in enumerate(params) if _has_penalty(p)]
        if not rows:
            return None
        m = len(rows)
        out_rows, out_ids = _flatten([output_token_ids[i] for i in rows], device)
        counts = torch.zeros(m, vocab_size, dtype=torch.float32, device=device)
        counts.index_put_(
            (out_rows, out_ids), torch.ones_like(out_ids, dtype=torch.float32), accumulate=True
        )
        seen = counts > 0
        prompt_rows, prompt_ids = _flatten([prompt_token_ids[i] for i in rows], device)
        seen.index_put_((prompt_rows, prompt_ids), _scalar(True, torch.bool, device))

        def column(name: str) -> Tensor:
            values = [getattr(params[i], name) for i in rows]
            return to_device(values, torch.float32, device)[:, None]

        return cls(
            rows=to_device(rows, torch.int64, device),
            repetition=column("repetition_penalty"),
            frequency=column("frequency_penalty"),
            presence=column("presence_penalty"),
            seen=seen,
            output_counts=counts,
        )

    def apply(self, logits: Tensor) -> None:
        """Penalise the touched rows of `logits` [N, V] in place."""
        x = logits[self.rows]  # [M, V] copy
        # HF/vLLM repetition penalty: shrink positive logits, push negative ones further down.
        penalised = torch.where(x > 0, x / self.repetition, x * self.repetition)
        x = torch.where(self.seen, penalised, x)
        # OpenAI: logit -= frequency * count + presence * [count > 0].
        x -= self.frequency * self.output_counts + self.presence * (self.output_counts > 0)
        logits[self.rows] = x


def _scalar(value: float | bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Made on the device by a fill kernel: `t[idx] = python_scalar` would copy it from the host.
    return torch.full((), value, dtype=dtype, device=device)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _flatten(token_lists: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Ragged token lists -> flat (row [T], token [T]) index tensors."""
    lengths = [len(ids) for ids in token_lists]
    rows = torch.repeat_interleave(  # output_size given: no device->host sync on CUDA
        torch.arange(len(token_lists), device=device),
        to_device(lengths, torch.int64, device),
        output_size=sum(lengths),
    )
    # np.fromiter is ~4x faster than torch.tensor(list) on long prompts (host time per step).
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), np.int64, count=sum(lengths))
    ids = to_device(flat, torch.int64, device)
    return rows, ids


class _SparseRowsProcessor(LogitsProcessor):
    """A built-in that keeps one value per batch row whose params use it (`_row_value`), in
    `_rows` {batch index: value}; `_rows_changed` drops whatever the subclass derived from them."""

    def __init__(self, config: ProcessorContext, device: torch.device,
                 is_pin_memory: bool) -> None:
        super().__init__(config, device, is_pin_memory)
        self._rows: dict[int, Any] = {}

    @property
    def in_use(self) -> bool:
        """Whether any row uses it (BatchLogits skips idle built-ins)."""
        return bool(self._rows)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Track the rows whose `_row_value` is not None."""
        if update_sparse_state(self._rows, batch_update, self._row_value):
            self._rows_changed()

    def _row_value(self, params: SamplingParams, prompt: list[int], output: list[int]) -> Any:
        raise NotImplementedError

    def _rows_changed(self) -> None:
        pass


class MinTokensLogitsProcessor(_SparseRowsProcessor):
    """min_tokens on the batch-level interface: ban stop ids (and EOS unless ignore_eos) while a
    row has fewer than min_tokens outputs. Row value: (min_tokens, stop ids, live output list)."""

    def is_argmax_invariant(self) -> bool:
        """Bans can remove the argmax."""
        return False

    def _row_value(self, p: SamplingParams, _prompt: list[int], output: list[int]):
        if p.min_tokens <= 0:
            return None
        # With ignore_eos, EOS is an ordinary token (it cannot end the request).
        eos = self.config.eos_token_ids
        stops = list(p.stop_token_ids) if p.ignore_eos else [*eos, *p.stop_token_ids]
        return (p.min_tokens, stops, output) if stops else None

    def apply(self, logits: Tensor) -> Tensor:
        """-inf on the stop ids of rows still short of min_tokens."""
        pairs = [(i, t) for i, (least, stops, output) in self._rows.items()
                 if len(output) < least for t in stops]
        bans = TokenBans.from_pairs(pairs, logits.device)
        if bans is not None:
            bans.apply(logits)
        return logits


class LogitBiasLogitsProcessor(_SparseRowsProcessor):
    """logit_bias on the batch-level interface: additive per-(row, token) offsets."""

    def __init__(self, config: ProcessorContext, device: torch.device,
                 is_pin_memory: bool) -> None:
        super().__init__(config, device, is_pin_memory)
        self._bias: LogitBias | None = None  # rebuilt only when the rows change

    def is_argmax_invariant(self) -> bool:
        """Biases can change the argmax."""
        return False

    def _row_value(self, p: SamplingParams, _prompt: list[int], _output: list[int]):
        return p.logit_bias or None

    def _rows_changed(self) -> None:
        self._bias = None

    def apply(self, logits: Tensor) -> Tensor:
        """Add every tracked row's biases."""
        if not self._rows:
            return logits
        if self._bias is None or self._bias.rows.device != logits.device:
            order = sorted(self._rows)  # row order as the per-step builder had it
            self._bias = LogitBias.build(
                [SamplingParams(logit_bias=self._rows[i]) for i in order], logits.device)
            assert self._bias is not None
            self._bias.rows = to_device(order, torch.int64, logits.device)[self._bias.rows]
        self._bias.apply(logits)
        return logits


class MinPLogitsProcessor(_SparseRowsProcessor):
    """min_p on the batch-level interface: -inf below min_p times the row's top probability.

    Argmax-invariant, so the sampler runs it after temperature and top-k/top-p, on random rows.
    """

    def __init__(self, config: ProcessorContext, device: torch.device,
                 is_pin_memory: bool) -> None:
        super().__init__(config, device, is_pin_memory)
        self._min_p: Tensor | None = None  # [B] float32, rebuilt when the rows change

    def is_argmax_invariant(self) -> bool:
        """The top token always survives."""
        return True

    def _row_value(self, p: SamplingParams, _prompt: list[int], _output: list[int]):
        # Greedy rows never sample, so they are left out.
        return p.min_p if p.min_p and not p.greedy else None

    def _rows_changed(self) -> None:
        self._min_p = None

    def apply(self, logits: Tensor) -> Tensor:
        """Mask the low-probability tail of the tracked rows."""
        if not self._rows:
            return logits
        if self._min_p is None or self._min_p.shape[0] != logits.shape[0]:
            values = np.zeros(logits.shape[0], dtype=np.float32)
            values[list(self._rows)] = list(self._rows.values())
            self._min_p = to_device(values, torch.float32, logits.device)
        probs = logits.softmax(dim=-1)
        threshold = self._min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        return logits.masked_fill_(probs < threshold, float("-inf"))


BUILTIN_PROCESSORS: tuple[type[LogitsProcessor], ...] = (
    MinTokensLogitsProcessor, LogitBiasLogitsProcessor, MinPLogitsProcessor)


class LogitsProcessors:
    """The per-step built-ins (allowed ids, bad words, penalties) around the batch-level ones.

    `batch` applies the non-argmax-invariant batch-level processors (min_tokens, logit_bias,
    custom ones) between bad words and penalties. Without one (unit tests, one-off batches) the
    built-ins are created over these rows, as if they had just been added at indices 0..N-1.
    """

    def __init__(
        self,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: list[int],
        vocab_size: int,
        device: torch.device,
        batch: BatchLogits | None = None,
    ) -> None:
        self.allowed = AllowedTokens.build(params, vocab_size, device)
        self.bad_words = bad_words_bans(params, output_token_ids, device)
        if batch is None:
            from sampling.batch_logits import BatchLogits  # it imports this module's built-ins

            batch = BatchLogits.for_rows(params, prompt_token_ids, output_token_ids,
                                         eos_token_ids, vocab_size, device)
        self.batch = batch
        self.penalties = Penalties.build(
            params, prompt_token_ids, output_token_ids, vocab_size, device
        )

    def apply(self, logits: Tensor) -> None:
        """Run every active processor on `logits` [N, V] (float32) in place, in order."""
        for step in (self.allowed, self.bad_words):
            if step is not None:
                step.apply(logits)
        self.batch.apply(logits, argmax_invariant=False)
        if self.penalties is not None:
            self.penalties.apply(logits)

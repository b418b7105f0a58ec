"""`Sampler`: one step's logits -> one token per sampling request (plus optional logprobs).

The worker's ModelRunner builds a `SamplingBatch` each step (one row per request that samples)
and calls `Sampler(logits, batch)`. Everything is row-wise, so a row's result never depends on
which other rows share its batch (seeded rows are reproducible under any batch composition).

Dimension legend:
    N  rows (sampling requests) in the step
    V  vocabulary size
    K  the most logprobs any row asked for (SamplingParams.logprobs)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.gumbel import gumbel_sample
from kernels.sample import apply_token_bitmask, apply_token_bitmask_ref
from sampling.batch_logits import BatchLogits
from sampling.bitmask import GrammarBitmask
from sampling.logits import LogitsProcessors, to_device
from sampling.params import SamplingParams
from sampling.structured import RequestGrammar


@dataclass
class SamplingBatch:
    """Per-step sampling inputs, one row per request that samples this step."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]  # tokens generated so far (before this step's token)
    generators: list[torch.Generator | None]  # the row's own generator when params.seed is set
    # Structured outputs: the row's grammar matcher (None: unconstrained). None: no row is.
    grammars: list[RequestGrammar | None] | None = None
    # The runner's persistent batch-level processors, already told this step's rows
    # (`set_step_rows`). None: built-ins over these rows only (one-off batches, tests).
    logits_processors: BatchLogits | None = None


@dataclass
class SamplerOutput:
    """Sampled tokens and, when any row asked, their logprobs (raw, before any processing)."""

    sampled: Tensor  # [N] int64
    logprob_token_ids: Tensor | None = None  # [N, K+1] int64: sampled token, then the top-K ids
    logprobs: Tensor | None = None  # [N, K+1] float32, aligned with logprob_token_ids
    ranks: Tensor | None = None  # [N] int64, 1-based rank of the sampled token


class Sampler:
    """Batched sampler; the pipeline below runs in this order for every row.

    0. grammar bitmask rows are filled on the CPU (llguidance, no GIL) while the GPU still runs
       the step's forward (`sampling.bitmask`)
    1. raw logprobs = log_softmax(logits), kept for the logprobs output (vLLM "raw_logprobs")
    1b. grammar bitmask: -inf on the tokens a constrained row's grammar forbids
    2. allowed_token_ids: -inf outside the row's whitelist
    3. bad words: -inf on a word's last token when its other tokens end the output
    4. min_tokens: -inf on EOS (unless ignore_eos) and stop_token_ids until min_tokens outputs
    5. logit_bias: add the per-token offsets
    5b. custom batch-level processors that may change the argmax (`logits_processor.py`);
       4, 5 and 5b are `LogitsProcessor`s over the persistent batch (`batch_logits.py`)
    6. penalties: repetition (prompt + output), then frequency and presence (output)
    7. greedy rows (temperature ~ 0): argmax
    8. other rows: / temperature -> top-k -> top-p -> argmax-invariant processors (min-p,
       custom ones) -> sample as argmax(probs / E),
       E ~ Exp(1) per entry (the exponential race, equivalent to Gumbel-max; no host sync),
       drawn from the row's own generator when seeded, else from torch's default generator
    9. logprobs: the sampled token's raw logprob and rank, plus the top-K raw logprobs

    Fast path: all rows greedy and no processor active -> `logits.argmax(-1)`, bit-exact.
    `logits` (fp32) is used as scratch: steps 2-8 overwrite it in place.
    """

    def __init__(self, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.bitmask = GrammarBitmask(vocab_size)

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of `logits` [N, V]."""
        params = batch.params
        assert logits.dim() == 2 and logits.shape == (len(params), self.vocab_size), logits.shape
        assert len(batch.prompt_token_ids) == len(batch.output_token_ids) == len(params)
        assert len(batch.generators) == len(params)
        bitmask = self.bitmask.fill(batch.grammars, logits.device) if batch.grammars else None
        logits = logits.float()  # no-op for the fp32 logits the model returns
        asked = [p.logprobs for p in params if p.logprobs is not None]
        raw_logprobs = logits.log_softmax(dim=-1) if asked else None  # [N, V], before step 2
        if bitmask is not None:
            apply = apply_token_bitmask if logits.is_cuda else apply_token_bitmask_ref
            apply(logits, *bitmask)

        processors = LogitsProcessors(
            params,
            batch.prompt_token_ids,
            batch.output_token_ids,
            self.eos_token_ids,
            self.vocab_size,
            logits.device,
            batch.logits_processors,
        )
        processors.apply(logits)
        if all(p.greedy for p in params):
            sampled = logits.argmax(dim=-1)  # argmax-invariant processors are skipped
        else:
            sampled = _sample_mixed(logits, params, batch.generators, processors.batch)

        if raw_logprobs is None:
            return SamplerOutput(sampled)
        ids, lps, ranks = gather_logprobs(raw_logprobs, sampled, max(asked))
        return SamplerOutput(sampled, ids, lps, ranks)


# Settings of a row that is neither scaled nor truncated (greedy rows in a mixed batch).
_NEUTRAL = SamplingParams()


def gather_logprobs(logprobs: Tensor, token_ids: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen token + top-k: ids [N, k+1] int64, logprobs [N, k+1], 1-based ranks [N] int64."""
    token_ids = token_ids.to(torch.int64)[:, None]  # [N, 1]
    token_lp = logprobs.gather(1, token_ids)  # [N, 1]
    # Rank = 1 + tokens strictly more likely, so tied tokens share the better rank.
    ranks = (logprobs > token_lp).sum(dim=-1) + 1
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # [N, k], descending
    return torch.cat([token_ids, top_ids], 1), torch.cat([token_lp, top_lp], 1), ranks


def _sample_mixed(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    batch_logits: BatchLogits,
) -> Tensor:
    """Steps 7-8 for a batch with at least one random row; returns sampled ids [N]."""
    device, vocab_size = logits.device, logits.shape[1]
    greedy = [p.greedy for p in params]
    # Custom argmax-invariant processors must see the tempered logits: no fused path then.
    custom_invariant = len(batch_logits.invariant) > 1
    if logits.is_cuda and not custom_invariant and not any(
            p.top_k or p.top_p < 1.0 or p.min_p for p in params):
        return _gumbel_fast_path(logits, params, generators, greedy)
    greedy_ids = logits.argmax(dim=-1) if any(greedy) else None
    # Greedy rows ride along (temperature 1, no truncation) so every op keeps the full batch
    # shape; their random draw is discarded by the final `where`.
    random_params = [_NEUTRAL if g else p for p, g in zip(params, greedy, strict=True)]
    temperature = to_device([p.temperature for p in random_params], torch.float32, device)
    logits.div_(temperature[:, None])

    top_k = [min(p.top_k, vocab_size) for p in random_params]  # 0 = off
    top_p = [p.top_p for p in random_params]  # 1.0 = off
    if any(p < 1.0 for p in top_p):
        apply_top_k_top_p(
            logits,
            to_device(top_k, torch.int64, device) if any(top_k) else None,
            to_device(top_p, torch.float32, device),
        )
    elif any(top_k):
        apply_top_k(logits, to_device(top_k, torch.int64, device), max(top_k))

    # Argmax-invariant processors (min_p, custom ones) on the tempered, truncated logits.
    batch_logits.apply(logits, argmax_invariant=True)
    probs = logits.softmax(dim=-1)  # [N, V]
    # A greedy row's seed is irrelevant: leave its generator untouched.
    row_generators = [None if g else gen for gen, g in zip(generators, greedy, strict=True)]
    unseeded = any(not g and gen is None for gen, g in zip(generators, greedy, strict=True))
    sampled = exponential_sample(probs, row_generators, shared=unseeded)
    if greedy_ids is None:
        return sampled
    return torch.where(to_device(greedy, torch.bool, device), greedy_ids, sampled)


def _gumbel_fast_path(logits: Tensor, params: list[SamplingParams],
                      generators: list[torch.Generator | None], greedy: list[bool]) -> Tensor:
    """Temperature-only batches on the GPU: one fused pass (`kernels.gumbel`).

    A seeded row's noise seed is its generator's seed (the runner re-seeds it per output
    position); unseeded rows share one fresh draw from torch's default generator per step.
    """
    base = int(torch.randint(1 << 62, (1,)))
    seeds = [gen.initial_seed() if gen is not None else base + i
             for i, gen in enumerate(generators)]
    temps = [0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
    device = logits.device
    return gumbel_sample(logits, to_device(temps, torch.float32, device),
                         to_device(seeds, torch.int64, device))


def apply_top_k(logits: Tensor, top_k: Tensor, max_k: int) -> None:
    """Mask `logits` [N, V] below each row's k-th largest to -inf; top_k [N] (0 = off)."""
    top_values = logits.topk(max_k, dim=-1).values  # [N, max_k], descending
    threshold = top_values.gather(1, (top_k - 1).clamp_min(0)[:, None])  # [N, 1]
    threshold.masked_fill_(top_k[:, None] == 0, float("-inf"))
    # `<` keeps ties with the k-th value (as vLLM does), so a row may keep more than k.
    logits.masked_fill_(logits < threshold, float("-inf"))


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor) -> None:
    """Mask `logits` [N, V] outside top-k, then outside the top-p nucleus, to -inf in place.

    top_k [N] int64 (0 = off), top_p [N] float32 (1.0 = off). One ascending sort serves both.
    """
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # [N, V] ascending
    if top_k is not None:
        k = torch.where(top_k == 0, vocab_size, top_k)
        kth = sorted_logits.gather(1, (vocab_size - k)[:, None])  # [N, 1]: k-th largest
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    # Drop the low tail whose mass is <= 1 - p: the kept head then holds >= p. Never drop the top.
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = tail_mass <= (1.0 - top_p)[:, None]
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, order, sorted_logits)


def exponential_sample(
    probs: Tensor, generators: list[torch.Generator | None], shared: bool = True
) -> Tensor:
    """Sample ids [N] from unnormalised `probs` [N, V] via argmax(probs / Exp(1) noise).

    Seeded rows draw their noise from their own generator; the rest from torch's default one
    (`shared=False` skips that draw when every row that matters is seeded). Overwrites `probs`.
    """
    noise = torch.empty_like(probs)
    if shared:
        noise.exponential_()
    else:
        noise.fill_(1.0)
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    # Exp(1) can return exactly 0; clamping keeps a zero-probability entry at 0 instead of NaN.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)

"""Verifying draft tokens: the target's logits at 1 + k positions -> the tokens a request keeps.

`verify_drafts` turns each request's rows of target logits into target probabilities with the
same temperature / top-k / top-p / min-p the ordinary sampler applies, then runs the rejection
sampler (`kernels.rejection`: Triton on the GPU, the torch reference on the CPU). Drafts are
deterministic (n-gram lookup, greedy draft models): q = one-hot.

Only requests whose sampling needs nothing beyond that take drafts (`spec_eligible`); the others
(penalties, logit bias, allowed/bad words, min_tokens, logprobs, seeds) simply get no drafts and
decode one token per step, so they stay exact without the sampler's whole pipeline being
replayed per draft position.

Structured outputs do take drafts: the proposer keeps only the prefix the grammar accepts, and
verification masks each of the k + 1 rows with the grammar's bitmask at that position (the
matcher walks through the drafts, then rolls back), so every position samples from the same
masked distribution as without speculation. The runner then advances the matcher by the tokens
kept.

Dimension legend: S logit rows of all verified requests (sum of k_b + 1), B requests,
K most drafts of any request, V vocabulary size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kernels.rejection import rejection_sample, rejection_sample_ref
from kernels.sample import apply_token_bitmask, apply_token_bitmask_ref
from sampling.logits import to_device
from sampling.params import SamplingParams
from sampling.sampler import apply_top_k_top_p
from sampling.structured import RequestGrammar

_NEUTRAL = SamplingParams()  # greedy rows ride along unscaled



def apply_min_p(probs: Tensor, min_p: Tensor) -> None:
    """Zero `probs` [N, V] below min_p [N] times the row's top probability, in place."""
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    probs.masked_fill_(probs < threshold, 0.0)

def spec_eligible(p: SamplingParams) -> bool:
    """True when the request may take draft tokens (see the module docstring)."""
    return (p.seed is None and p.logprobs is None
            and not p.logit_bias and p.allowed_token_ids is None and not p.bad_words
            and not p.bad_words_token_ids and p.min_tokens == 0 and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0)


def verify_drafts(logits: Tensor, params: list[SamplingParams], drafts: list[list[int]],
                  grammars: list[RequestGrammar | None] | None = None) -> list[list[int]]:
    """Tokens each request keeps (accepted drafts, then one sampled token).

    logits [S, V] fp32: request b's k_b + 1 rows are consecutive, in request order; row j of a
    request scores the token after its j-th draft (row 0: after its last known token).
    `grammars` (aligned with `drafts`): structured-output matchers, which mask `logits` in place
    and are left where they were.
    """
    device, vocab_size = logits.device, logits.shape[1]
    if grammars is not None and any(g is not None for g in grammars):
        _mask_by_grammar(logits, grammars, drafts)
    num_draft = [len(d) for d in drafts]
    b, k = len(drafts), max(num_draft)
    assert logits.shape[0] == sum(num_draft) + b, (logits.shape, num_draft)
    # Padded view [B, K+1, V]: positions past a request's k_b repeat its row 0 (never read).
    starts, index = 0, []
    for n in num_draft:
        index.append([starts + (j if j <= n else 0) for j in range(k + 1)])
        starts += n + 1
    index_t = to_device(index, torch.int64, device)  # [B, K+1]
    draft_ids = to_device([d + [0] * (k - len(d)) for d in drafts], torch.int64, device)
    greedy = [p.greedy for p in params]
    target_argmax = logits.argmax(dim=-1)[index_t]  # [B, K+1]
    probs = noise = None
    if not all(greedy):  # the padded [B, K+1, V] copy only when some row samples
        padded = logits[index_t.flatten()]  # [B*(K+1), V]
        probs = _target_probs(padded, params, greedy, k)
        probs = probs.reshape(b, k + 1, vocab_size)
        noise = torch.empty(b, vocab_size, device=device).exponential_()
    uniform = torch.rand(b, k, device=device)
    sample = rejection_sample if logits.is_cuda else rejection_sample_ref
    out = sample(draft_ids, to_device(num_draft, torch.int64, device), probs, None,
                 target_argmax, to_device(greedy, torch.bool, device), uniform, noise)
    return [[t for t in row if t >= 0] for row in out.tolist()]


def _mask_by_grammar(logits: Tensor, grammars: list[RequestGrammar | None],
                     drafts: list[list[int]]) -> None:
    """-inf on the tokens each grammar forbids at each of its request's k + 1 positions."""
    words = -(-logits.shape[1] // 32)
    masks, rows, offset = [], [], 0
    for grammar, draft in zip(grammars, drafts, strict=True):
        if grammar is not None:
            bitmask = np.empty((len(draft) + 1, words), dtype=np.int32)
            for j in range(len(draft) + 1):
                grammar.fill_bitmask(bitmask, j)
                if j < len(draft):
                    grammar.accept_tokens(draft[j: j + 1])
            grammar.rollback(len(draft))
            masks.append(bitmask)
            rows += range(offset, offset + len(draft) + 1)
        offset += len(draft) + 1
    apply = apply_token_bitmask if logits.is_cuda else apply_token_bitmask_ref
    apply(logits, torch.from_numpy(np.concatenate(masks)).to(logits.device),
          to_device(rows, torch.int64, logits.device))


def _target_probs(logits: Tensor, params: list[SamplingParams], greedy: list[bool],
                  k: int) -> Tensor:
    """Probabilities [B*(K+1), V] after temperature, top-k, top-p and min-p (greedy rows: a
    plain softmax, never read)."""
    device = logits.device
    rows: list[SamplingParams] = []
    for p, g in zip(params, greedy, strict=True):
        rows += [_NEUTRAL if g else p] * (k + 1)
    logits = logits / to_device([p.temperature for p in rows], torch.float32, device)[:, None]
    top_k = [min(p.top_k, logits.shape[1]) for p in rows]
    top_p = [p.top_p for p in rows]
    if any(top_k) or any(p < 1.0 for p in top_p):
        apply_top_k_top_p(logits, to_device(top_k, torch.int64, device) if any(top_k) else None,
                          to_device(top_p, torch.float32, device))
    probs = logits.softmax(dim=-1)
    if any(p.min_p for p in rows):
        apply_min_p(probs, to_device([p.min_p for p in rows], torch.float32, device))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs.contiguous()

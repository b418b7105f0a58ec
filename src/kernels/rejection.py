"""Rejection sampling for speculative decoding: which draft tokens survive, and the next token.

For each request with n <= K draft tokens d_1..d_n, the target model scored n + 1 positions: p_j
is the target distribution at the position that predicts d_{j+1} (j < n), p_n the one after the
last draft. The draft proposed d_{j+1} from q_j. Walking j = 0..n-1:

    accept d_{j+1} with probability min(1, p_j(d) / q_j(d))   (u_j * q_j(d) < p_j(d), u ~ U[0,1))
    first rejection at j: emit a token from normalize(max(0, p_j - q_j)) and stop
    all n accepted:       emit a bonus token from p_n

which leaves the emitted tokens distributed exactly as sampling the target alone (Leviathan et
al., 2023). Deterministic drafters (n-gram lookup, greedy draft models) have q_j = one-hot(d):
`draft_probs=None`. Greedy rows (temperature 0) accept while the draft equals the target argmax
and then emit the argmax: a draft never changes a greedy output.

The one random token per request is drawn with the exponential race argmax_v(r_v / E_v), E ~
Exp(1) (`noise`, one row per request): only one of "recovered" and "bonus" ever happens, so one
noise row serves both.

Dimension legend: B requests, K most drafts per request (padded), V vocabulary size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_V = 1024


@triton.jit
def _rejection_kernel(out_ptr, draft_ptr, num_draft_ptr, p_ptr, q_ptr, argmax_ptr, greedy_ptr,
                      u_ptr, noise_ptr, V: tl.constexpr, K: tl.constexpr, HAS_Q: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(num_draft_ptr + b)
    greedy_flag = tl.load(greedy_ptr + b)
    greedy = greedy_flag != 0
    accepted = n * 0
    alive = n >= 0  # True until the first rejection
    for j in range(K):
        valid = alive & (j < n)
        d = tl.load(draft_ptr + b * K + j, mask=valid, other=0)
        row = b * (K + 1) + j
        p = tl.load(p_ptr + row * V + d, mask=valid, other=0.0)
        if HAS_Q:
            q = tl.load(q_ptr + (b * K + j) * V + d, mask=valid, other=1.0)
        else:
            q = 1.0
        u = tl.load(u_ptr + b * K + j, mask=valid, other=1.0)
        target_top = tl.load(argmax_ptr + row, mask=valid, other=-1)
        ok = valid & tl.where(greedy, d == target_top, u * q < p)
        tl.store(out_ptr + row, d, mask=ok)
        accepted += ok.to(accepted.dtype)
        alive = ok
    # The one token after the accepted drafts: position `accepted`.
    row = b * (K + 1) + accepted
    token = tl.load(argmax_ptr + row)
    if greedy_flag == 0:
        rejected = accepted < n
        rejected_draft = tl.load(draft_ptr + b * K + accepted, mask=rejected, other=-1)
        best = tl.full([BLOCK_V], -1.0, tl.float32)
        best_idx = tl.zeros([BLOCK_V], tl.int64)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            p_blk = tl.load(p_ptr + row * V + offs, mask=mask, other=0.0)
            if HAS_Q:
                q_blk = tl.load(q_ptr + (b * K + accepted) * V + offs, mask=mask & rejected,
                                other=0.0)
            else:
                q_blk = tl.where(offs == rejected_draft, 1.0, 0.0)
            r = tl.maximum(p_blk - q_blk, 0.0)  # q is 0 everywhere when no draft was rejected
            e = tl.load(noise_ptr + b * V + offs, mask=mask, other=1.0)
            score = tl.where(mask, r / e, -1.0)
            better = score > best
            best = tl.where(better, score, best)
            best_idx = tl.where(better, offs.to(tl.int64), best_idx)
        top = tl.max(best, axis=0)
        token = tl.min(tl.where(best == top, best_idx, V), axis=0)
    tl.store(out_ptr + row, token)


def _check(draft_token_ids, num_draft, target_probs, draft_probs, target_argmax, is_greedy,
           uniform, noise) -> None:
    b, k = draft_token_ids.shape
    assert draft_token_ids.dtype == torch.int64 and num_draft.shape == (b,)
    assert num_draft.dtype == torch.int64
    assert target_argmax.shape == (b, k + 1) and target_argmax.dtype == torch.int64
    assert is_greedy.shape == (b,) and is_greedy.dtype == torch.bool
    assert uniform.shape == (b, k) and uniform.dtype == torch.float32
    if target_probs is not None:
        v = target_probs.shape[-1]
        assert target_probs.shape == (b, k + 1, v) and target_probs.dtype == torch.float32
        assert target_probs.is_contiguous()
        assert noise is not None and noise.shape == (b, v) and noise.is_contiguous()
        if draft_probs is not None:
            assert draft_probs.shape == (b, k, v) and draft_probs.is_contiguous()


def rejection_sample(draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                     target_probs: torch.Tensor | None, draft_probs: torch.Tensor | None,
                     target_argmax: torch.Tensor, is_greedy: torch.Tensor,
                     uniform: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Emitted tokens [B, K+1] int64 (-1 after each row's end) by the Triton kernel.

    draft_token_ids [B, K] int64 (row b valid up to num_draft[b] [B] int64), target_probs
    [B, K+1, V] fp32 (None when every row is greedy), draft_probs [B, K, V] fp32 or None
    (one-hot drafts), target_argmax [B, K+1] int64, is_greedy [B] bool, uniform [B, K] fp32,
    noise [B, V] fp32 Exp(1) draws (None with target_probs).
    """
    _check(draft_token_ids, num_draft, target_probs, draft_probs, target_argmax, is_greedy,
           uniform, noise)
    b, k = draft_token_ids.shape
    out = torch.full((b, k + 1), -1, dtype=torch.int64, device=draft_token_ids.device)
    if target_probs is None:
        return _greedy(draft_token_ids, num_draft, target_argmax, out)
    if b:
        q = draft_probs if draft_probs is not None else target_probs  # unused when HAS_Q False
        _rejection_kernel[(b,)](out, draft_token_ids.contiguous(), num_draft, target_probs, q,
                                target_argmax.contiguous(), is_greedy.to(torch.int8),
                                uniform.contiguous(), noise, target_probs.shape[-1], K=k,
                                HAS_Q=draft_probs is not None, BLOCK_V=_BLOCK_V)
    return out


def _greedy(draft_token_ids: torch.Tensor, num_draft: torch.Tensor, target_argmax: torch.Tensor,
            out: torch.Tensor) -> torch.Tensor:
    """All-greedy fast path in a few vectorized ops (no vocabulary pass at all)."""
    b, k = draft_token_ids.shape
    cols = torch.arange(k, device=out.device)
    match = (draft_token_ids == target_argmax[:, :k]) & (cols < num_draft[:, None])
    accepted = match.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B] leading matches
    keep = cols < accepted[:, None]
    out[:, :k] = torch.where(keep, draft_token_ids, out[:, :k])
    out.scatter_(1, accepted[:, None], target_argmax.gather(1, accepted[:, None]))
    return out


def rejection_sample_ref(draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                         target_probs: torch.Tensor | None, draft_probs: torch.Tensor | None,
                         target_argmax: torch.Tensor, is_greedy: torch.Tensor,
                         uniform: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """The same algorithm, row by row in plain torch (same inputs, same outputs)."""
    _check(draft_token_ids, num_draft, target_probs, draft_probs, target_argmax, is_greedy,
           uniform, noise)
    b, k = draft_token_ids.shape
    out = torch.full((b, k + 1), -1, dtype=torch.int64, device=draft_token_ids.device)
    for i in range(b):
        n, greedy = int(num_draft[i]), bool(is_greedy[i]) or target_probs is None
        j = 0
        while j < n:
            d = int(draft_token_ids[i, j])
            if greedy:
                ok = d == int(target_argmax[i, j])
            else:
                q = 1.0 if draft_probs is None else float(draft_probs[i, j, d])
                ok = float(uniform[i, j]) * q < float(target_probs[i, j, d])
            if not ok:
                break
            out[i, j] = d
            j += 1
        if greedy:
            out[i, j] = target_argmax[i, j]
            continue
        residual = target_probs[i, j].clone()
        if j < n:
            if draft_probs is None:
                residual[draft_token_ids[i, j]] -= 1.0
            else:
                residual -= draft_probs[i, j]
        out[i, j] = (residual.clamp_min(0.0) / noise[i]).argmax()
    return out

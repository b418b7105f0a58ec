"""Sampler and built-in logits processors on tiny hand-made logits (CPU).

Dimension legend: N rows, V vocabulary, K logprobs asked.
"""

from __future__ import annotations

import math

import pytest
import torch

from sampling.logits import LogitsProcessors
from sampling.params import SamplingParams
from sampling.sampler import Sampler, SamplingBatch, gather_logprobs

V = 10
EOS = 9
INF = float("inf")

# Chi-square critical values at alpha = 1e-3, indexed by degrees of freedom.
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def make_batch(params, prompts=None, outputs=None, generators=None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=list(params),
        prompt_token_ids=prompts or [[0]] * n,
        output_token_ids=outputs or [[] for _ in range(n)],
        generators=generators or [None] * n,
    )


def processed(logits: torch.Tensor, batch: SamplingBatch, eos=(EOS,)) -> torch.Tensor:
    """The logits after the built-in processors (a copy; the input is left alone)."""
    out = logits.clone()
    LogitsProcessors(
        batch.params,
        batch.prompt_token_ids,
        batch.output_token_ids,
        list(eos),
        out.shape[1],
        out.device,
    ).apply(out)
    return out


def banned(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row == -INF).flatten().tolist())


# ------------------------------------------------------------------------------------ greedy


def test_greedy_without_processors_is_exact_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[3, 7] = logits[3, 11] = logits[3].max() + 1  # a tie: argmax's first-index rule holds
    out = Sampler(50, [EOS])(logits.clone(), make_batch([SamplingParams(temperature=0.0)] * 6))
    assert torch.equal(out.sampled, logits.argmax(-1))
    assert out.sampled.dtype == torch.int64
    assert out.logprobs is None and out.logprob_token_ids is None and out.ranks is None


def test_greedy_rows_in_mixed_batch_still_take_argmax():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.5, min_p=0.1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7),
    ]
    out = Sampler(V, [EOS])(logits.clone(), make_batch(params))
    assert out.sampled[0] == logits[0].argmax() and out.sampled[2] == logits[2].argmax()


# ------------------------------------------------------------------------------- processors


def test_allowed_token_ids_masks_everything_else():
    logits = torch.arange(V, dtype=torch.float32).repeat(2, 1)  # argmax = V - 1
    batch = make_batch(
        [SamplingParams(temperature=0.0, allowed_token_ids=[2, 5]), SamplingParams(temperature=0.0)]
    )
    out = processed(logits, batch)
    assert banned(out[0]) == set(range(V)) - {2, 5}
    assert out[0, 2] == 2.0 and out[0, 5] == 5.0
    assert torch.equal(out[1], logits[1])
    sampled = Sampler(V, [EOS])(logits.clone(), batch).sampled
    assert sampled.tolist() == [5, V - 1]


def test_bad_words_single_and_multi_token():
    words = [[4], [1, 2, 6], [7, 8]]
    params = [SamplingParams(bad_words_token_ids=words)] * 4 + [SamplingParams()]
    outputs = [[0, 1, 2], [3, 7], [2], [], [1, 2]]
    out = processed(torch.zeros(5, V), make_batch(params, outputs=outputs))
    assert banned(out[0]) == {4, 6}  # output ends with [1, 2]
    assert banned(out[1]) == {4, 8}  # output ends with [7]
    assert banned(out[2]) == {4}  # [2] alone is not the prefix [1, 2]
    assert banned(out[3]) == {4}  # output shorter than any prefix
    assert banned(out[4]) == set()  # no bad words on this row


def test_min_tokens_bans_stop_ids_then_stops_banning():
    stop = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    params = [stop, stop, stop, ignore]
    outputs = [[], [5], [5, 5], [5]]
    out = processed(torch.zeros(4, V), make_batch(params, outputs=outputs), eos=(EOS, 8))
    assert banned(out[0]) == {EOS, 8, 3}
    assert banned(out[1]) == {EOS, 8, 3}
    assert banned(out[2]) == set()  # min_tokens reached
    assert banned(out[3]) == {3}  # ignore_eos: EOS is an ordinary token

    # Through the sampler: EOS is the argmax but cannot be picked before min_tokens.
    logits = torch.zeros(3, V)
    logits[:, EOS], logits[:, 3], logits[:, 1] = 3.0, 2.0, 1.0
    sampled = Sampler(V, [EOS])(logits, make_batch(params[:3], outputs=outputs[:3])).sampled
    assert sampled.tolist() == [1, 1, EOS]


def test_logit_bias_adds_offsets():
    torch.manual_seed(2)
    logits = torch.randn(2, V)
    batch = make_batch([SamplingParams(logit_bias={1: 5.0, 7: -2.5}), SamplingParams()])
    expected = logits.clone()
    expected[0, 1] += 5.0
    expected[0, 7] -= 2.5
    assert torch.equal(processed(logits, batch), expected)


def penalised(row: list[float], prompt, output, rep, freq, pres) -> list[float]:
    """The penalties computed one token at a time, straight from their definitions."""
    row = list(row)
    for t in range(len(row)):
        if t in prompt or t in output:
            row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
        count = output.count(t)
        row[t] -= freq * count + pres * (count > 0)
    return row


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 0.5, 1.0, -0.5, 0.0, 4.0, -3.0]] * 3)
    prompt, output = [1, 2, 2], [2, 3, 3, 5]
    params = [
        SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.3),  # first step: no output
    ]
    batch = make_batch(params, prompts=[prompt] * 3, outputs=[output, output, []])
    out = processed(logits, batch)
    row = logits[0].tolist()
    assert torch.allclose(out[0], torch.tensor(penalised(row, prompt, output, 1.5, 0.5, 0.25)))
    assert torch.equal(out[1], logits[1])  # neutral row untouched bit for bit
    assert torch.allclose(out[2], torch.tensor(penalised(row, prompt, [], 0.8, -0.3, 0.0)))


# ------------------------------------------------------------------------- random sampling

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01])


def draw(params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """n samples of one row (n identical rows in one batch); returns counts per token [V]."""
    torch.manual_seed(seed)
    logits = PROBS.log().repeat(n, 1)
    sampled = Sampler(len(PROBS), [EOS])(logits, make_batch([params] * n)).sampled
    return torch.bincount(sampled, minlength=len(PROBS))


def assert_matches(counts: torch.Tensor, target: torch.Tensor) -> None:
    """Tokens outside target's support never appear; chi-square within alpha = 1e-3."""
    support = target > 0
    assert counts[~support].sum() == 0, counts
    n = counts.sum().item()
    expected = n * target[support] / target.sum()
    chi2 = (((counts[support] - expected) ** 2) / expected).sum().item()
    assert chi2 < CHI2_CRIT[int(support.sum()) - 1], (chi2, counts, expected)


def keep(*ids: int) -> torch.Tensor:
    mask = torch.zeros(len(PROBS), dtype=torch.bool)
    mask[list(ids)] = True
    return PROBS * mask


@pytest.mark.parametrize(
    ("params", "target"),
    [
        (SamplingParams(), PROBS),
        (SamplingParams(temperature=2.0), PROBS.sqrt()),  # p^(1/T), renormalised
        (SamplingParams(top_k=3), keep(0, 1, 2)),
        (SamplingParams(top_p=0.7), keep(0, 1, 2)),  # 0.4 + 0.25 < 0.7 <= 0.8
        (SamplingParams(min_p=0.2), keep(0, 1, 2, 3)),  # p >= 0.2 * 0.4
        # top-p applies to the top-k renormalised mass: 0.4/0.9 + 0.25/0.9 >= 0.6.
        (SamplingParams(top_k=4, top_p=0.6), keep(0, 1)),
        (SamplingParams(top_k=5, min_p=0.3), keep(0, 1, 2)),
    ],
    ids=["plain", "temperature", "top_k", "top_p", "min_p", "top_k+top_p", "top_k+min_p"],
)
def test_sampling_follows_truncated_distribution(params, target):
    assert_matches(draw(params), target)


def test_sampling_checks_can_fail():
    # Guard against a vacuous chi-square: the untruncated draw must not pass as top-k=3.
    with pytest.raises(AssertionError):
        assert_matches(draw(SamplingParams()), keep(0, 1, 2))
    with pytest.raises(AssertionError):
        assert_matches(draw(SamplingParams(temperature=2.0)), PROBS)


@pytest.mark.parametrize(
    "cycle",
    [
        # top-k alone (topk threshold path), then top-k with top-p (one shared sort).
        [(SamplingParams(top_k=2), keep(0, 1)), (SamplingParams(), PROBS)],
        [
            (SamplingParams(top_k=2), keep(0, 1)),
            (SamplingParams(), PROBS),
            (SamplingParams(top_p=0.7), keep(0, 1, 2)),
        ],
    ],
    ids=["top_k", "top_k+top_p"],
)
def test_truncation_stays_on_its_own_rows(cycle):
    # Rows with different settings share one batch: each row gets exactly its own truncation.
    torch.manual_seed(5)
    n = 2000 * len(cycle)
    params = [p for p, _ in cycle] * (n // len(cycle))
    logits = PROBS.log().repeat(n, 1)
    sampled = Sampler(len(PROBS), [EOS])(logits, make_batch(params)).sampled
    for start, (_, target) in enumerate(cycle):
        counts = torch.bincount(sampled[start :: len(cycle)], minlength=len(PROBS))
        assert_matches(counts, target)


def test_top_k_larger_than_vocab_is_no_truncation():
    assert_matches(draw(SamplingParams(top_k=100)), PROBS)


def run_steps(order: list[str], rows: dict[str, tuple[int | None, torch.Tensor]], steps: int):
    """Sample `steps` times with rows in `order`; returns each row's token sequence."""
    gens = {
        name: None if seed is None else torch.Generator().manual_seed(seed)
        for name, (seed, _) in rows.items()
    }
    tokens: dict[str, list[int]] = {name: [] for name in order}
    sampler = Sampler(rows[order[0]][1].shape[0], [EOS])
    for _ in range(steps):
        logits = torch.stack([rows[name][1] for name in order])
        params = [SamplingParams(seed=rows[name][0]) for name in order]
        batch = make_batch(params, generators=[gens[name] for name in order])
        for name, tok in zip(order, sampler(logits, batch).sampled.tolist(), strict=True):
            tokens[name].append(tok)
    return tokens


def test_seeded_rows_reproducible_across_batch_composition():
    torch.manual_seed(3)
    rows = {
        name: (seed, torch.randn(32) * 0.3)
        for name, seed in [("a", 7), ("b", None), ("c", 3), ("d", 11), ("e", None)]
    }
    torch.manual_seed(100)
    first = run_steps(["a", "b", "c"], rows, steps=12)
    torch.manual_seed(200)  # a different shared stream must not matter to seeded rows
    second = run_steps(["d", "c", "e", "a"], rows, steps=12)
    assert first["a"] == second["a"]
    assert first["c"] == second["c"]
    # Same logits, different seed: the sequences differ (fails only with probability ~1e-15).
    rows["a2"] = (8, rows["a"][1])
    third = run_steps(["a2"], rows, steps=12)
    assert third["a2"] != first["a"]


# ---------------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_and_aligned():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    params = [
        SamplingParams(logprobs=2, temperature=0.5, logit_bias={0: 10.0}),
        SamplingParams(logprobs=0, temperature=0.0),
        SamplingParams(temperature=1.0, top_k=2),
    ]
    out = Sampler(V, [EOS])(logits.clone(), make_batch(params))
    raw = torch.log_softmax(logits, -1)
    assert out.sampled[0] == 0  # the +10 bias decides the draw ...
    assert out.logprob_token_ids.shape == (3, 3) and out.logprobs.shape == (3, 3)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled)
    rows = torch.arange(3)
    # ... but the reported logprob is the raw model one, before bias and temperature.
    assert torch.allclose(out.logprobs[:, 0], raw[rows, out.sampled])
    top_lp, top_ids = raw.topk(2, -1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    assert torch.allclose(out.logprobs[:, 1:], top_lp)
    order = raw.argsort(-1, descending=True)
    expected_ranks = [order[i].tolist().index(out.sampled[i].item()) + 1 for i in range(3)]
    assert out.ranks.tolist() == expected_ranks
    assert out.ranks[1] == 1  # greedy row picks the top token


def test_gather_logprobs_ranks_ties_and_k_zero():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]]), -1)
    ids, lps, ranks = gather_logprobs(logprobs, torch.tensor([2, 0]), k=0)
    assert ids.tolist() == [[2], [0]]
    assert torch.equal(lps[:, 0], logprobs[[0, 1], [2, 0]])
    assert ranks.tolist() == [1, 4]  # tied top tokens share rank 1
    ids, _, _ = gather_logprobs(logprobs, torch.tensor([0, 3]), k=1)
    assert ids[:, 1].tolist() == [1, 3]
    assert math.isclose(
        lps.sum().item(), logprobs[0, 2].item() + logprobs[1, 0].item(), rel_tol=1e-6
    )

"""`verify_drafts` on a tiny model's real logits: the tokens it emits follow the target's
distribution (with temperature and top-k), whatever the drafts were."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from sampling.params import SamplingParams, StructuredOutputsParams
from sampling.rejection import spec_eligible, verify_drafts


def chi_square(samples: list[int], probs: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom of `samples` against `probs` [V] (support > 0)."""
    support = torch.nonzero(probs > 0).flatten().tolist()
    assert set(samples) <= set(support), "a token outside the target's support"
    n = len(samples)
    counts = torch.bincount(torch.tensor(samples), minlength=probs.numel()).double()
    expected = probs.double() * n
    stat = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    return stat, len(support) - 1


def test_verified_tokens_follow_the_target(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = [17, 230, 45, 980, 12, 77, 5, 301]
    with torch.no_grad():
        base = model(torch.tensor([prompt])).logits[0, -1]
        draft = int(base.argmax())  # a self-draft's greedy proposal
        after = model(torch.tensor([prompt + [draft]])).logits[0, -1]
    params = SamplingParams(temperature=0.8, top_k=5)
    assert spec_eligible(params)
    n = 6000
    logits = torch.stack([base, after]).repeat(n, 1)  # [2n, V]: rows of n identical requests
    kept = verify_drafts(logits, [params] * n, [[draft]] * n)

    def target(row: torch.Tensor) -> torch.Tensor:
        top = torch.topk(row / params.temperature, params.top_k)
        probs = torch.zeros_like(row)
        probs[top.indices] = torch.softmax(top.values, -1)
        return probs

    p_first, p_bonus = target(base), target(after)
    accepted = [t for t in kept if len(t) == 2]
    # Draft accepted with probability p(draft); the rest resample from p without the draft.
    assert abs(len(accepted) / n - float(p_first[draft])) < 0.03
    # Thresholds at p-values of ~1e-5 for 4 degrees of freedom: stable for a fixed seed.
    stat, dof = chi_square([t[0] for t in kept], p_first)
    assert dof == 4 and stat < 28.0, stat
    stat, _ = chi_square([t[1] for t in accepted], p_bonus)
    assert stat < 28.0, stat


def test_greedy_verification_is_the_argmax(tiny_model_dir):
    logits = torch.randn(9, 50)  # rows: 2 + 1, 3 + 1, 1 + 1
    top = logits.argmax(-1).tolist()
    greedy = SamplingParams(temperature=0.0)
    # Request 0: 2 drafts, both right -> both + bonus. Request 1: 3 drafts, the second wrong.
    # Request 2: one draft, wrong.
    drafts = [[top[0], top[1]], [top[3], (top[4] + 1) % 50, top[5]], [(top[7] + 1) % 50]]
    kept = verify_drafts(logits, [greedy] * 3, drafts)
    assert kept == [[top[0], top[1], top[2]], [top[3], top[4]], [top[7]]]


def test_eligibility():
    assert spec_eligible(SamplingParams(temperature=0.0))
    assert spec_eligible(SamplingParams(top_p=0.9, min_p=0.1, prompt_logprobs=2))
    assert spec_eligible(SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")))
    for bad in (dict(seed=1), dict(logprobs=1), dict(repetition_penalty=1.1),
                dict(presence_penalty=0.5), dict(logit_bias={1: 2.0}), dict(min_tokens=2),
                dict(allowed_token_ids=[1, 2]), dict(bad_words=["x"])):
        assert not spec_eligible(SamplingParams(**bad)), bad

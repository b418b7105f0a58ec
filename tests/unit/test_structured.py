"""Structured outputs without an engine: grammars, matchers, bitmasks, the sampler step, config
and the OpenAI request mapping (CPU, the demo tokenizer).

Dimension legend: N sampler rows, V vocabulary, W = ceil(V / 32) bitmask words.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future

import msgspec
import numpy as np
import pytest
import torch

from enginecore.config import EngineConfig
from frontend import openai as api
from frontend.cli import parse_serve_args
from frontend.processor import Processor
from frontend.tokenizer import Tokenizer
from kernels.sample import apply_token_bitmask_ref
from sampling.bitmask import GrammarBitmask
from sampling.params import SamplingParams
from sampling.params import StructuredOutputsParams as SO
from sampling.sampler import Sampler, SamplingBatch
from sampling.structured import (
    GrammarCompiler,
    RequestGrammar,
    build_grammar,
    fill_bitmasks,
    load_lltokenizer,
    tokenizer_json_of,
    validate_structured_outputs,
)
from workers.demo import EOS_ID, IM_END_ID

V = 1000  # the demo tokenizer's vocab
V_PAD = 1024  # a model vocab padded past the tokenizer's
EOS = (EOS_ID, IM_END_ID)
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
          "required": ["n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(tokenizer_dir) -> GrammarCompiler:
    comp = GrammarCompiler(tokenizer_dir, V_PAD, EOS)
    yield comp
    comp.shutdown()


def allowed_ids(row: np.ndarray) -> set[int]:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return set(np.nonzero(bits)[0].tolist())


def force(compiler: GrammarCompiler, grammar: RequestGrammar, text: str) -> None:
    assert grammar.accept_tokens(compiler.tokenizer.tokenize_str(text)), text


# ------------------------------------------------------------------ grammar text


@pytest.mark.parametrize("so", [
    SO(json=SCHEMA), SO(json=json.dumps(SCHEMA)), SO(json_object=True), SO(regex="[ab]+"),
    SO(choice=["x", "y"]), SO(grammar='start: "a" | "b"'), SO(grammar='root ::= "a" | "b"'),
    SO(structural_tag=json.dumps({"structures": [{"begin": "<f>", "schema": SCHEMA,
                                                  "end": "</f>"}], "triggers": ["<f"]})),
])
def test_every_kind_builds_a_valid_grammar(so):
    validate_structured_outputs(so)


@pytest.mark.parametrize("so, needle", [
    (SO(regex="a(b"), "unclosed group"),
    (SO(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}), "/$defs/x"),
    (SO(json="{not json"), "not valid JSON"),
    (SO(json="[1, 2]"), "JSON schema object"),
    (SO(grammar="start: foo"), "unknown name"),
    (SO(choice=[]), "non-empty"),
    (SO(structural_tag='{"structures": []}'), "triggers"),
    (SO(regex="a", choice=["b"]), "exactly one"),
])
def test_bad_constraints_raise_value_error_with_the_reason(so, needle):
    with pytest.raises(ValueError, match="structured_outputs") as exc:
        validate_structured_outputs(so)
    assert needle in str(exc.value)


def test_disable_additional_properties_closes_nested_objects(compiler):
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "integer"}}}}, "required": ["a"]}
    for closed in (False, True):
        g = compiler.compile(SO(json=schema, disable_any_whitespace=True,
                                disable_additional_properties=closed))
        ok = g.validate_tokens(compiler.tokenizer.tokenize_str('{"a":{"b":1,"c":2}}'))
        full = len(compiler.tokenizer.tokenize_str('{"a":{"b":1,"c":2}}'))
        assert (ok == full) != closed


# ------------------------------------------------------------------ matchers


def test_complete_grammar_allows_only_eos_then_terminates(compiler):
    g = compiler.compile(SO(json=SCHEMA, disable_any_whitespace=True))
    mask = np.zeros((1, V_PAD // 32), dtype=np.int32)
    g.fill_bitmask(mask, 0)
    assert {compiler.tokenizer.decode_str([t]) for t in allowed_ids(mask[0])} == {"{"}
    force(compiler, g, '{"n":7')
    assert not g.is_terminated()
    force(compiler, g, "}")
    g.fill_bitmask(mask, 0)
    assert allowed_ids(mask[0]) == set(EOS) and g.is_terminated()
    # EOS again: async scheduling samples once more before the core sees the first EOS.
    assert g.accept_tokens([EOS_ID]) and g.accept_tokens([EOS_ID]) and g.is_terminated()
    assert not g.accept_tokens([17])


def test_rollback_and_validate(compiler):
    g = compiler.compile(SO(regex="ab[0-9]{3}"))
    ids = compiler.tokenizer.tokenize_str("ab12")
    assert g.validate_tokens(ids + compiler.tokenizer.tokenize_str("x")) == len(ids)
    force(compiler, g, "ab12")
    g.rollback(len(ids))
    force(compiler, g, "ab999")
    assert not g.accept_tokens(compiler.tokenizer.tokenize_str("9"))  # a 4th digit: rejected


def test_tokens_before_the_compile_ends_are_replayed(compiler):
    pending: Future = Future()
    tok = compiler.tokenizer
    g = RequestGrammar(pending, output_token_ids=tok.tokenize_str("ab"))
    g.accept_tokens(tok.tokenize_str("1"))
    g.rollback(1)  # rolls back a pending token: nothing compiled yet
    g.accept_tokens(tok.tokenize_str("2"))
    from llguidance import LLMatcher
    pending.set_result(LLMatcher(tok, build_grammar(SO(regex="ab2c"))))
    mask = np.zeros((1, V_PAD // 32), dtype=np.int32)
    g.fill_bitmask(mask, 0)
    assert {tok.decode_str([t]) for t in allowed_ids(mask[0])} == {"c"}


def test_constraint_starts_after_the_reasoning_end(compiler):
    tok = compiler.tokenizer
    g = compiler.compile(SO(choice=["yes", "no"], reasoning_end_token_ids=[IM_END_ID, 5]))
    mask = np.zeros((1, V_PAD // 32), dtype=np.int32)
    g.accept_tokens(tok.tokenize_str("thinking about it") + [IM_END_ID])
    g.fill_bitmask(mask, 0)
    assert not g.is_active and len(allowed_ids(mask[0])) == V_PAD  # still reasoning: all
    g.accept_tokens([5] + tok.tokenize_str("ye"))  # the end sequence, then constrained tokens
    assert g.is_active
    g.fill_bitmask(mask, 0)
    assert {tok.decode_str([t]) for t in allowed_ids(mask[0])} == {"s"}
    # A prompt that already ends the reasoning (thinking off): constrained from the start.
    g = compiler.compile(SO(choice=["yes", "no"], reasoning_end_token_ids=[IM_END_ID, 5]),
                         prompt_token_ids=[9, IM_END_ID, 5])
    assert g.is_active


def test_batch_fill_matches_one_by_one_and_cache_shares_the_compile(compiler):
    specs = [SO(regex="[0-9]+"), SO(choice=["alpha", "beta"]), SO(regex="[0-9]+"),
             SO(json_object=True, reasoning_end_token_ids=[IM_END_ID])]
    grammars = [compiler.compile(s) for s in specs]
    assert compiler._compiled(build_grammar(specs[0])) is compiler._compiled(
        build_grammar(specs[2]))
    force(compiler, grammars[2], "12")  # copies: advancing one leaves its twin alone
    batch = np.zeros((6, V_PAD // 32), dtype=np.int32)
    fill_bitmasks(grammars, batch)
    for i, g in enumerate(grammars):
        one = np.zeros((1, V_PAD // 32), dtype=np.int32)
        g.fill_bitmask(one, 0)
        assert np.array_equal(batch[i], one[0]), i
    assert np.all(batch[3] == -1)
    assert not np.array_equal(batch[0], batch[1])
    assert allowed_ids(batch[0]) <= set(range(V))  # padded ids are never allowed


def test_lltokenizer_is_cached_and_knows_the_eos_ids(tokenizer_dir):
    text = tokenizer_json_of(tokenizer_dir)
    tok = load_lltokenizer(text, V_PAD, EOS)
    assert tok is load_lltokenizer(text, V_PAD, EOS)
    assert tok.vocab_size == V_PAD and set(tok.eos_tokens) == set(EOS)


# ------------------------------------------------------------------ sampler step


def test_sampler_masks_constrained_rows_only(compiler):
    torch.manual_seed(0)
    logits = torch.randn(3, V_PAD)
    grammar = compiler.compile(SO(choice=["alpha", "beta"]))
    params = [SamplingParams(temperature=0.0)] * 3
    batch = SamplingBatch(params=params, prompt_token_ids=[[1]] * 3,
                          output_token_ids=[[], [], []], generators=[None] * 3,
                          grammars=[None, grammar, None])
    out = Sampler(V_PAD, list(EOS))(logits.clone(), batch).sampled
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    first = {compiler.tokenizer.decode_str([t]) for t in range(V)
             if grammar.validate_tokens([t]) == 1}
    assert compiler.tokenizer.decode_str([int(out[1])]) in first
    assert int(out[1]) == max((t for t in range(V) if grammar.validate_tokens([t]) == 1),
                              key=lambda t: logits[1, t])


def test_deferred_tokens_and_bitmask_fill_match_eager_accept(compiler):
    """defer_tokens + GrammarBitmask (the runner's path) gives the masks eager accept gives."""
    tok = compiler.tokenizer
    eager = compiler.compile(SO(regex="ab[0-9]{3}"))
    lazy = compiler.compile(SO(regex="ab[0-9]{3}"))
    filler = GrammarBitmask(V_PAD)
    for piece in ("ab", "1", "2"):
        ids = tok.tokenize_str(piece)
        eager.accept_tokens(ids)
        lazy.defer_tokens(ids)
        bitmask, rows = filler.fill([None, lazy], torch.device("cpu"))
        assert rows.tolist() == [1]
        one = np.zeros((1, V_PAD // 32), dtype=np.int32)
        eager.fill_bitmask(one, 0)
        assert np.array_equal(bitmask[0].numpy(), one[0]), piece
    lazy.defer_tokens(tok.tokenize_str("3"))
    assert lazy.is_terminated()  # consuming the deferred "3" completes the grammar
    lazy.defer_tokens(tok.tokenize_str("x"))
    lazy.rollback(1)  # the deferred token is consumed (rejected), then rolled back
    assert filler.fill([None, None], torch.device("cpu")) is None


def test_bitmask_ref_against_a_python_loop():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 70, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 2), dtype=torch.int32, generator=gen)
    out = logits.clone()
    apply_token_bitmask_ref(out, bitmask, torch.tensor([3, 1]))
    for m, row in enumerate((3, 1)):
        for t in range(70):
            ok = t < 64 and (int(bitmask[m, t // 32]) >> (t % 32)) & 1
            assert out[row, t] == (logits[row, t] if ok else float("-inf"))
    assert torch.equal(out[[0, 2]], logits[[0, 2]])


# ------------------------------------------------------------------ config and CLI


def test_structured_outputs_config_from_cli_and_kwargs(tiny_model_dir):
    _, kwargs, _ = parse_serve_args([tiny_model_dir, "--structured-outputs-config",
                                     '{"backend": "guidance", "disable_any_whitespace": true}'])
    cfg = EngineConfig.create(tiny_model_dir, **kwargs)
    assert cfg.structured_outputs.backend == "guidance"
    assert cfg.structured_outputs.disable_any_whitespace
    assert EngineConfig.from_json(cfg.to_json()) == cfg
    cfg = EngineConfig.create(tiny_model_dir, structured_outputs_config={"backend": "auto"})
    assert not cfg.structured_outputs.disable_any_whitespace
    with pytest.raises(ValueError, match="xgrammar.*does not implement"):
        EngineConfig.create(tiny_model_dir, structured_outputs_config={"backend": "xgrammar"})
    with pytest.raises(ValueError, match="structured_outputs_config"):
        EngineConfig.create(tiny_model_dir, structured_outputs_config="{bad")


def test_processor_applies_engine_defaults_and_rejects_bad_grammars(tiny_model_dir):
    cfg = EngineConfig.create(tiny_model_dir, structured_outputs_config={
        "disable_any_whitespace": True})
    proc = Processor(cfg, Tokenizer.from_pretrained(tiny_model_dir))
    req = proc.make_request("r", [5, 6], SamplingParams(structured_outputs=SO(json=SCHEMA)))
    assert req.sampling.structured_outputs.disable_any_whitespace
    with pytest.raises(ValueError, match="invalid regex"):
        proc.make_request("r", [5], SamplingParams(structured_outputs=SO(regex="(")))


# ------------------------------------------------------------------ OpenAI request mapping


def chat(**body) -> SamplingParams:
    raw = json.dumps({"messages": [{"role": "user", "content": "hi"}], **body})
    return api.chat_request_decoder.decode(raw).to_sampling_params(16)


def test_response_format_maps_to_structured_outputs():
    assert chat().structured_outputs is None
    assert chat(response_format={"type": "text"}).structured_outputs is None
    assert chat(response_format={"type": "json_object"}).structured_outputs == SO(
        json_object=True)
    so = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMA, "strict": True}}).structured_outputs
    assert so == SO(json=SCHEMA, disable_additional_properties=True)
    tag = {"type": "structural_tag", "structures": [], "triggers": ["<f"]}
    assert json.loads(chat(response_format=tag).structured_outputs.structural_tag) == {
        "structures": [], "triggers": ["<f"]}
    for bad in ({"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "yaml"}):
        with pytest.raises(ValueError, match="response_format"):
            chat(response_format=bad)


def test_structured_outputs_body_and_deprecated_aliases(caplog):
    assert chat(structured_outputs={"regex": "[0-9]+"}).structured_outputs == SO(regex="[0-9]+")
    with caplog.at_level(logging.WARNING, logger="frontend.openai"):
        assert chat(guided_choice=["a", "b"]).structured_outputs == SO(choice=["a", "b"])
        assert chat(guided_json=SCHEMA).structured_outputs == SO(json=SCHEMA)
        assert chat(guided_regex="x").structured_outputs == SO(regex="x")
        assert chat(guided_grammar='start: "a"').structured_outputs == SO(grammar='start: "a"')
    assert "guided_choice is deprecated" in caplog.text
    with pytest.raises(ValueError, match="only one of"):
        chat(guided_regex="x", response_format={"type": "json_object"})
    with pytest.raises(msgspec.ValidationError):
        chat(structured_outputs={"regex": 5})

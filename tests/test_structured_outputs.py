"""Structured outputs through the whole engine (offline `LLM`, tiny random model).

The model writes garbage, so whatever shape its outputs have comes from the constraint: every
JSON output must validate against its schema, every regex output must fullmatch, every choice
output must be a member, and each must end because the grammar completed (finish_reason
"stop"). Strings, arrays and numbers in the schemas are bounded so a complete document fits in
max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from frontend import LLM, SamplingParams
from sampling.params import StructuredOutputsParams as SO

MAX_TOKENS = 160
S = {"type": "string", "maxLength": 6}
I = {"type": "integer", "minimum": -50, "maximum": 50}  # noqa: E741


def obj(props: dict, required: list[str] | None = None, **kw) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


def arr(items: dict, lo: int = 0, hi: int = 3) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


SCHEMAS: list[dict] = [
    S, I, {"type": "boolean"}, {"type": "null"},
    {"type": "integer", "minimum": 10, "maximum": 12},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"enum": ["red", "green", "blue"]},
    {"const": "fixed"},
    {"type": "string", "pattern": "^[a-f]{2,4}$"},
    {"type": "string", "minLength": 2, "maxLength": 3},
    obj({"name": S}),
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"a": S, "b": I}, required=["a"]),  # an optional field
    obj({"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"enum": [1, 2, 3]}}),
    obj({"inner": obj({"x": I, "y": I})}),
    obj({"l1": obj({"l2": obj({"l3": S})})}),
    arr(I), arr(S, 1, 2), arr({"enum": ["a", "b"]}, 2, 2),
    arr(obj({"id": I}), 0, 2),
    obj({"tags": arr(S, 0, 2), "count": I}),
    obj({"matrix": arr(arr(I, 1, 2), 1, 2)}),
    {"anyOf": [S, I]},
    {"oneOf": [obj({"kind": {"const": "a"}}), obj({"kind": {"const": "b"}, "v": I})]},
    {"type": ["integer", "null"], "maximum": 5, "minimum": 0},
    {"$defs": {"pt": obj({"x": I, "y": I})}, "type": "object",
     "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"], "additionalProperties": False},
    {"$defs": {"name": S}, "type": "array", "items": {"$ref": "#/$defs/name"}, "maxItems": 2},
    {"definitions": {"c": {"enum": ["x", "y"]}},
     "type": "object", "properties": {"c": {"$ref": "#/definitions/c"}}, "required": ["c"],
     "additionalProperties": False},
    obj({"price": {"type": "number", "minimum": 1, "maximum": 9, "multipleOf": 0.25},
         "qty": I}),
    obj({"email": {"type": "string", "pattern": "^[a-z]{1,4}@[a-z]{1,4}\\.com$"}}),
    obj({"opt1": S, "opt2": I, "opt3": {"type": "boolean"}}, required=[]),
    obj({"status": {"enum": ["ok", "err"]}, "data": {"anyOf": [arr(I, 0, 2), {"type": "null"}]}}),
    {"allOf": [obj({"a": I}, additionalProperties=True)]},
    obj({"nested": arr(obj({"k": S, "v": arr(I, 0, 1)}), 1, 2)}),
]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(tiny_model_dir, max_num_seqs=48, kv_cache_memory_bytes=64 << 20) as engine:
        yield engine


def constrained(so: SO, seed: int | None = None) -> SamplingParams:
    if seed is None:
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured_outputs=so)
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
                          structured_outputs=so)


def test_json_schemas_validate(llm):
    assert len(SCHEMAS) >= 30
    params = [constrained(SO(json=s, disable_any_whitespace=True), seed=i if i % 2 else None)
              for i, s in enumerate(SCHEMAS)]
    outs = llm.generate(["Give me JSON:"] * len(SCHEMAS), params, use_tqdm=False)
    for schema, out in zip(SCHEMAS, outs, strict=True):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_choice_grammar(llm):
    regexes = [r"[a-c]{3}-[0-9]{2}", r"(yes|no)!", r"[A-Z][a-z]{0,5}( [a-z]{1,4}){0,2}\.",
               r"\d{3}-\d{4}"]
    choices = [["apple", "banana", "cherry"], ["a b", "a c", "xyz"]]
    grammar = 'start: expr\nexpr: NUM | "(" expr "+" expr ")"\nNUM: /[0-9]/'
    params = ([constrained(SO(regex=r)) for r in regexes]
              + [constrained(SO(choice=c), seed=i) for i, c in enumerate(choices)]
              + [constrained(SO(json_object=True, disable_any_whitespace=True), seed=7),
                 constrained(SO(json_object=True, disable_any_whitespace=True)),
                 constrained(SO(grammar=grammar), seed=3)])
    outs = [o.outputs[0] for o in llm.generate(["Hello"] * len(params), params, use_tqdm=False)]
    assert all(o.finish_reason == "stop" for o in outs), [(o.text, o.finish_reason) for o in outs]
    for r, out in zip(regexes, outs, strict=False):
        assert re.fullmatch(r, out.text), (r, out.text)
    for c, out in zip(choices, outs[len(regexes):], strict=False):
        assert out.text in c
    for out in outs[-3:-1]:
        assert isinstance(json.loads(out.text), dict)
    assert re.fullmatch(r"[0-9]|\(.*\)", outs[-1].text) and outs[-1].text.count("(") == \
        outs[-1].text.count(")")


def test_free_requests_are_unaffected_by_constrained_neighbours(llm):
    free = [SamplingParams(temperature=0.0, max_tokens=24),
            SamplingParams(temperature=0.9, seed=11, max_tokens=24),
            SamplingParams(temperature=0.0, max_tokens=24, logprobs=2)]
    prompts = ["one two three", "the model", "cache block"]
    alone = llm.generate(prompts, free, use_tqdm=False)
    mixed_params = [constrained(SO(json=SCHEMAS[11], disable_any_whitespace=True)), free[0],
                    constrained(SO(regex="[a-z]{4,9}")), free[1], free[2],
                    constrained(SO(choice=["x", "y"]))]
    mixed_prompts = ["json", prompts[0], "regex", prompts[1], prompts[2], "choice"]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    for a, m in zip(alone, [mixed[1], mixed[3], mixed[4]], strict=True):
        assert a.outputs[0].token_ids == m.outputs[0].token_ids
    assert mixed[5].outputs[0].text in ("x", "y")


def test_resumed_request_keeps_its_grammar(tiny_model_dir, llm):
    # 10 blocks of 16 tokens for 8 requests needing ~6 each: preemption by recompute happens,
    # and a resumed request's worker-side matcher is rebuilt from the tokens it had.
    params = [constrained(SO(json=SCHEMAS[20], disable_any_whitespace=True))] * 8
    prompts = [f"request number {i} " * 6 for i in range(8)]
    want = llm.generate(prompts, params, use_tqdm=False)
    with LLM(tiny_model_dir, max_num_seqs=8, num_gpu_blocks_override=24,
             max_model_len=256) as small:
        got = small.generate(prompts, params, use_tqdm=False)
        assert small.get_stats().num_preemptions > 0
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        jsonschema.validate(json.loads(g.outputs[0].text), SCHEMAS[20])


@pytest.mark.parametrize("so, needle", [
    (SO(regex="[a-"), "invalid regex"),
    (SO(json={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}), "nope"),
    (SO(grammar="start: missing_rule"), "missing_rule"),
])
def test_bad_constraints_are_value_errors(llm, so, needle):
    with pytest.raises(ValueError, match="structured_outputs") as exc:
        llm.generate("x", SamplingParams(structured_outputs=so), use_tqdm=False)
    assert needle in str(exc.value)

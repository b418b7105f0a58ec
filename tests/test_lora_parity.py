"""Multi-LoRA against peft: logits (fp32) and greedy tokens for batches mixing adapters.

The reference is peft on transformers' tiny Llama: `PeftModel` with the adapter active
(unmerged) and the same model with the adapter merged into the weights (`merge_and_unload`).
Our side runs one flat batch holding the base model and three adapters of different ranks,
scalings and target modules at once, through the model-level path (`LoRAManager` + paged
attention, like the runner) and through the whole engine (`LLM.generate(lora_request=...)`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from test_model_parity import PagedBatcher, prompt
from transformers import AutoModelForCausalLM

from enginecore.config import EngineConfig
from enginecore.protocol import LoRARef
from frontend import LLM, SamplingParams
from frontend.lora import LoRARequest
from frontend.processor import Processor
from frontend.tokenizer import Tokenizer
from workers.lora import LoRAManager
from workers.models import load_model

ATOL = 2e-4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ("sql", "chat", "math")


@pytest.fixture(scope="module")
def peft_models(tiny_models, lora_adapters) -> dict[str, dict[str, torch.nn.Module]]:
    """name -> {"unmerged": PeftModel, "merged": merged copy}; "base" -> the HF base model."""
    out = {}
    for name in NAMES:
        base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, lora_adapters[name]).eval()
        merged = copy.deepcopy(peft).merge_and_unload().eval()
        out[name] = {"unmerged": peft, "merged": merged}
    out["base"] = {"unmerged": AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], dtype=torch.float32).eval()}
    return out


def refs(lora_adapters) -> dict[str, LoRARef]:
    return {name: LoRARef(name=name, int_id=i + 1, path=lora_adapters[name])
            for i, name in enumerate(NAMES)}


def ref_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def run_batches(manager: LoRAManager, batcher: PagedBatcher,
                steps: list[list[tuple[str, LoRARef | None, list[int]]]]) -> dict[str, list]:
    """Run steps of (seq, adapter, new tokens); return seq -> its logits rows, in order."""
    rows: dict[str, list[torch.Tensor]] = {}
    for step in steps:
        manager.prepare([ref for _, ref, _ in step], np.array([len(t) for *_, t in step]))
        logits = batcher.step([(seq, tokens) for seq, _, tokens in step])
        start = 0
        for seq, _, tokens in step:
            rows.setdefault(seq, []).append(logits[start: start + len(tokens)])
            start += len(tokens)
    return {seq: torch.cat(r) for seq, r in rows.items()}


@pytest.mark.parametrize("max_loras,kernels", [(3, False), (1, False), (3, True)],
                         ids=["mixed", "evicting", "mixed-triton-interpreter"])
def test_mixed_batch_logits_match_peft(tiny_models, lora_adapters, peft_models,
                                       max_loras: int, kernels: bool) -> None:
    """Prefill chunks then decode, base + 3 adapters per step (max_loras 3), or one adapter per
    step with slot eviction and reloads (max_loras 1, CPU cache of 1). `kernels`: the Triton
    shrink/expand (in the interpreter on CPU) instead of the torch references."""
    cfg = EngineConfig.create(tiny_models["llama"], enable_lora=True, max_loras=max_loras,
                              max_lora_rank=8)
    model = load_model(tiny_models["llama"], torch.float32)
    manager = LoRAManager(cfg, model, torch.device("cpu"), torch.float32, 256)
    manager.batch.kernels = kernels and os.environ.get("TRITON_INTERPRET") == "1"
    if kernels and not manager.batch.kernels:
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1")
    batcher = PagedBatcher(model)
    lora = refs(lora_adapters)
    seqs = {name: prompt(9 + 3 * i, seed=i) for i, name in enumerate(("base",) + NAMES)}
    adapter = {"base": None, **lora}
    if max_loras == 3:  # every adapter in every step: chunked prefill, then 3 decode steps
        steps = [[(s, adapter[s], toks[:5]) for s, toks in seqs.items()],
                 [(s, adapter[s], toks[5:]) for s, toks in seqs.items()]]
        steps += [[(s, adapter[s], [7 + j]) for s in seqs] for j in range(3)]
    else:  # one adapter per step, revisiting each: every step evicts the previous slot
        steps = [[("base", None, seqs["base"])]]
        steps += [[(s, adapter[s], seqs[s][:6])] for s in NAMES]
        steps += [[(s, adapter[s], seqs[s][6:]), ("base", None, [3])] for s in NAMES]
    got = run_batches(manager, batcher, steps)
    for seq, tokens in seqs.items():
        full = tokens + ([7, 8, 9] if max_loras == 3 else [])
        if seq == "base" and max_loras == 1:
            full = tokens + [3, 3, 3]
        for kind, model_ref in peft_models[seq].items():
            want = ref_logits(model_ref, full)
            torch.testing.assert_close(got[seq], want, atol=ATOL, rtol=0,
                                       msg=lambda m, s=seq, k=kind: f"{s} ({k}): {m}")
    # The adapters do change the outputs (the comparison above could not pass by accident).
    base = ref_logits(peft_models["base"]["unmerged"], seqs["sql"])
    assert (ref_logits(peft_models["sql"]["unmerged"], seqs["sql"]) - base).abs().max() > 0.1


def peft_greedy(model: torch.nn.Module, tokens: list[int], max_new: int
                ) -> tuple[list[int], list[float]]:
    """Greedy continuation and each new token's logprob, from full forwards (no KV cache)."""
    seq, lps = list(tokens), []
    for _ in range(max_new):
        logprobs = torch.log_softmax(ref_logits(model, seq)[-1], dim=-1)
        nxt = int(logprobs.argmax())
        seq.append(nxt)
        lps.append(float(logprobs[nxt]))
    return seq[len(tokens):], lps


@pytest.mark.parametrize("device", DEVICES)
def test_engine_mixed_adapters_match_peft(tiny_models, lora_adapters, peft_models,
                                          device: str, tmp_path) -> None:
    """The whole engine: base + 3 adapters in one generate call with max_loras=2 (the scheduler
    holds back a third adapter), CPU cache of 2 (reloads). Run twice with the adapters permuted:
    the same prompts under another adapter must not reuse the first round's prefix-cache KV.
    On CUDA (fp32): the Triton kernels, inside CUDA graphs for the decode steps."""
    max_new = 6
    shared = prompt(40, seed=11)  # > 2 blocks of 16: a prefix-cache hit would be possible
    prompts = [shared, shared, prompt(7, seed=12), shared]
    lora = {r.name: LoRARequest(r.name, r.int_id, r.path) for r in refs(lora_adapters).values()}
    rounds = [[None, lora["sql"], lora["chat"], lora["math"]]]
    rounds.append(rounds[0][1:] + rounds[0][:1])
    atol = ATOL if device == "cpu" else 2e-3
    with LLM(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8,
             max_cpu_loras=2, max_num_seqs=8, device=device, dtype="float32") as llm:
        for assignment in rounds:
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new,
                                                        logprobs=0, ignore_eos=True),
                                use_tqdm=False, lora_request=assignment)
            for p, req, out in zip(prompts, assignment, outs, strict=True):
                name = "base" if req is None else req.lora_name
                want_ids, want_lps = peft_greedy(peft_models[name]["unmerged"], p, max_new)
                got = out.outputs[0]
                assert got.token_ids == want_ids, name
                got_lps = [pos[t].logprob for pos, t in zip(got.logprobs, got.token_ids,
                                                            strict=True)]
                np.testing.assert_allclose(got_lps, want_lps, atol=atol)
        assert llm.get_stats().prefix_cache_hits > 0  # round 2 did hit: same adapter, same prompt
        # An adapter whose data is broken although its header is fine passes the API check and
        # fails in the worker: its request ends with "error", its batch neighbours are served.
        broken = tmp_path / "broken"
        shutil.copytree(lora_adapters["chat"], broken)
        weights = broken / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
        outs = llm.generate([shared, shared], SamplingParams(temperature=0.0, max_tokens=max_new,
                                                             ignore_eos=True), use_tqdm=False,
                            lora_request=[LoRARequest("broken", 77, str(broken)), lora["sql"]])
        assert outs[0].outputs[0].finish_reason == "error"
        assert outs[1].outputs[0].token_ids == peft_greedy(peft_models["sql"]["unmerged"],
                                                           shared, max_new)[0]
        with pytest.raises(ValueError, match="not found"):  # refused; the engine keeps serving
            llm.generate([[5, 6]], lora_request=LoRARequest("x", 9, "/nonexistent"),
                         use_tqdm=False)
        assert llm.generate([[5, 6]], SamplingParams(max_tokens=2), lora_request=lora["chat"],
                            use_tqdm=False)[0].outputs[0].token_ids


def test_bad_lora_requests_are_rejected(tiny_models, lora_adapters, tmp_path) -> None:
    """Rank above max_lora_rank, missing files, unsupported settings or modules, LoRA off:
    ValueError naming the problem, raised in the API process before anything reaches a worker."""
    def processor(**kw) -> Processor:
        cfg = EngineConfig.create(tiny_models["llama"], **kw)
        return Processor(cfg, Tokenizer.from_pretrained(tiny_models["llama"]))

    on = processor(enable_lora=True, max_lora_rank=4)
    sql, chat = refs(lora_adapters)["sql"], refs(lora_adapters)["chat"]
    params = SamplingParams()
    with pytest.raises(ValueError, match="LoRA rank exceeds maximum"):
        on.make_request("r", [5, 6], params, lora=sql)
    with pytest.raises(ValueError, match="not found"):
        on.make_request("r", [5, 6], params, lora=LoRARef("x", 9, str(tmp_path / "none")))
    dora = tmp_path / "dora"
    shutil.copytree(lora_adapters["chat"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        on.make_request("r", [5, 6], params, lora=LoRARef("d", 9, str(dora)))
    head = tmp_path / "head"
    shutil.copytree(lora_adapters["chat"], head)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)},
              str(head / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unsupported target module"):
        on.make_request("r", [5, 6], params, lora=LoRARef("h", 9, str(head)))
    assert on.make_request("r", [5, 6], params, lora=chat).lora == chat
    with pytest.raises(ValueError, match="not enabled"):
        processor().make_request("r", [5, 6], params, lora=chat)


def test_lora_on_a_quantized_base_matches_peft_on_the_dequantized_model(
        tiny_models, lora_adapters, tmp_path) -> None:
    """LoRA over a GPTQ (W4A16) base: the engine equals peft on a transformers model holding the
    same dequantized weights (weight-only quantization, so the match is exact up to fp32)."""
    from peft import PeftModel
    from quant_ckpt import write_quantized

    quant_dir, deq_dir = write_quantized(tiny_models["llama"], tmp_path / "gptq", "gptq")
    base = AutoModelForCausalLM.from_pretrained(deq_dir, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, lora_adapters["sql"]).eval()
    adapter = LoRARequest("sql", 1, lora_adapters["sql"])
    prompts = [prompt(9, seed=21), prompt(23, seed=22)]
    with LLM(quant_dir, enable_lora=True, max_loras=1, max_lora_rank=8,
             dtype="float32") as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, logprobs=0,
                                                    ignore_eos=True),
                            use_tqdm=False, lora_request=adapter)
    for p, out in zip(prompts, outs, strict=True):
        want_ids, want_lps = peft_greedy(ref, p, 6)
        got = out.outputs[0]
        assert got.token_ids == want_ids
        got_lps = [pos[t].logprob for pos, t in zip(got.logprobs, got.token_ids, strict=True)]
        np.testing.assert_allclose(got_lps, want_lps, atol=ATOL)
    with ref.disable_adapter():  # the adapter matters: without it the reference differs
        assert [peft_greedy(ref, p, 6)[0] for p in prompts] != [o.outputs[0].token_ids
                                                                for o in outs]

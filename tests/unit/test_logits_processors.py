"""Batch-level logits processors: BatchUpdate semantics, built-ins, adapter, loading (CPU).

Dimension legend: B persistent-batch rows, N sampling rows, V vocabulary.
"""

from __future__ import annotations

import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sampling.batch_logits import BatchLogits
from sampling.logits import LogitsProcessors
from sampling.logits_processor import (
    ENTRY_POINT_GROUP,
    BatchUpdate,
    MoveDirectionality,
    ProcessorContext,
    load_logits_processors,
    processor_fqcn,
    resolve_processor,
)
from sampling.params import SamplingParams
from workers.persistent_batch import PersistentBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
from lp_plugins import BanOutputRepeatsAdapter, TargetTokenLogitsProcessor  # noqa: E402

V = 12
EOS = 11
CTX = ProcessorContext(vocab_size=V, eos_token_ids=(EOS,), max_num_seqs=8)
CPU = torch.device("cpu")


def apply_update(model: dict[int, str], update: BatchUpdate | None) -> None:
    """The contract, written independently: removes, then adds, then moves in order."""
    if update is None:
        return
    for i in update.removed:
        del model[i]
    for i, params, _, _ in update.added:
        model[i] = params.extra_args["req"]
    for a, b, direction in update.moved:
        a_val, b_val = model.pop(a), model.pop(b, None)
        model[b] = a_val
        if direction is MoveDirectionality.SWAP:
            assert b_val is not None
            model[a] = b_val
        else:
            assert b_val is None, "a unidirectional move must land in an empty slot"


@pytest.mark.parametrize("seed", range(5))
def test_batch_update_property_random_add_finish(seed):
    """Random arrivals, departures and swaps: a model that only replays BatchUpdates always
    equals the runner's batch, which stays contiguous."""
    rng = random.Random(seed)
    batch = PersistentBatch()
    model: dict[int, str] = {}
    live: list[str] = []
    counter = 0
    for _ in range(300):
        finished = rng.sample(live, rng.randint(0, len(live))) if rng.random() < 0.5 else []
        finished += ["never-seen"] if rng.random() < 0.1 else []  # unknown ids are ignored
        new = []
        for _ in range(rng.choice([0, 0, 1, 2, 5])):
            rid = f"r{counter}"
            counter += 1
            new.append((rid, SamplingParams(extra_args={"req": rid}), [1], []))
        size_after = len(set(live) - set(finished)) + len(new)
        swaps = []
        if rng.random() < 0.2 and size_after >= 2:  # reordering, in post-condense indices
            swaps = [tuple(rng.sample(range(size_after), 2)) for _ in range(rng.randint(1, 3))]
        expected_none = not new and not set(finished) & set(live) and not swaps
        update = batch.update(finished, new, swaps)
        assert (update is None) == expected_none
        apply_update(model, update)
        live = [r for r in live if r not in finished] + [n[0] for n in new]
        assert batch.req_ids == [model[i] for i in range(len(model))]
        assert sorted(batch.req_ids) == sorted(live)
        assert batch.index == {r: i for i, r in enumerate(batch.req_ids)}
        if update is not None:
            assert update.batch_size == len(live)
            assert not set(update.removed) & {i for i, *_ in update.added}


def test_adds_fill_lowest_holes_then_append_and_condense_from_the_top():
    batch = PersistentBatch()
    new = [(r, SamplingParams(), [], []) for r in "abcdef"]
    batch.update([], new)
    update = batch.update(["b", "d", "e"], [("g", SamplingParams(), [], [])])
    assert [i for i, *_ in update.added] == [1]  # g takes b's slot, the lowest hole
    assert update.removed == [3, 4]
    assert update.moved == [(5, 3, MoveDirectionality.UNIDIRECTIONAL)]  # f fills 3; 4 is cut
    assert batch.req_ids == ["a", "g", "c", "f"] and update.batch_size == 4


def test_target_token_processor_follows_rows():
    lp = TargetTokenLogitsProcessor(CTX, CPU, False)
    batch = PersistentBatch()
    targets = {"a": 3, "b": None, "c": 7}
    lp.update_state(batch.update([], [
        (r, SamplingParams(extra_args={"target_token": t} if t else None), [], [])
        for r, t in targets.items()]))
    lp.update_state(batch.update(["a"], []))  # c moves from 2 to 0
    out = lp.apply(torch.zeros(2, V))
    assert out[0].argmax() == 7 and torch.isinf(out[0]).sum() == V - 1
    assert torch.all(out[1] == 0)  # b has no target: untouched


def test_adapter_runs_per_request_callables_with_live_outputs():
    lp = BanOutputRepeatsAdapter(CTX, CPU, False)
    outputs = [[2, 5], [4]]
    lp.update_state(BatchUpdate(batch_size=2, added=[
        (0, SamplingParams(extra_args={"no_repeat": True}), [1], outputs[0]),
        (1, SamplingParams(), [1], outputs[1])]))
    outputs[0].append(9)  # the runner appends in place: the callable sees it next step
    out = lp.apply(torch.zeros(2, V))
    assert set(torch.nonzero(torch.isinf(out[0])).flatten().tolist()) == {2, 5, 9}
    assert torch.all(out[1] == 0)
    lp.update_state(BatchUpdate(batch_size=0, removed=[0, 1]))
    assert torch.all(lp.apply(torch.zeros(2, V)) == 0)


def test_builtins_over_a_persistent_batch_match_the_one_off_batch():
    """min_tokens / logit_bias / min_p tracked through adds, removes and moves give the same
    logits as a fresh one-off batch of the same rows; sampling rows may be a subset (scatter)."""
    rng = random.Random(0)
    batch, procs = PersistentBatch(), BatchLogits.create(CTX, CPU)
    states: dict[str, tuple[SamplingParams, list[int]]] = {}
    for step in range(40):
        finished = rng.sample(sorted(states), rng.randint(0, min(2, len(states))))
        for r in finished:
            del states[r]
        new = []
        for k in range(rng.randint(0, 3)):
            p = SamplingParams(min_tokens=rng.choice([0, 2]), temperature=0.8,
                               logit_bias={rng.randrange(V): 1.5} if rng.random() < 0.5 else None,
                               min_p=rng.choice([0.0, 0.3]))
            states[f"{step}-{k}"] = (p, [])
            new.append((f"{step}-{k}", p, [1], states[f"{step}-{k}"][1]))
        procs.update_state(batch.update(finished, new))
        for _, out in states.values():
            out.append(rng.randrange(EOS))
        sampling = sorted(rng.sample(batch.req_ids, rng.randint(0, batch.batch_size)),
                          key=batch.index.__getitem__)
        if not sampling:
            continue
        procs.set_step_rows([batch.index[r] for r in sampling])
        logits = torch.randn(len(sampling), V)
        params = [states[r][0] for r in sampling]
        outs = [states[r][1] for r in sampling]
        got, want = logits.clone(), logits.clone()
        LogitsProcessors(params, [[1]] * len(params), outs, [EOS], V, CPU, procs).apply(got)
        procs.apply(got, argmax_invariant=True)
        fresh = BatchLogits.for_rows(params, [[1]] * len(params), outs, [EOS], V, CPU)
        LogitsProcessors(params, [[1]] * len(params), outs, [EOS], V, CPU, fresh).apply(want)
        fresh.apply(want, argmax_invariant=True)
        assert torch.equal(got, want), step


def test_loading_by_fqcn_class_and_entry_point(tmp_path, monkeypatch):
    fqcn = "lp_plugins:TargetTokenLogitsProcessor"
    assert resolve_processor(fqcn) is TargetTokenLogitsProcessor
    assert resolve_processor("lp_plugins.TargetTokenLogitsProcessor") is \
        TargetTokenLogitsProcessor
    assert processor_fqcn(TargetTokenLogitsProcessor) == fqcn
    with pytest.raises(ValueError, match="not a LogitsProcessor"):
        resolve_processor("lp_plugins:NotAProcessor")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_processor("no_such_module_xyz:Thing")

    class Local(TargetTokenLogitsProcessor):
        pass
    with pytest.raises(ValueError, match="top level"):
        processor_fqcn(Local)
    # An installed distribution declaring the entry-point group is always loaded.
    dist = tmp_path / "lp_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lp-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        adapter = lp_plugins:BanOutputRepeatsAdapter
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_logits_processors([fqcn]) == [BanOutputRepeatsAdapter, TargetTokenLogitsProcessor]


def test_validate_params_rejects_bad_extra_args():
    TargetTokenLogitsProcessor.validate_params(SamplingParams(extra_args={"target_token": 3}))
    with pytest.raises(ValueError, match="target_token"):
        TargetTokenLogitsProcessor.validate_params(
            SamplingParams(extra_args={"target_token": "x"}))


def test_vllm_xargs_become_extra_args_and_only_take_scalars_or_lists():
    import msgspec

    from frontend import openai as api

    for cls in (api.CompletionRequest, api.ChatCompletionRequest):
        body = {"prompt": "x"} if cls is api.CompletionRequest else {
            "messages": [{"role": "user", "content": "x"}]}
        req = msgspec.json.decode(msgspec.json.encode(
            {**body, "model": "m", "vllm_xargs": {"target_token": 3, "w": [1.5, "a"]}}), type=cls)
        assert req.to_sampling_params(default_max_tokens=4).extra_args == {
            "target_token": 3, "w": [1.5, "a"]}
        with pytest.raises(msgspec.ValidationError, match="vllm_xargs"):
            msgspec.json.decode(msgspec.json.encode(
                {**body, "model": "m", "vllm_xargs": {"a": {"nested": 1}}}), type=cls)

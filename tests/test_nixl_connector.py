"""Disaggregated prefill with the NIXL connector (UCX on CPU), offline, real processes: a
prefill instance P holds each prompt's blocks; a decode instance D reads them over NIXL from P's
registered KV cache, and must then produce exactly what one plain instance produces; P frees the
blocks once D has read them, or after its timeout when no D comes.

Every instance runs batch-invariant: one plain instance computes a prompt in one forward, D in
two (the read blocks, then the rest), which otherwise differ in the last bits of fp32 logprobs."""

from __future__ import annotations

import socket
import time

import msgspec
import pytest
import torch
import zmq

from enginecore.config import EngineConfig
from enginecore.protocol import NixlAgentInfo, NixlHello, encode, nixl_side_channel_decoder
from frontend import LLM
from sampling.params import SamplingParams
from workers.nixl_worker import import_nixl

try:
    import_nixl()
except ImportError:
    pytest.skip("the nixl package is not installed", allow_module_level=True)
pytestmark = pytest.mark.timeout(180)

BLOCK = 16
ENGINE = {"num_gpu_blocks_override": 64, "max_model_len": 512, "block_size": BLOCK,
          "dtype": "float32", "batch_invariant": True}
PROMPTS = [[(7 * i + 3 * j) % 500 + 10 for j in range(40 + 13 * i)] for i in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nixl(**fields) -> dict:
    return {"kv_connector": "NixlConnector", "kv_role": "kv_both",
            "side_channel_port": free_port(), **fields}


def greedy(kv_transfer_params=None, max_tokens: int = 6) -> SamplingParams:
    extra = None if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params}
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2,
                          extra_args=extra)


def prefill(llm: LLM, prompts) -> list[dict]:
    """What pd_proxy does on P: one token with do_remote_decode; the answers' params."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        greedy({"do_remote_decode": True}, max_tokens=1), use_tqdm=False)
    return [msgspec.to_builtins(o.kv_transfer_params) for o in outs]


def side_channel(port: int, hello: NixlHello) -> NixlAgentInfo:
    """Ask a producer rank's side channel what a consumer rank asks it."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.REQ) as sock:
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(encode(hello))
        return nixl_side_channel_decoder.decode(sock.recv())


def wait_kv_usage_zero(llm: LLM, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (usage := llm.get_stats().kv_cache_usage) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return usage


def test_decode_reads_prefill_kv_and_matches_one_instance(tiny_model_dir):
    single = LLM(tiny_model_dir, **ENGINE)
    try:
        reference = single.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(),
                                    use_tqdm=False)
    finally:
        single.shutdown()
    p_config = nixl()
    p = LLM(tiny_model_dir, **ENGINE, kv_transfer_config=p_config)
    d = LLM(tiny_model_dir, **ENGINE, kv_transfer_config=nixl())
    try:
        params = prefill(p, PROMPTS)
        # P's rank 0 registered its cache where it lives: VRAM on a GPU, DRAM on the CPU.
        info = side_channel(p_config["side_channel_port"], NixlHello(tp_rank=0, tp_size=1))
        assert info.error is None and info.num_blocks == 64 and info.num_planes == 2
        assert info.mem_type == ("VRAM" if torch.cuda.is_available() else "DRAM")
        assert info.engine_id == params[0]["remote_engine_id"] and len(info.base_addrs) > 1
        refused = side_channel(p_config["side_channel_port"], NixlHello(tp_rank=0, tp_size=2))
        assert "tp_size" in refused.error
        assert [len(x["remote_block_ids"]) for x in params] == [len(q) // BLOCK for q in PROMPTS]
        assert p.get_stats().kv_cache_usage > 0  # held for D
        # The last prompt reads the third one's blocks instead of its own: its answer must
        # change, so the equality of the others is not D quietly recomputing.
        swapped = {**params[3], "remote_block_ids": params[2]["remote_block_ids"]}
        outs = d.generate([{"prompt_token_ids": q} for q in PROMPTS],
                          [greedy(x) for x in params[:3]] + [greedy(swapped)], use_tqdm=False)
        for out, ref in zip(outs[:3], reference[:3], strict=True):
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids
            assert out.outputs[0].logprobs == ref.outputs[0].logprobs  # bitwise
        assert outs[3].outputs[0].token_ids != reference[3].outputs[0].token_ids
        # D computed none of the read blocks (never the last prompt token).
        assert [o.num_cached_tokens for o in outs] == [(len(q) - 1) // BLOCK * BLOCK
                                                       for q in PROMPTS]
        assert all(r.num_cached_tokens == 0 for r in reference)
        # D's notifications reached P: every held block is free again, long before the timeout.
        assert wait_kv_usage_zero(p, timeout=10) == 0
        # Block ids P does not have: D computes the prompt itself, and still tells P to free.
        fresh = [t + 1 for t in PROMPTS[1]]
        plain = p.generate([{"prompt_token_ids": fresh}], greedy(), use_tqdm=False)[0]
        (params,) = prefill(p, [fresh])
        bad = {**params, "remote_block_ids": [1000 + b for b in params["remote_block_ids"]]}
        out = d.generate([{"prompt_token_ids": fresh}], greedy(bad), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids
        assert out.num_cached_tokens == 0
        assert wait_kv_usage_zero(p, timeout=10) == 0
    finally:
        d.shutdown()
        p.shutdown()


def test_unread_blocks_expire_and_unreachable_producer_falls_back(tiny_model_dir):
    p = LLM(tiny_model_dir, **ENGINE, kv_transfer_config=nixl(abort_request_timeout=1.0))
    try:
        (params,) = prefill(p, PROMPTS[:1])
        assert p.get_stats().kv_cache_usage > 0
        assert wait_kv_usage_zero(p, timeout=10) == 0  # no D read them: the timeout freed them
        single = p.generate([{"prompt_token_ids": PROMPTS[0]}], greedy(), use_tqdm=False)[0]
    finally:
        p.shutdown()
    d = LLM(tiny_model_dir, **ENGINE, kv_transfer_config=nixl(kv_role="kv_consumer"))
    try:
        # P is gone: D computes the prompt itself (logged), the engine lives on.
        out = d.generate([{"prompt_token_ids": PROMPTS[0]}], greedy(params), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == single.outputs[0].token_ids
        assert out.num_cached_tokens == 0
        # Bad params are refused up front, naming the field.
        for bad, field in [({**params, "tp_size": 2}, "tp_size"),
                           ({**params, "remote_host": None}, "remote_host"),
                           ({**params, "remote_block_ids": "1,2"}, "remote_block_ids")]:
            with pytest.raises(ValueError, match=field):
                d.generate([{"prompt_token_ids": PROMPTS[0]}], greedy(bad), use_tqdm=False)
        assert d.generate([{"prompt_token_ids": PROMPTS[1]}], greedy(), use_tqdm=False)
    finally:
        d.shutdown()


@pytest.mark.parametrize("fields, match", [
    ({"side_channel_port": 0}, "side_channel_port"),
    ({"abort_request_timeout": 0}, "abort_request_timeout"),
    ({"kv_connector_extra_config": {"backends": "UCX"}}, "backends"),
])
def test_bad_nixl_config_names_the_field(tiny_model_dir, fields, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.create(tiny_model_dir, kv_transfer_config={**nixl(), **fields})


def test_tensor_parallel_ranks_read_from_their_peer_ranks(tiny_model_dir):
    """TP=2 on both sides (gloo, CPU): D's rank r reads P's rank r's half of the kv heads."""
    engine = {**ENGINE, "tensor_parallel_size": 2, "device": "cpu"}
    p = LLM(tiny_model_dir, **engine, kv_transfer_config=nixl())
    d = LLM(tiny_model_dir, **engine, kv_transfer_config=nixl())
    try:
        prompts = PROMPTS[:2]
        # P's plain answers are the reference (computed whole); its prefill then hits them.
        reference = p.generate([{"prompt_token_ids": q} for q in prompts], greedy(),
                               use_tqdm=False)
        params = prefill(p, prompts)
        assert all(x["tp_size"] == 2 for x in params)
        outs = d.generate([{"prompt_token_ids": q} for q in prompts],
                          [greedy(x) for x in params], use_tqdm=False)
        for out, ref in zip(outs, reference, strict=True):
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids
            assert out.outputs[0].logprobs == ref.outputs[0].logprobs
        assert [o.num_cached_tokens for o in outs] == [(len(q) - 1) // BLOCK * BLOCK
                                                       for q in prompts]
        assert wait_kv_usage_zero(p, timeout=10) == 0
    finally:
        d.shutdown()
        p.shutdown()

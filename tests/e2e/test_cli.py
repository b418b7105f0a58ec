"""The `serve` command line is generated from the config structs: every field is a flag, the
field comments are the help, and what the user set reaches `EngineConfig.create`."""

from __future__ import annotations

import msgspec
import pytest

from enginecore.config import EngineConfig
from frontend.cli import ENGINE_STRUCTS, ServerConfig, build_parser, parse_serve_args


def test_every_config_field_is_a_flag_with_help():
    parser, engine_dests, server_dests = build_parser()
    derived = {"model", "architecture", "vocab_size", "eos_token_ids", "hidden_size"}
    fields = {f.name for s in ENGINE_STRUCTS for f in msgspec.structs.fields(s)} - derived
    assert set(engine_dests) == fields
    assert set(server_dests) == {f.name for f in msgspec.structs.fields(ServerConfig)}
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["block_size"].startswith("tokens per KV block")  # a trailing comment
    assert "by bytes" in helps["kv_cache_memory_bytes"]  # the comment line above the field
    assert "Bearer" in helps["api_key"]
    text = parser.format_help()
    for flag in ("--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
                 "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--gpu-memory-utilization", "--num-gpu-blocks-override",
                 "--kv-cache-memory-bytes", "--dtype", "--seed", "--tensor-parallel-size", "-tp",
                 "--scheduling-policy", "--enable-chunked-prefill", "--device", "--host",
                 "--port", "--api-server-count", "--api-key", "--served-model-name",
                 "--max-log-len"):
        assert f" {flag}" in text, flag


def test_parsed_flags_build_the_configs(tiny_model_dir):
    model, engine_kwargs, server = parse_serve_args([
        tiny_model_dir, "--max-num-seqs", "4", "--no-enable-prefix-caching", "-tp", "1",
        "--scheduling-policy", "priority", "--max-model-len", "512", "--port", "0",
        "--api-server-count", "3", "--served-model-name", "a", "b", "--api-key", "k"])
    assert model == tiny_model_dir
    # Only what was set: defaults stay with the structs.
    assert engine_kwargs == {"max_num_seqs": 4, "enable_prefix_caching": False,
                             "tensor_parallel_size": 1, "policy": "priority",
                             "max_model_len": 512}
    config = EngineConfig.create(model, **engine_kwargs)
    assert config.scheduler.policy == "priority" and not config.cache.enable_prefix_caching
    assert config.cache.block_size == 16 and config.model.max_model_len == 512
    assert server == ServerConfig(port=0, api_server_count=3, served_model_name=["a", "b"],
                                  api_key="k")
    assert parse_serve_args([])[0] is None  # no MODEL: the demo checkpoint


@pytest.mark.parametrize("argv", [
    ["--port", "70000"], ["--api-server-count", "0"], ["--scheduling-policy", "lifo"],
    ["--max-num-seqs", "many"],
])
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_serve_args(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err

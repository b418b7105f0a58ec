"""LoRA configuration surface: flags, --lora-modules forms, LoRAConfig validation, the torch-free
adapter check, resolvers, and the protocol fields that carry adapters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
from safetensors.numpy import save_file

from enginecore.config import EngineConfig, Env, LoRAConfig
from enginecore.lora_adapter import inspect_lora_adapter
from enginecore.protocol import (
    AddRequest,
    CachedReqs,
    Control,
    ExecuteStep,
    LoRARef,
    NewReq,
    core_input_decoder,
    encode,
    worker_input_decoder,
)
from frontend.cli import parse_serve_args
from frontend.lora import (
    FilesystemResolver,
    LoRAModels,
    LoRARequest,
    lora_int_id,
    parse_lora_modules,
)
from sampling.params import SamplingParams

# A tiny model's config.json: hidden 8, 2 heads of 4 (1 kv head), intermediate 16, 2 layers.
HF = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
      "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
      "num_key_value_heads": 1, "max_position_embeddings": 64}


def write_adapter(root: Path, rank: int = 2, shapes: dict[str, list[int]] | None = None,
                  **cfg: object) -> str:
    root.mkdir(parents=True, exist_ok=True)
    prefix = "base_model.model.model.layers.0.self_attn"
    shapes = shapes or {f"{prefix}.q_proj.lora_A.weight": [rank, 8],
                        f"{prefix}.q_proj.lora_B.weight": [8, rank],
                        f"{prefix}.k_proj.lora_A.weight": [rank, 8],
                        f"{prefix}.k_proj.lora_B.weight": [4, rank]}
    save_file({k: np.zeros(v, np.float32) for k, v in shapes.items()},
              str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8, **cfg}))
    return str(root)


@pytest.fixture()
def model_dir(tmp_path: Path) -> str:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(HF))
    return str(tmp_path / "model")


def test_inspect_reads_rank_scaling_and_shapes(tmp_path, model_dir) -> None:
    info = inspect_lora_adapter(write_adapter(tmp_path / "a"), 8, model_dir)
    assert info.rank == 2 and info.scaling == 4.0
    assert {(layer, mod, kind) for layer, mod, kind, _ in info.tensors.values()} == {
        (0, "q_proj", "A"), (0, "q_proj", "B"), (0, "k_proj", "A"), (0, "k_proj", "B")}
    rs = inspect_lora_adapter(write_adapter(tmp_path / "rs", rank=4, use_rslora=True), 8)
    assert rs.scaling == 4.0  # 8 / sqrt(4)


def test_inspect_refuses_what_we_cannot_serve(tmp_path, model_dir) -> None:
    with pytest.raises(ValueError, match="rank exceeds maximum"):
        inspect_lora_adapter(write_adapter(tmp_path / "big", rank=16), 8)
    wrong = {"base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": [8, 2]}
    with pytest.raises(ValueError, match="does not fit the base model"):
        inspect_lora_adapter(write_adapter(tmp_path / "w", shapes=wrong), 8, model_dir)
    deep = {"base_model.model.model.layers.5.mlp.down_proj.lora_A.weight": [2, 16]}
    with pytest.raises(ValueError, match="does not fit the base model"):
        inspect_lora_adapter(write_adapter(tmp_path / "d", shapes=deep), 8, model_dir)
    emb = {"base_model.model.model.embed_tokens.lora_embedding_A": [2, 10]}
    with pytest.raises(ValueError, match="unsupported target module"):
        inspect_lora_adapter(write_adapter(tmp_path / "e", shapes=emb), 8)
    with pytest.raises(ValueError, match="bias"):
        inspect_lora_adapter(write_adapter(tmp_path / "b", bias="all"), 8)
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(ValueError, match="Invalid adapter configuration"):
        inspect_lora_adapter(str(tmp_path / "nocfg"), 8)
    with pytest.raises(ValueError, match="not found"):
        inspect_lora_adapter(str(tmp_path / "missing"), 8)


def test_lora_config_validation(model_dir) -> None:
    cfg = EngineConfig.create(model_dir, enable_lora=True, max_loras=4, max_lora_rank=64)
    assert cfg.lora == LoRAConfig(enable_lora=True, max_loras=4, max_lora_rank=64)
    assert cfg.lora.cpu_capacity == 4
    assert EngineConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineConfig.create(model_dir, max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineConfig.create(model_dir, max_lora_rank=0)
    with pytest.raises(ValueError, match="max_loras"):
        EngineConfig.create(model_dir, max_loras=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig.create(model_dir, enable_lora=True, tensor_parallel_size=2)
    moe = Path(model_dir).parent / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({**HF, "architectures": ["Qwen3MoeForCausalLM"]}))
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM"):
        EngineConfig.create(str(moe), enable_lora=True)
    EngineConfig.create(str(moe))  # fine without LoRA


def test_serve_flags_and_lora_modules() -> None:
    spec = json.dumps({"name": "chat", "path": "/a/chat", "base_model_name": "base"})
    model, engine, server = parse_serve_args(
        ["m", "--enable-lora", "--max-loras", "3", "--max-lora-rank", "32", "--max-cpu-loras",
         "5", "--lora-modules", "sql=/a/sql", spec])
    assert engine == {"enable_lora": True, "max_loras": 3, "max_lora_rank": 32,
                      "max_cpu_loras": 5}
    sql, chat = parse_lora_modules(server.lora_modules, "m")
    assert (sql.lora_name, sql.lora_path, sql.base_model_name) == ("sql", "/a/sql", "m")
    assert (chat.lora_name, chat.lora_path, chat.base_model_name) == ("chat", "/a/chat", "base")
    assert sql.lora_int_id == lora_int_id("sql", "/a/sql") != chat.lora_int_id
    for bad in ("nopath", "=x", '{"name": "x"}'):
        with pytest.raises(ValueError, match="lora_modules"):
            parse_lora_modules([bad], "m")
    with pytest.raises(SystemExit):
        parse_serve_args(["m", "--lora-modules", "broken"])


def test_lora_request_and_filesystem_resolver(tmp_path) -> None:
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/p")
    write_adapter(tmp_path / "found")
    resolver = FilesystemResolver(str(tmp_path))
    found = asyncio.run(resolver.resolve_lora("base", "found"))
    assert found is not None and found.lora_path == str(tmp_path / "found")
    assert found.base_model_name == "base"
    for name in ("absent", "../found", ".hidden"):
        assert asyncio.run(resolver.resolve_lora("base", name)) is None


def test_protocol_carries_adapters() -> None:
    ref = LoRARef(name="sql", int_id=7, path="/a/sql")
    add = AddRequest("r", [1, 2], SamplingParams(), lora=ref)
    assert core_input_decoder.decode(encode(add)).lora == ref
    ctl = Control(call_id=1, op="remove_lora", lora=ref)
    assert core_input_decoder.decode(encode(ctl)) == ctl
    step = ExecuteStep(1, [NewReq("r", [1], SamplingParams(), [0], 0, lora=ref)], CachedReqs(),
                       {"r": 1}, removed_loras=[3])
    back = worker_input_decoder.decode(encode(step))
    assert back.new[0].lora == ref and back.removed_loras == [3]
    # A message without the trailing field (an older sender) decodes with no adapter.
    plain = msgspec.msgpack.decode(encode(AddRequest("r", [1, 2], SamplingParams())))
    assert core_input_decoder.decode(msgspec.msgpack.encode(plain[:-1])).lora is None
    assert core_input_decoder.decode(encode(plain)).lora is None


PLUGIN = """
from frontend.lora import LoRARequest, register_lora_resolver

class Table:
    async def resolve_lora(self, base_model_name, lora_name):
        if lora_name == "plugged":
            return LoRARequest("plugged", 99, {path!r}, base_model_name)
        return None

register_lora_resolver("table", Table())
"""


def test_resolver_plugin_serves_unknown_names(tmp_path, model_dir, monkeypatch) -> None:
    """A --lora-resolver-plugin file registers a resolver; lookups use it only when runtime
    updates are allowed, keep what it finds, and still check the adapter."""
    adapter = write_adapter(tmp_path / "plug")
    (tmp_path / "plugin.py").write_text(PLUGIN.format(path=adapter))
    _, _, server = parse_serve_args(["m", "--lora-resolver-plugin", str(tmp_path / "plugin.py")])
    cfg = EngineConfig.create(model_dir, enable_lora=True, max_lora_rank=8)
    models = LoRAModels(cfg, "base", [])
    assert asyncio.run(models.lookup("plugged")) is None  # switch off
    monkeypatch.setattr(Env, "ALLOW_RUNTIME_LORA_UPDATING", True)
    found = asyncio.run(models.lookup("plugged"))
    assert found is not None and found.lora_path == adapter and "plugged" in models.adapters
    assert asyncio.run(models.lookup("other")) is None
    small = LoRAModels(EngineConfig.create(model_dir, enable_lora=True, max_lora_rank=1),
                       "base", [])
    with pytest.raises(ValueError, match="rank exceeds"):
        asyncio.run(small.lookup("plugged"))

"""`EngineConfig`: the one configuration object, shared by every process.

Leaf module (imports only `msgspec` and the stdlib). It travels to the engine core and the
workers as JSON on their command line, so every field is plain data. This is also the only module
that reads environment variables (see `Env`).

`EngineConfig.create(...)` fills the derived fields (max_model_len, vocab size, EOS ids) from the
checkpoint's `config.json` / `generation_config.json`, so no process needs transformers for that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal

import msgspec


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    model: str  # directory holding config.json + *.safetensors
    tokenizer: str | None = None  # defaults to `model`
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 ("auto": bf16 on GPU, fp32 on CPU)
    max_model_len: int = 0  # 0: the checkpoint's max_position_embeddings
    seed: int = 0
    load_format: Literal["auto", "dummy"] = "auto"  # dummy: random weights, config.json only
    enforce_eager: bool = False  # never capture CUDA graphs
    # most logprobs / prompt_logprobs per position a request may ask for (-1: up to the vocab)
    max_logprobs: int = 20
    # Derived from the checkpoint by `EngineConfig.create`.
    architecture: str = ""
    vocab_size: int = 0
    eos_token_ids: list[int] = []


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # CPU has no memory profiler worth trusting: size the KV cache by bytes instead.
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None  # exact block count (tests force preemption with it)


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # per-step token budget
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    # Schedule step N+1 while the workers run step N (one step in flight ahead); off: one step
    # at a time. Both give the same tokens.
    async_scheduling: bool = True


class ParallelConfig(msgspec.Struct, frozen=True, kw_only=True):
    tensor_parallel_size: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # MoE: shard whole experts across the tensor-parallel ranks instead of slicing every expert
    # (issue #13); with tensor_parallel_size 1 it changes nothing.
    enable_expert_parallel: bool = False
    # ---- data parallel (docs/parallelism.md): independent engine cores behind the API servers
    # engine cores (DP ranks) in the whole deployment, each with its own workers and KV cache
    data_parallel_size: int = 1
    # DP ranks run on this node (default: all of them)
    data_parallel_size_local: int | None = None
    # first DP rank this node runs (a headless node sets it)
    data_parallel_start_rank: int = 0
    # the head node's address: it binds the registration port there; headless nodes connect to it
    data_parallel_address: str = "127.0.0.1"
    # the head node's registration (handshake) port for engine cores on other nodes
    data_parallel_rpc_port: int = 29550

    @property
    def local_dp_size(self) -> int:
        """DP ranks on this node."""
        if self.data_parallel_size_local is None:
            return self.data_parallel_size - self.data_parallel_start_rank
        return self.data_parallel_size_local

    def validate_data_parallel(self) -> None:
        """Raise ValueError naming the data-parallel field that is out of range."""
        size, start = self.data_parallel_size, self.data_parallel_start_rank
        if size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {size}")
        if not 0 <= start < size:
            raise ValueError(f"data_parallel_start_rank must be in [0, {size}), got {start}")
        if not 0 <= self.local_dp_size <= size - start:
            raise ValueError(f"data_parallel_size_local must be in [0, data_parallel_size - "
                             f"data_parallel_start_rank = {size - start}], got "
                             f"{self.local_dp_size}")
        if not 0 < self.data_parallel_rpc_port < 65536:
            raise ValueError(f"data_parallel_rpc_port must be in [1, 65535], got "
                             f"{self.data_parallel_rpc_port}")


class StructuredOutputsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """`--structured-outputs-config`: engine-wide settings of structured outputs."""

    backend: str = "auto"  # auto | guidance (llguidance, the only one implemented)
    # Defaults OR-ed into every request's StructuredOutputsParams of the same name.
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False


class KVTransferConfig(msgspec.Struct, frozen=True, kw_only=True):
    """`--kv-transfer-config`: disaggregated prefill (docs/parallelism.md). A producer instance
    (prefill) writes the KV of every full prompt block it computes to a store; a consumer
    (decode) loads the blocks it finds there instead of computing them."""

    kv_connector: str = "SharedMemoryConnector"  # SharedMemoryConnector | NixlConnector
    kv_role: Literal["kv_producer", "kv_consumer", "kv_both"] = "kv_both"
    kv_buffer_device: str = "cuda"  # vLLM's field; the shared-memory connector stages via host
    # SharedMemoryConnector: {"shm_path": dir shared by the instances, default /dev/shm/...}
    kv_connector_extra_config: dict[str, Any] = {}

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def store_dir(self, fingerprint: str) -> str:
        """The block store of this model: a subdirectory per model fingerprint, so instances
        of different models sharing `shm_path` never read each other's blocks."""
        root = self.kv_connector_extra_config.get("shm_path", "/dev/shm/tinyllm-kv")
        return str(Path(root) / hashlib.sha256(fingerprint.encode()).hexdigest()[:16])

    @staticmethod
    def block_file(store: str, key: str, rank: int) -> str:
        """File of one block (all layers) of tensor-parallel rank `rank`; key = block hash."""
        return str(Path(store) / f"{key}.r{rank}")

    def validate(self, prefix_caching: bool) -> None:
        """Raise ValueError naming the bad field."""
        if self.kv_connector == "NixlConnector":
            missing = importlib.util.find_spec("nixl") is None
            raise ValueError("kv_connector NixlConnector " + (
                "needs the `nixl` package, which is not installed" if missing else
                "is not implemented by this engine yet; use SharedMemoryConnector"))
        if self.kv_connector != "SharedMemoryConnector":
            raise ValueError(f"kv_connector {self.kv_connector!r} is unknown; choose "
                             "SharedMemoryConnector (same host) or NixlConnector")
        if not prefix_caching:
            raise ValueError("kv_transfer_config needs enable_prefix_caching: blocks are "
                             "named by their prefix-cache hash")


# vLLM's backends that this engine does not implement: named in the error a user gets.
_OTHER_BACKENDS = ("xgrammar", "outlines", "lm-format-enforcer")


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    structured_outputs: StructuredOutputsConfig = StructuredOutputsConfig()
    kv_transfer: KVTransferConfig | None = None  # disaggregated prefill; None: off

    @classmethod
    def create(cls, model: str, **kwargs: object) -> EngineConfig:
        """Build from flat vLLM-style keyword names (`max_num_seqs=...`) and validate.

        `structured_outputs_config` takes a StructuredOutputsConfig, a dict or its JSON text.
        """
        structured = _structured_outputs_config(kwargs.pop("structured_outputs_config", None))
        kv_transfer = _json_struct("kv_transfer_config", kwargs.pop("kv_transfer_config", None),
                                   KVTransferConfig)
        groups: dict[str, dict[str, object]] = {"model": {"model": model}, "cache": {},
                                                "scheduler": {}, "parallel": {}}
        owners = {name: group for group, struct in _GROUPS.items()
                  for name in struct.__struct_fields__}
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine argument {key!r}")
            if value is not None:
                groups[owners[key]][key] = value
        cfg = cls(model=ModelConfig(**groups["model"]), cache=CacheConfig(**groups["cache"]),
                  scheduler=SchedulerConfig(**groups["scheduler"]),
                  parallel=ParallelConfig(**groups["parallel"]), structured_outputs=structured,
                  kv_transfer=kv_transfer)
        return cfg.resolved()

    def resolved(self) -> EngineConfig:
        """Fill derived model fields from the checkpoint files, then validate."""
        info = read_checkpoint_info(self.model.model)
        max_len = self.model.max_model_len or info["max_position_embeddings"]
        if max_len > info["max_position_embeddings"]:
            raise ValueError(f"max_model_len={max_len} exceeds the model's "
                             f"max_position_embeddings={info['max_position_embeddings']}")
        model = msgspec.structs.replace(
            self.model, max_model_len=max_len, architecture=info["architecture"],
            vocab_size=info["vocab_size"], eos_token_ids=info["eos_token_ids"])
        cfg = msgspec.structs.replace(self, model=model)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        s, c = self.scheduler, self.cache
        if s.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if s.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not s.enable_chunked_prefill and s.max_num_batched_tokens < self.model.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= "
                             f"max_model_len ({self.model.max_model_len})")
        if c.block_size < 1 or c.block_size & (c.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {c.block_size}")
        if not 0.0 < c.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.model.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be >= -1, got {self.model.max_logprobs}")
        if self.parallel.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        self.parallel.validate_data_parallel()
        if self.kv_transfer is not None:
            self.kv_transfer.validate(self.cache.enable_prefix_caching)
        backend = self.structured_outputs.backend
        if backend not in ("auto", "guidance"):
            known = "a vLLM backend this engine does not implement" \
                if backend in _OTHER_BACKENDS else "unknown"
            raise ValueError(f"structured outputs backend {backend!r} is {known}; choose 'auto' "
                             "or 'guidance' (llguidance)")

    def dp_fingerprint(self) -> str:
        """What every data-parallel rank must agree on (nodes may keep the model elsewhere)."""
        m = self.model
        return (f"{m.architecture}/vocab={m.vocab_size}/len={m.max_model_len}/dtype={m.dtype}/"
                f"block={self.cache.block_size}/dp={self.parallel.data_parallel_size}")

    def kv_store_fingerprint(self) -> str:
        """What decides a KV block's bytes besides its tokens: instances sharing a KV store
        (disaggregated prefill) must agree on it."""
        m = self.model
        return (f"{Path(m.model).resolve()}/{m.architecture}/dtype={m.dtype}/"
                f"block={self.cache.block_size}/tp={self.parallel.tensor_parallel_size}")

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineConfig:
        return msgspec.json.decode(text, type=cls)


_GROUPS: dict[str, type[msgspec.Struct]] = {
    "model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
}


def _structured_outputs_config(value: object) -> StructuredOutputsConfig:
    if value is None or isinstance(value, StructuredOutputsConfig):
        return value or StructuredOutputsConfig()
    try:
        if isinstance(value, str | bytes):
            return msgspec.json.decode(value, type=StructuredOutputsConfig)
        return msgspec.convert(value, StructuredOutputsConfig)
    except msgspec.DecodeError as e:  # bad JSON, or a wrong field type
        raise ValueError(f"structured_outputs_config: {e}") from None


def _json_struct(name: str, value: object, struct: type[msgspec.Struct]):
    """A struct from itself, a dict or its JSON text (None stays None); ValueError names `name`."""
    if value is None or isinstance(value, struct):
        return value
    try:
        if isinstance(value, str | bytes):
            return msgspec.json.decode(value, type=struct)
        return msgspec.convert(value, struct)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"{name}: {e}") from None


def read_checkpoint_info(model_dir: str) -> dict:
    """Architecture, vocab size, context length and EOS ids from an HF checkpoint directory."""
    path = Path(model_dir)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model {model_dir!r}: no config.json (expected an HF checkpoint "
                                "directory)")
    hf = json.loads(cfg_file.read_text())
    text_cfg = hf.get("text_config", hf)
    eos: list[int] = []
    for source in (path / "generation_config.json", cfg_file):
        if source.is_file():
            value = json.loads(source.read_text()).get("eos_token_id")
            if value is not None:
                eos = [value] if isinstance(value, int) else list(value)
                break
    return {
        "architecture": (hf.get("architectures") or [""])[0],
        "vocab_size": int(text_cfg["vocab_size"]),
        "max_position_embeddings": int(text_cfg.get("max_position_embeddings", 2048)),
        "eos_token_ids": eos,
    }


class Env:
    """Every environment variable the engine reads, read here and nowhere else."""

    # Seconds without a heartbeat before a peer process counts as dead.
    PEER_TIMEOUT_S = float(os.environ.get("TLS_PEER_TIMEOUT_S", "5"))
    # Directory where the demo checkpoint is built and cached.
    CACHE_DIR = os.environ.get("TLS_CACHE_DIR", str(Path.home() / ".cache" / "tinyllm-serve"))
    # Log level for every process.
    LOG_LEVEL = os.environ.get("TLS_LOG_LEVEL", "INFO")
    # GPUs this node may use (comma-separated); each local DP rank takes its own slice of them.
    CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")

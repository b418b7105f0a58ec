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
    # weight quantization: fp8 | ptpc_fp8 (dynamic, from a bf16/fp32 checkpoint) | gptq | awq |
    # compressed-tensors; None: the checkpoint's quantization_config, else unquantized
    quantization: str | None = None
    # Derived from the checkpoint by `EngineConfig.create`.
    architecture: str = ""
    vocab_size: int = 0
    eos_token_ids: list[int] = []
    # custom batch-level logits processors, "pkg.module:Class" (plus every one registered under
    # the "tinyllm.logits_processors" entry-point group)
    logits_processors: list[str] = []
    # allow sleep()/wake_up(): release the weights' and KV cache's device memory on demand
    enable_sleep_mode: bool = False
    # outputs bitwise independent of batch size and order (fixed reduction orders; slower);
    # also on with TLS_BATCH_INVARIANT=1
    batch_invariant: bool = False
    # accept prompts given as embeddings (`prompt_embeds`); trusted clients only
    enable_prompt_embeds: bool = False
    hidden_size: int = 0  # derived from the checkpoint (prompt_embeds width)


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # CPU has no memory profiler worth trusting: size the KV cache by bytes instead.
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None  # exact block count (tests force preemption with it)
    # KV cache storage: auto (the model dtype) | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2; fp8 stores
    # K/V divided by a per-tensor scale (k_scale/v_scale: 1.0 or the checkpoint's)
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # per-step token budget
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    # Schedule step N+1 while the workers run step N (one step in flight ahead); off: one step
    # at a time. Both give the same tokens.
    async_scheduling: bool = True
    # Multimodal: encoder input tokens (placeholder tokens of the items encoded) per step and the
    # size of the workers' encoder-output cache, in tokens. 0: max_num_batched_tokens.
    max_num_encoder_input_tokens: int = 0
    encoder_cache_size: int = 0


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


class MultiModalConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Multimodal input limits (vLLM's names); only used by vision-language models."""

    # most items per prompt and modality as JSON, e.g. {"image": 2, "video": 1} (default 999 each)
    limit_mm_per_prompt: dict[str, int] = {}
    # directory under which file:// media URLs may be read (default: none may)
    allowed_local_media_path: str = ""
    media_fetch_timeout: float = 5.0  # seconds to fetch one http(s) image
    video_fetch_timeout: float = 30.0  # seconds to fetch one http(s) video (frame list)
    max_media_bytes: int = 20 * 1024 * 1024  # largest media item accepted, after base64 decoding
    max_image_pixels: int = 4096 * 4096  # largest decoded image (width * height) accepted


class LoRAConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Multi-LoRA serving (docs/lora.md)."""

    enable_lora: bool = False  # serve PEFT LoRA adapters next to the base model
    max_loras: int = 1  # most distinct adapters in one batch (GPU slots)
    max_lora_rank: int = 16  # largest adapter rank accepted (smaller ranks are padded to it)
    # adapters kept loaded in CPU memory (LRU); default: max_loras
    max_cpu_loras: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming a bad field."""
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK:
            raise ValueError(f"max_lora_rank must be in [1, {MAX_LORA_RANK}], "
                             f"got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")

    @property
    def cpu_capacity(self) -> int:
        """Adapters the CPU cache holds."""
        return self.max_cpu_loras or self.max_loras


MAX_LORA_RANK = 512
# Models whose projections `workers/lora_layers.py` knows how to wrap.
LORA_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class SpeculativeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`--speculative-config`: speculative decoding (docs/spec_decode.md); off by default."""

    # ngram | draft_model | eagle | eagle3 | mtp; None: off, or "draft_model" when `model` is set
    method: str | None = None
    num_speculative_tokens: int = 0  # draft tokens proposed per request per step (k)
    # draft model / EAGLE head directory (draft_model, eagle, eagle3); mtp: the target's own
    model: str | None = None
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram to match
    prompt_lookup_max: int = 3  # ngram: longest suffix n-gram to match (tried first)
    draft_tensor_parallel_size: int = 1  # only 1 is supported

    @property
    def enabled(self) -> bool:
        """True when steps carry draft tokens."""
        return self.method is not None and self.num_speculative_tokens > 0


SPEC_METHODS = ("ngram", "draft_model", "eagle", "eagle3", "mtp")


class KVTransferConfig(msgspec.Struct, frozen=True, kw_only=True):
    """`--kv-transfer-config`: disaggregated prefill (docs/parallelism.md). A producer instance
    (prefill) computes prompts; a consumer (decode) loads their KV instead of computing it:
    SharedMemoryConnector through a block store both see, NixlConnector by NIXL reads from the
    producer's registered KV cache (requests carry `kv_transfer_params`)."""

    kv_connector: str = "SharedMemoryConnector"  # SharedMemoryConnector | NixlConnector
    kv_role: Literal["kv_producer", "kv_consumer", "kv_both"] = "kv_both"
    kv_buffer_device: str = "cuda"  # vLLM's field; the shared-memory connector stages via host
    # SharedMemoryConnector: {"shm_path": dir shared by the instances, default /dev/shm/...}
    # NixlConnector: {"backends": ["UCX"]} (NIXL transfer backends)
    kv_connector_extra_config: dict[str, Any] = {}
    # NixlConnector. This instance's id in kv_transfer_params (None: "<host>:<port>"), and its
    # side channel, where a consumer fetches the NIXL agent metadata and cache layout: rank r
    # listens on side_channel_port + r (vLLM: VLLM_NIXL_SIDE_CHANNEL_HOST / _PORT).
    engine_id: str | None = None
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 5600
    # Seconds a producer holds a finished request's blocks for a consumer that never reads
    # them (vLLM: VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    abort_request_timeout: float = 480.0

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

    @property
    def nixl_engine_id(self) -> str:
        """The id a NixlConnector instance puts in kv_transfer_params."""
        return self.engine_id or f"{self.side_channel_host}:{self.side_channel_port}"

    def validate(self, prefix_caching: bool, data_parallel_size: int = 1) -> None:
        """Raise ValueError naming the bad field."""
        if self.kv_connector == "NixlConnector":
            self._validate_nixl(data_parallel_size)
            return
        if self.kv_connector != "SharedMemoryConnector":
            raise ValueError(f"kv_connector {self.kv_connector!r} is unknown; choose "
                             "SharedMemoryConnector (same host) or NixlConnector")
        if not prefix_caching:
            raise ValueError("kv_transfer_config needs enable_prefix_caching: blocks are "
                             "named by their prefix-cache hash")

    def _validate_nixl(self, data_parallel_size: int) -> None:
        if not any(importlib.util.find_spec(m) for m in _NIXL_MODULES):
            raise ValueError("kv_connector NixlConnector needs the `nixl` package, which is not "
                             "installed (pip install 'tinyllm-serve[nixl]')")
        if not 0 < self.side_channel_port < 65536:
            raise ValueError(f"side_channel_port: {self.side_channel_port} is not a TCP port")
        if not self.abort_request_timeout > 0:
            raise ValueError("abort_request_timeout: must be > 0 seconds")
        backends = self.kv_connector_extra_config.get("backends", ["UCX"])
        if not (isinstance(backends, list) and backends
                and all(isinstance(b, str) for b in backends)):
            raise ValueError("kv_connector_extra_config.backends: a non-empty list of NIXL "
                             "backend names, e.g. [\"UCX\"]")
        if data_parallel_size > 1:
            raise ValueError("kv_connector NixlConnector with data_parallel_size > 1 is not "
                             "supported: run one instance per data-parallel rank")


# Where the NIXL bindings live: the `nixl` meta package re-exports one of the others.
_NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")


# vLLM's backends that this engine does not implement: named in the error a user gets.
_OTHER_BACKENDS = ("xgrammar", "outlines", "lm-format-enforcer")


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    structured_outputs: StructuredOutputsConfig = StructuredOutputsConfig()
    multimodal: MultiModalConfig = MultiModalConfig()
    lora: LoRAConfig = LoRAConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    kv_transfer: KVTransferConfig | None = None  # disaggregated prefill; None: off

    @classmethod
    def create(cls, model: str, **kwargs: object) -> EngineConfig:
        """Build from flat vLLM-style keyword names (`max_num_seqs=...`) and validate.

        `structured_outputs_config` and `speculative_config` take their struct, a dict or its
        JSON text.
        """
        structured = _structured_outputs_config(kwargs.pop("structured_outputs_config", None))
        speculative = _speculative_config(kwargs.pop("speculative_config", None))
        if speculative.enabled and kwargs.get("async_scheduling") is None:
            # The core cannot schedule step N+1 before it knows how many of step N's drafts
            # survived: speculation runs one step at a time (as in vLLM).
            kwargs["async_scheduling"] = False
        kv_transfer = _json_struct("kv_transfer_config", kwargs.pop("kv_transfer_config", None),
                                   KVTransferConfig)
        groups: dict[str, dict[str, object]] = {"model": {"model": model}, "cache": {},
                                                "scheduler": {}, "parallel": {},
                                                "multimodal": {}, "lora": {}}
        limits = kwargs.get("limit_mm_per_prompt")
        if isinstance(limits, str | bytes):  # the CLI's JSON text
            try:
                kwargs["limit_mm_per_prompt"] = json.loads(limits)
            except json.JSONDecodeError as e:
                raise ValueError(f"limit_mm_per_prompt: not JSON ({e})") from None
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
                  multimodal=_convert(MultiModalConfig, groups["multimodal"]),
                  lora=LoRAConfig(**groups["lora"]), speculative=speculative,
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
            vocab_size=info["vocab_size"], eos_token_ids=info["eos_token_ids"],
            hidden_size=info["hidden_size"],
            batch_invariant=self.model.batch_invariant or Env.BATCH_INVARIANT,
            quantization=_quantization(self.model.quantization, info["quant_method"]))
        cfg = msgspec.structs.replace(self, model=model)
        cfg.validate()
        if cfg.speculative.enabled and cfg.speculative.method == "mtp" and \
                not info["num_nextn_predict_layers"]:
            raise ValueError(f"speculative_config.method 'mtp': the model {self.model.model!r} "
                             "has no multi-token-prediction layers (no num_nextn_predict_layers "
                             "in its config.json)")
        _check_tensor_parallel(self.parallel.tensor_parallel_size, info)
        if cfg.model.quantization and self.parallel.tensor_parallel_size > 1:
            raise ValueError("quantization: quantized linear layers are not sharded for "
                             "tensor_parallel_size > 1 yet")
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
        if c.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"):
            raise ValueError("kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2; got "
                             f"{c.kv_cache_dtype!r}")
        if self.parallel.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        for modality, limit in self.multimodal.limit_mm_per_prompt.items():
            if modality not in ("image", "video") or limit < 0:
                raise ValueError(f"limit_mm_per_prompt: {modality!r}: {limit} (modalities image "
                                 "and video, counts >= 0)")
        self.lora.validate()
        if self.lora.enable_lora and self.model.architecture not in LORA_ARCHITECTURES:
            raise ValueError(f"enable_lora: LoRA supports {', '.join(LORA_ARCHITECTURES)}, not "
                             f"{self.model.architecture!r}")
        if self.lora.enable_lora and self.parallel.tensor_parallel_size != 1:
            raise ValueError("enable_lora: LoRA with tensor_parallel_size > 1 is not supported")
        self.parallel.validate_data_parallel()
        if self.kv_transfer is not None:
            self.kv_transfer.validate(self.cache.enable_prefix_caching,
                                      self.parallel.data_parallel_size)
        backend = self.structured_outputs.backend
        if backend not in ("auto", "guidance"):
            known = "a vLLM backend this engine does not implement" \
                if backend in _OTHER_BACKENDS else "unknown"
            raise ValueError(f"structured outputs backend {backend!r} is {known}; choose 'auto' "
                             "or 'guidance' (llguidance)")
        self._validate_speculative()

    def _validate_speculative(self) -> None:
        spec = self.speculative
        if spec.method is None and spec.num_speculative_tokens == 0:
            return
        if spec.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}"
                             f"; got {spec.method!r}")
        if spec.num_speculative_tokens < 1:
            raise ValueError("speculative_config.num_speculative_tokens must be >= 1, got "
                             f"{spec.num_speculative_tokens}")
        if spec.draft_tensor_parallel_size != 1:
            raise ValueError("speculative_config.draft_tensor_parallel_size must be 1 (the draft "
                             f"runs unsharded), got {spec.draft_tensor_parallel_size}")
        if spec.method in ("draft_model", "eagle", "eagle3") and not spec.model:
            raise ValueError(f"speculative_config.model is required for method {spec.method!r}")
        if spec.method == "mtp" and spec.model and \
                Path(spec.model).resolve() != Path(self.model.model).resolve():
            raise ValueError("speculative_config.model: method 'mtp' runs the MTP layers of the "
                             f"target checkpoint itself; leave it unset (got {spec.model!r})")
        if spec.method == "ngram" and not 1 <= spec.prompt_lookup_min <= spec.prompt_lookup_max:
            raise ValueError("speculative_config: need 1 <= prompt_lookup_min <= "
                             f"prompt_lookup_max, got {spec.prompt_lookup_min} and "
                             f"{spec.prompt_lookup_max}")
        if self.scheduler.async_scheduling:
            raise ValueError("speculative decoding needs async_scheduling off (the core must "
                             "know how many drafts were accepted before scheduling the next step)")
        # Combinations not built yet: refused here rather than computed wrongly.
        if self.parallel.tensor_parallel_size != 1:
            raise ValueError("speculative_config: speculative decoding with tensor_parallel_size "
                             "> 1 is not supported yet")
        if self.model.logits_processors:
            raise ValueError("speculative_config: custom logits_processors do not see verified "
                             "draft rows; use one or the other")
        if self.lora.enable_lora:
            raise ValueError("speculative_config: speculative decoding with enable_lora is not "
                             "supported yet")

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
    "parallel": ParallelConfig, "multimodal": MultiModalConfig, "lora": LoRAConfig,
}


def _convert(struct: type[msgspec.Struct], values: dict[str, object]) -> msgspec.Struct:
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as e:
        raise ValueError(str(e)) from None


def _structured_outputs_config(value: object) -> StructuredOutputsConfig:
    if value is None or isinstance(value, StructuredOutputsConfig):
        return value or StructuredOutputsConfig()
    try:
        if isinstance(value, str | bytes):
            return msgspec.json.decode(value, type=StructuredOutputsConfig)
        return msgspec.convert(value, StructuredOutputsConfig)
    except msgspec.DecodeError as e:  # bad JSON, or a wrong field type
        raise ValueError(f"structured_outputs_config: {e}") from None


def _check_tensor_parallel(size: int, info: dict) -> None:
    # Workers check every sharded size again; these two fail before any process starts.
    heads, kv_heads = info["num_attention_heads"], info["num_key_value_heads"]
    if heads % size:
        raise ValueError(f"num_attention_heads ({heads}) is not divisible by "
                         f"tensor_parallel_size ({size})")
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"num_key_value_heads ({kv_heads}) and tensor_parallel_size ({size}): "
                         "one must divide the other")


def _speculative_config(value: object) -> SpeculativeConfig:
    if value is None or isinstance(value, SpeculativeConfig):
        spec = value or SpeculativeConfig()
    else:
        try:
            if isinstance(value, str | bytes):
                spec = msgspec.json.decode(value, type=SpeculativeConfig)
            else:
                spec = msgspec.convert(value, SpeculativeConfig)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ValueError(f"speculative_config: {e}") from None
    if spec.method is None and spec.model:
        spec = msgspec.structs.replace(spec, method="draft_model")
    return spec


# --quantization values; the checkpoint-format ones must match config.json's quant_method.
QUANTIZATION_METHODS = ("fp8", "ptpc_fp8", "gptq", "awq", "compressed-tensors")
_DYNAMIC_METHODS = ("fp8", "ptpc_fp8")  # quantize an unquantized checkpoint while loading


def _quantization(requested: str | None, in_checkpoint: str | None) -> str | None:
    """The quantization method to run: the checkpoint's, or the requested dynamic one."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {requested!r} is not supported; choose one of "
                         f"{', '.join(QUANTIZATION_METHODS)}")
    if in_checkpoint is None:
        if requested is not None and requested not in _DYNAMIC_METHODS:
            raise ValueError(f"quantization {requested!r} needs a checkpoint quantized that way "
                             "(config.json has no quantization_config); for an unquantized "
                             f"checkpoint choose one of {', '.join(_DYNAMIC_METHODS)}")
        return requested
    if in_checkpoint not in QUANTIZATION_METHODS or in_checkpoint in _DYNAMIC_METHODS:
        raise ValueError(f"checkpoint quantization_config.quant_method {in_checkpoint!r} is not "
                         "supported (gptq, awq and compressed-tensors checkpoints are)")
    if requested is not None and requested != in_checkpoint:
        raise ValueError(f"quantization {requested!r} does not match the checkpoint's "
                         f"quantization_config.quant_method {in_checkpoint!r}")
    return in_checkpoint


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
    heads = int(text_cfg.get("num_attention_heads", 1))
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": int(text_cfg.get("num_key_value_heads") or heads),
        "architecture": (hf.get("architectures") or [""])[0],
        "vocab_size": int(text_cfg["vocab_size"]),
        "hidden_size": int(text_cfg.get("hidden_size", 0)),
        "max_position_embeddings": int(text_cfg.get("max_position_embeddings", 2048)),
        "eos_token_ids": eos,
        "quant_method": (hf.get("quantization_config") or {}).get("quant_method"),
        "num_nextn_predict_layers": int(text_cfg.get("num_nextn_predict_layers") or 0),
    }


class Env:
    """Every environment variable the engine reads, read here and nowhere else."""

    # Seconds without a heartbeat before a peer process counts as dead.
    PEER_TIMEOUT_S = float(os.environ.get("TLS_PEER_TIMEOUT_S", "5"))
    # Directory where the demo checkpoint is built and cached.
    CACHE_DIR = os.environ.get("TLS_CACHE_DIR", str(Path.home() / ".cache" / "tinyllm-serve"))
    # Log level for every process.
    LOG_LEVEL = os.environ.get("TLS_LOG_LEVEL", "INFO")
    # Allow /v1/load_lora_adapter, /v1/unload_lora_adapter and LoRA resolvers ("1" / "true").
    ALLOW_RUNTIME_LORA_UPDATING = os.environ.get(
        "TLS_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true")
    # Directory of adapters the filesystem LoRA resolver serves (`<dir>/<name>/`); unset: off.
    LORA_RESOLVER_CACHE_DIR = os.environ.get("TLS_LORA_RESOLVER_CACHE_DIR") or None
    # vLLM's VLLM_BATCH_INVARIANT: turn on ModelConfig.batch_invariant.
    BATCH_INVARIANT = os.environ.get("TLS_BATCH_INVARIANT", "0") not in ("", "0", "false")

    # GPUs this node may use (comma-separated); each local DP rank takes its own slice of them.
    CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")

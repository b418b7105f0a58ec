"""Every message that crosses a process boundary, as msgspec Structs.

Leaf module: imports only `sampling.params`. Transports:

    frontend --ZMQ PUSH--> engine core      CoreInput    = AddRequest | Abort | Control
    engine core --ZMQ PUSH--> frontend      EngineOutputs (routed by AddRequest.client_index)
    engine core --shm broadcast--> workers  WorkerInput  = ExecuteStep | WorkerControl
    worker rank 0 --shm ring--> engine core WorkerOutput = StepResult | MemoryReport | ControlResult

Tagged unions let each receiver decode straight into the right type and dispatch with `match`.
Hot-path structs are `array_like` (no field names on the wire) and `gc=False` (no cycles).
"""

from __future__ import annotations

import msgspec

from sampling.params import SamplingParams

# ---------------------------------------------------------------- frontend -> engine core


class MMInput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One multimodal item of a prompt: its encoder input and where its placeholders sit.

    The prompt holds `length` placeholder tokens at [offset, offset + length), one per merged
    patch the encoder outputs. `data` is the raw (C-order, little-endian) bytes of the pixel rows,
    `shape` [num_patches, C*Tp*P*P] of `dtype`: no pickle, no numpy on the wire.
    """

    modality: str  # "image" | "video"
    hash: str  # content hash (or the user's uuid): key of the encoder and prefix caches
    offset: int
    length: int
    grid_thw: list[int]  # (t, h, w) in patches before merging
    data: bytes = b""
    dtype: str = "float32"
    shape: list[int] = []


class LoRARef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A LoRA adapter a request runs with: workers load it from `path` on first use."""

    name: str
    int_id: int  # unique per (name, path); keys the workers' caches and the prefix-cache hash
    path: str  # PEFT directory: adapter_config.json + adapter_model.safetensors


class PromptEmbeds(msgspec.Struct, array_like=True, gc=False):
    """A prompt given as embeddings (`--enable-prompt-embeds`): raw bytes, no pickle.

    The request's prompt_token_ids are placeholders (one per row); workers feed these rows to
    the decoder instead of embedding the placeholders.
    """

    data: bytes  # row-major [shape[0], shape[1]] values of `dtype`
    dtype: str  # float32 | float16 | bfloat16
    shape: list[int]  # [num_prompt_tokens, hidden_size]
    hash: str  # sha256 of dtype, shape and data: the prefix-cache key of these rows


class KVTransferParams(msgspec.Struct, kw_only=True):
    """vLLM's `kv_transfer_params` (NixlConnector), on a request and on its final output.

    To a prefill instance: {"do_remote_decode": true}: on finishing it holds the prompt's blocks
    and answers with the fields a decode instance needs to read them ({"do_remote_prefill": true,
    remote_*}); the proxy passes those on as the decode request's `kv_transfer_params`.
    """

    do_remote_decode: bool = False  # P: keep the prompt's KV for a decode instance to read
    do_remote_prefill: bool = False  # D: read the prompt's KV from the prefill instance
    remote_engine_id: str | None = None
    remote_block_ids: list[int] | None = None  # P's blocks of the full prompt blocks, in order
    remote_host: str | None = None  # P's NIXL side channel (rank r listens on port + r)
    remote_port: int | None = None
    remote_request_id: str | None = None  # P's id of the request: the notification names it
    tp_size: int = 1  # P's tensor-parallel size (D must match: rank r reads from rank r)

    def remote_prefill_error(self, tp_size: int) -> str | None:
        """Why a consumer of `tp_size` ranks cannot read with these do_remote_prefill params."""
        for name in ("remote_engine_id", "remote_host", "remote_port", "remote_block_ids",
                     "remote_request_id"):
            if getattr(self, name) is None:
                return f"kv_transfer_params.{name}: required with do_remote_prefill"
        if self.tp_size != tp_size:
            return (f"kv_transfer_params.tp_size: the prefill instance runs "
                    f"tensor_parallel_size={self.tp_size}, this one {tp_size}; NixlConnector "
                    "needs them equal")
        if not 0 < self.remote_port < 65536:
            return f"kv_transfer_params.remote_port: {self.remote_port} is not a TCP port"
        if any(b < 0 for b in self.remote_block_ids):
            return "kv_transfer_params.remote_block_ids: block ids are >= 0"
        return None


class AddRequest(msgspec.Struct, tag="add", array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    client_index: int = 0
    arrival_time: float = 0.0
    priority: int = 0  # lower runs first under the "priority" policy
    cache_salt: str | None = None
    mm_inputs: list[MMInput] | None = None  # multimodal items, in prompt order
    lora: LoRARef | None = None
    prompt_embeds: PromptEmbeds | None = None
    kv_transfer_params: KVTransferParams | None = None  # disaggregated prefill (NixlConnector)


class Abort(msgspec.Struct, tag="abort", array_like=True, gc=False):
    request_ids: list[str]


class Control(msgspec.Struct, tag="control", array_like=True, omit_defaults=True):
    """A utility call answered by one `ControlResult` with the same call_id."""

    call_id: int
    op: str  # one of CONTROL_OPS
    client_index: int = 0
    lora: LoRARef | None = None  # the adapter of "remove_lora"
    level: int = 1  # sleep: 1 offloads weights to host memory, 2 discards them
    tags: list[str] | None = None  # wake_up: parts to wake (SLEEP_TAGS); None: all
    path: str | None = None  # reload_weights: checkpoint directory (None: the served model)


CONTROL_OPS = ("reset_prefix_cache", "get_stats", "ping", "shutdown", "remove_lora",
               "sleep", "wake_up", "is_sleeping", "reload_weights")
SLEEP_TAGS = ("weights", "kv_cache")

CoreInput = AddRequest | Abort | Control

# ---------------------------------------------------------------- engine core -> frontend


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Logprobs for consecutive positions of one request.

    Row i describes one position: `token_ids[i][0]` is the token actually chosen there (sampled or
    the prompt token), followed by the top-k alternatives; `logprobs[i]` aligns with it and
    `ranks[i]` is the 1-based rank of the chosen token in the full distribution.
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class TokenDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None  # positions 1.. of the prompt, possibly chunked
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None  # the stop token id that ended the request
    num_cached_tokens: int = 0
    # Final delta of a request sent with do_remote_decode: where its held KV blocks are.
    kv_transfer_params: KVTransferParams | None = None


class SchedulerStats(msgspec.Struct, array_like=True, gc=False):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0  # cumulative prompt tokens found cached
    num_preemptions: int = 0  # cumulative
    step_count: int = 0
    # Speculative decoding, cumulative: verifications (a request with >= 1 draft in a step),
    # draft tokens verified, drafts accepted, and accepted drafts by position (index 0: first).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = []


class ControlResult(msgspec.Struct, tag="control_result", array_like=True, omit_defaults=True):
    call_id: int
    ok: bool = True
    value: int | float | str | None = None
    error: str | None = None


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    engine_pid: int  # clients watch this pid to notice a dead engine core
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    dp_rank: int = 0  # the data-parallel rank of this engine core


class EngineOutputs(msgspec.Struct, tag="outputs", array_like=True, omit_defaults=True, gc=False):
    outputs: list[TokenDelta] = []
    stats: SchedulerStats | None = None
    control: ControlResult | None = None
    # Set when the engine is dead (a worker died, ...): every pending request fails with it.
    engine_error: str | None = None
    timestamp: float = 0.0


CoreOutput = EngineOutputs | CoreReady

# ---------------------------------------------------------------- DP handshake (multi-node)
# An engine core on a headless node registers with the head node's launcher (ZMQ DEALER to the
# launcher's ROUTER at --data-parallel-address:--data-parallel-rpc-port):
#
#     core -> head   DPHello     (rank, config fingerprint)
#     head -> core   DPWelcome   (how many API servers will connect, or why it is refused)
#     core binds its input and one output address per API server (tcp, ephemeral ports)
#     core -> head   DPRegister  (those addresses)
#     head -> core   DPWelcome   (ack)
#
# The head starts its API servers once every remote rank has registered; they connect to the
# addresses like to a local core's ipc:// ones.


class DPHello(msgspec.Struct, tag="dp_hello", array_like=True):
    dp_rank: int
    fingerprint: str  # EngineConfig.dp_fingerprint(): what every DP rank must agree on


class DPWelcome(msgspec.Struct, tag="dp_welcome", array_like=True, omit_defaults=True):
    num_clients: int = 0  # API servers on the head; the core binds one output address each
    error: str | None = None  # set when the head refuses this rank


class DPRegister(msgspec.Struct, tag="dp_register", array_like=True):
    dp_rank: int
    input_addr: str  # tcp:// address the core bound for CoreInput
    output_addrs: list[str]  # tcp:// addresses it bound, one per client index
    engine_pid: int  # for logs: the pid on the remote node


DPHandshake = DPHello | DPWelcome | DPRegister

# ---------------------------------------------------------------- engine core -> workers


class NewReq(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request the workers have not seen yet (or are seeing again after preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # Tokens already generated: non-empty only when resuming after preemption by recompute.
    output_token_ids: list[int] = []
    mm_inputs: list[MMInput] | None = None
    lora: LoRARef | None = None
    prompt_embeds: PromptEmbeds | None = None


class CachedReqs(msgspec.Struct, array_like=True, gc=False):
    """Requests the workers already hold, as parallel lists (deltas only)."""

    req_ids: list[str] = []
    new_block_ids: list[list[int]] = []  # appended to the request's block table
    num_computed_tokens: list[int] = []


class KVBlockIO(msgspec.Struct, array_like=True, gc=False):
    """One KV block moved between this instance's cache and the disaggregated-prefill store."""

    block_id: int
    key: str  # the block's prefix-cache hash, hex: its name in the store


class KVRemoteRead(msgspec.Struct, array_like=True, gc=False):
    """NixlConnector: read a request's prompt blocks from a prefill instance, then tell it."""

    req_id: str  # this instance's request
    remote_request_id: str  # the prefill instance's: named in the notification that frees them
    engine_id: str
    host: str
    port: int  # rank r's side channel is port + r
    local_block_ids: list[int]
    remote_block_ids: list[int]  # aligned with local_block_ids; empty: only notify


class KVTransferMeta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What the worker-side KV connector does around one step's forward."""

    loads: list[KVBlockIO] = []  # store -> cache, before the forward
    saves: list[KVBlockIO] = []  # cache -> store, after the forward
    reads: list[KVRemoteRead] = []  # NixlConnector: remote cache -> cache, before the forward


class ExecuteStep(msgspec.Struct, tag="exec", array_like=True, gc=False):
    """One scheduler step. Workers compute `num_scheduled_tokens[req_id]` tokens per request
    starting at its num_computed_tokens, and sample one token for every request whose scheduled
    tokens reach the end of its known tokens (partial prefill chunks do not sample)."""

    step_id: int
    new: list[NewReq]
    cached: CachedReqs
    num_scheduled_tokens: dict[str, int]
    # Requests to forget before this step runs: finished, aborted or preempted.
    finished: list[str] = []
    # Multimodal: req_id -> indices of its mm_inputs to run through the encoder this step (their
    # outputs join the encoder cache), and encoder-cache entries (hashes) to drop first.
    encoder_inputs: dict[str, list[int]] = {}
    free_encoder_hashes: list[str] = []
    # LoRA adapters (int ids) unloaded since the last step: workers drop them from their caches.
    removed_loras: list[int] = []
    # Speculative decoding: draft tokens to verify, appended after each request's known tokens
    # (they are counted in num_scheduled_tokens). Requests without drafts are absent.
    scheduled_spec_tokens: dict[str, list[int]] = {}
    kv_transfer: KVTransferMeta | None = None  # disaggregated prefill (kv_transfer_config)


class InitKVCache(msgspec.Struct, tag="init_kv", array_like=True):
    call_id: int
    num_blocks: int


class ProfileMemory(msgspec.Struct, tag="profile", array_like=True):
    call_id: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    call_id: int


class Sleep(msgspec.Struct, tag="sleep", array_like=True):
    """Sleep mode: drop the KV cache; level 1 offloads the weights to host memory, 2 drops them."""

    call_id: int
    level: int


class WakeUp(msgspec.Struct, tag="wake_up", array_like=True):
    call_id: int
    tags: list[str]  # subset of SLEEP_TAGS


class ReloadWeights(msgspec.Struct, tag="reload_weights", array_like=True):
    """Load the weights again from a checkpoint directory (after a level-2 sleep, or updated)."""

    call_id: int
    path: str


WorkerControl = InitKVCache | ProfileMemory | Shutdown | Sleep | WakeUp | ReloadWeights
WorkerInput = (ExecuteStep | InitKVCache | ProfileMemory | Shutdown | Sleep | WakeUp
               | ReloadWeights)

# ---------------------------------------------------------------- workers -> engine core


class StepResult(msgspec.Struct, tag="step", array_like=True, omit_defaults=True, gc=False):
    step_id: int
    req_ids: list[str]  # requests that sampled a token this step, in batch order
    sampled: list[int]  # one token per entry of req_ids
    logprobs: list[TokenLogprobs | None] | None = None  # aligned with req_ids when any asked
    prompt_logprobs: dict[str, TokenLogprobs] | None = None
    num_nans: int = 0
    # Requests the workers could not run (their LoRA adapter failed to load): finished "error".
    failed: list[str] = []
    # Speculative decoding, aligned with req_ids: every token the request produced this step
    # (its accepted drafts, then one sampled token; `sampled` holds that last one) ...
    spec_token_ids: list[list[int]] | None = None
    # ... and the drafts proposed for its next step (empty: none).
    draft_token_ids: list[list[int]] | None = None
    # NixlConnector. Consumer: reads of KVTransferMeta.reads that completed on every rank, and
    # those that failed (computed locally instead). Producer: requests whose held blocks a
    # consumer has read (its notification arrived): their blocks may be freed.
    kv_recv_done: list[str] = []
    kv_recv_failed: list[str] = []
    kv_send_done: list[str] = []


class MemoryReport(msgspec.Struct, tag="memory", array_like=True):
    call_id: int
    available_bytes: int  # memory the KV cache may take on this rank
    bytes_per_block: int


class WorkerError(msgspec.Struct, tag="worker_error", array_like=True):
    """A worker failed a step; the engine reports it and shuts down."""

    message: str


WorkerOutput = StepResult | MemoryReport | ControlResult | WorkerError

# ---------------------------------------------------------------- NIXL side channel
# A consumer's worker rank r asks the producer's rank r (ZMQ REQ to its side channel,
# KVTransferConfig.side_channel_port + r) for what a NIXL READ from its cache needs.


class NixlHello(msgspec.Struct, tag="nixl_hello", array_like=True):
    tp_rank: int
    tp_size: int


class NixlAgentInfo(msgspec.Struct, tag="nixl_agent", array_like=True, omit_defaults=True):
    """One producer rank's NIXL agent and KV-cache layout; `error` set: refused."""

    engine_id: str = ""
    agent_metadata: bytes = b""  # nixl_agent.get_agent_metadata()
    mem_type: str = "DRAM"  # DRAM | VRAM
    device_id: int = 0
    base_addrs: list[int] = []  # per layer: address of its cache tensor [P, num_blocks, ...]
    num_blocks: int = 0
    block_bytes: int = 0  # one block of one plane (K or V) of one layer
    plane_bytes: int = 0  # stride between planes (num_blocks * block_bytes when contiguous)
    num_planes: int = 2
    error: str | None = None


NixlSideChannel = NixlHello | NixlAgentInfo

# ---------------------------------------------------------------- codecs

core_input_decoder = msgspec.msgpack.Decoder(CoreInput)
core_output_decoder = msgspec.msgpack.Decoder(CoreOutput)
worker_input_decoder = msgspec.msgpack.Decoder(WorkerInput)
worker_output_decoder = msgspec.msgpack.Decoder(WorkerOutput)
dp_handshake_decoder = msgspec.msgpack.Decoder(DPHandshake)
nixl_side_channel_decoder = msgspec.msgpack.Decoder(NixlSideChannel)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


_encoder = msgspec.msgpack.Encoder()

"""OpenAI API schemas (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) as msgspec Structs.

Request bodies decode straight from JSON with `completion_request_decoder` /
`chat_request_decoder`: a wrong type raises `msgspec.ValidationError` naming the field path
(`... - at $.messages[0].content`); unknown fields are ignored, as OpenAI clients send many. Request
fields left out are None, so `to_sampling_params()` passes only what the client set and
`SamplingParams` defaults fill the rest. Ranges are checked later by `SamplingParams.validate()`.

Besides the OpenAI fields, requests take vLLM's extras (top_k, min_p, ignore_eos, ...), and
`vllm_xargs` becomes `SamplingParams.extra_args`. A constraint on the output comes from exactly
one of `response_format` (OpenAI), `structured_outputs` (vLLM, `extra_body`) or the deprecated
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. Responses encode to the JSON
the `openai` Python client parses; the vLLM-only `stop_reason` and `reasoning_content` fields
ride along.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Literal, cast

import msgspec

from enginecore.protocol import KVTransferParams
from sampling.params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("frontend.openai")

# OpenAI accepts logit biases in [-100, 100]; larger magnitudes are clamped, like vLLM does.
_MAX_LOGIT_BIAS = 100.0
# Request fields copied to SamplingParams under the same name when the client set them.
_OPTIONAL_PARAMS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "stop_token_ids", "allowed_token_ids", "bad_words",
)
_ALWAYS_PARAMS = (
    "n", "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output",
    "spaces_between_special_tokens",
)

# ---------------------------------------------------------------------- request parts


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False  # one last chunk with the usage, every other chunk has null
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class MediaURL(msgspec.Struct, omit_defaults=True, kw_only=True):
    url: str  # http(s)://, data:...;base64, or file:// (when allowed)
    detail: str | None = None


class InputAudio(msgspec.Struct, kw_only=True):
    data: str  # base64
    format: str  # "wav" | "mp3"


class TextPart(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url", omit_defaults=True,
                kw_only=True):
    image_url: MediaURL
    uuid: str | None = None  # stable id for the multimodal cache instead of a content hash


class AudioPart(msgspec.Struct, tag_field="type", tag="audio_url", omit_defaults=True,
                kw_only=True):
    audio_url: MediaURL
    uuid: str | None = None


class VideoPart(msgspec.Struct, tag_field="type", tag="video_url", omit_defaults=True,
                kw_only=True):
    video_url: MediaURL
    uuid: str | None = None


class InputAudioPart(msgspec.Struct, tag_field="type", tag="input_audio", omit_defaults=True,
                     kw_only=True):
    input_audio: InputAudio
    uuid: str | None = None


ContentPart = TextPart | ImagePart | AudioPart | VideoPart | InputAudioPart


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as produced by the model


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One message of a chat request; None fields are left out when handed to a template."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this answers
    reasoning: str | None = None  # assistant turns: their thought (interleaved thinking)
    reasoning_content: str | None = None  # the older name of `reasoning`

    def text_content(self) -> str:
        """The text of `content`, text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content or [] if isinstance(p, TextPart))


class FunctionDefinition(msgspec.Struct, omit_defaults=True, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ChatTool(msgspec.Struct, kw_only=True):
    """One entry of `tools`: a function the model may call."""

    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    """`tool_choice` naming the function the reply must call."""

    function: NamedFunction
    type: Literal["function"] = "function"


# ---------------------------------------------------------------------- requests


class _SamplingRequest(msgspec.Struct, kw_only=True):
    """Fields both endpoints share; the subclasses add the prompt and endpoint-only fields."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    user: str | None = None
    # {"type": "text" | "json_object" | "json_schema" | "structural_tag", ...}
    response_format: dict[str, Any] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = 0
    cache_salt: str | None = None
    # custom arguments for logits processors: str, int, float or lists of these
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Deprecated spellings of structured_outputs.{json, regex, choice, grammar}.
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Disaggregated prefill with NixlConnector (docs/parallelism.md); ignored by other engines.
    kv_transfer_params: KVTransferParams | None = None

    def _sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        kwargs = {name: getattr(self, name) for name in _ALWAYS_PARAMS}
        kwargs.update(
            (name, value) for name in _OPTIONAL_PARAMS if (value := getattr(self, name)) is not None
        )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            **kwargs, stop=stop, max_tokens=max_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(self.logit_bias),
            extra_args=self.vllm_xargs, structured_outputs=self._structured_outputs(),
        )

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one constraint the request sets, from whichever field it used."""
        found = {}
        if self.structured_outputs is not None:
            found["structured_outputs"] = self.structured_outputs
        if (fmt := _response_format(self.response_format)) is not None:
            found["response_format"] = fmt
        guided = {k: v for k in _GUIDED if (v := getattr(self, f"guided_{k}")) is not None}
        if guided:
            for k in guided:
                _warn_deprecated(f"guided_{k}")
            found["guided_*"] = StructuredOutputsParams(**guided)
        if len(found) > 1:
            raise ValueError(f"structured_outputs: give only one of {', '.join(found)}")
        return next(iter(found.values()), None)


class CompletionRequest(_SamplingRequest, kw_only=True):
    """Body of POST /v1/completions."""

    # A string, a batch of strings, token ids, or a batch of token-id lists (checked below,
    # since msgspec unions allow only one array type).
    prompt: str | list[str | int | list[int]] | None = None
    # base64 of torch.save'd [L, H] tensors (`--enable-prompt-embeds`); answered before `prompt`
    prompt_embeds: str | list[str] | None = None
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.prompt is None and not self.prompt_embeds:
            raise ValueError("prompt: give prompt or prompt_embeds (decoder prompt cannot be "
                             "empty)")
        if isinstance(self.prompt, list):
            kinds = {type(p) for p in self.prompt}
            if len(kinds) != 1:
                raise ValueError("prompt: expected a non-empty list of strings, of token ids, "
                                 "or of token-id lists")

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a batch: strings, or token-id lists (empty without a prompt)."""
        prompt = self.prompt
        if prompt is None:
            return []
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [cast(list[int], prompt)]
        return cast(list[str] | list[list[int]], prompt)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Map the request to SamplingParams; ValueError names a bad field."""
        if self.suffix is not None:
            raise ValueError("suffix: not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = self.logprobs  # echoed prompt tokens get logprobs too
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ChatCompletionRequest(_SamplingRequest, kw_only=True):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    # None: "auto" when tools are given, else "none".
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # False: at most one call per reply
    include_reasoning: bool = True  # vLLM: False leaves the reasoning out of the reply
    echo: bool = False  # vLLM: prefix the reply with the final message when continuing it
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template already holds BOS and friends

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for a chat template (unset fields left out)."""
        return [msgspec.to_builtins(m) for m in self.messages]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Map the request to SamplingParams; ValueError names a bad field."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs)


_GUIDED = ("json", "regex", "choice", "grammar")


@functools.cache
def _warn_deprecated(name: str) -> None:
    logger.warning("%s is deprecated: use structured_outputs.%s (or response_format)", name,
                   name.removeprefix("guided_"))


def _response_format(fmt: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """OpenAI's response_format as a constraint (None for plain text)."""
    kind = None if fmt is None else fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format: json_schema.schema (a JSON schema) is required")
        # strict: objects take only the properties they list, as OpenAI's strict mode has it.
        return StructuredOutputsParams(json=spec["schema"],
                                       disable_additional_properties=bool(spec.get("strict")))
    if kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=json.dumps(
            {k: v for k, v in fmt.items() if k != "type"}))
    raise ValueError(f"response_format: type must be text, json_object, json_schema or "
                     f"structural_tag, got {kind!r}")


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if raw is None:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ValueError(f"logit_bias: key {key!r} is not a token id") from None
        bias[token_id] = max(-_MAX_LOGIT_BIAS, min(_MAX_LOGIT_BIAS, float(value)))
    return bias


completion_request_decoder = msgspec.json.Decoder(CompletionRequest)
chat_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)

# ---------------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class UsageInfo(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class Logprob(msgspec.Struct, kw_only=True):
    """vLLM's prompt_logprobs entry: one candidate token at one position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt position (the first is None): token id -> its logprob.
PromptLogprobs = list[dict[int, Logprob] | None]


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # stop | length | abort; null while streaming
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(msgspec.Struct, kw_only=True):
    """Reply of /v1/completions, and (same shape, as in OpenAI) each streamed chunk."""

    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    kv_transfer_params: KVTransferParams | None = None  # a do_remote_decode request's answer


CompletionStreamResponse = CompletionResponse


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None  # UTF-8 bytes of the token


class ChatLogprobToken(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(msgspec.Struct, kw_only=True):
    content: str | None = None
    role: Literal["assistant"] = "assistant"
    reasoning: str | None = None
    reasoning_content: str | None = None  # the older name of `reasoning`, same value
    tool_calls: list[ToolCall] = []


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None  # stop | length | tool_calls | abort
    stop_reason: int | str | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    """Reply of /v1/chat/completions without streaming."""

    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    kv_transfer_params: KVTransferParams | None = None  # a do_remote_decode request's answer


class DeltaFunctionCall(msgspec.Struct, omit_defaults=True, kw_only=True):
    name: str | None = None
    arguments: str | None = None  # a piece of the JSON arguments text


class DeltaToolCall(msgspec.Struct, omit_defaults=True, kw_only=True):
    index: int
    id: str | None = None  # set on the first delta of each call
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What one chunk adds to the reply; unset fields are left out of the JSON."""

    role: Literal["assistant"] | None = None  # only on the first chunk
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None  # the older name of `reasoning`, same value
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One `data:` event of a streamed chat completion."""

    id: str
    choices: list[ChatStreamChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: UsageInfo | None = None  # the final chunk when stream_options.include_usage


class ErrorInfo(msgspec.Struct, kw_only=True):
    message: str
    type: str  # e.g. BadRequestError, NotFoundError, InternalServerError
    param: str | None = None  # the offending request field, when known
    code: int | str | None = None  # vLLM puts the HTTP status here


class ErrorResponse(msgspec.Struct, kw_only=True):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo

    @classmethod
    def create(
        cls, message: str, err_type: str = "BadRequestError", status: int = 400,
        param: str | None = None,
    ) -> ErrorResponse:
        """An error body whose code is the HTTP status."""
        return cls(error=ErrorInfo(message=message, type=err_type, param=param, code=status))


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    owned_by: str = "tinyllm"
    object: Literal["model"] = "model"
    root: str | None = None  # the base model of a LoRA adapter, else the model itself
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: Literal["list"] = "list"


json_encoder = msgspec.json.Encoder()

"""`Processor`: prompt in, validated `AddRequest` out (tokenization and parameter checks).

Everything that can be rejected is rejected here, in the API process, with a ValueError naming
the field, so bad input never reaches the engine core.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any

import msgspec

from enginecore.config import EngineConfig
from enginecore.lora_adapter import inspect_lora_adapter
from enginecore.protocol import AddRequest, KVTransferParams, LoRARef, MMInput, PromptEmbeds
from frontend.multimodal import MultiModalProcessor
from frontend.prompt_embeds import FLAG_OFF, tensor_to_prompt_embeds
from frontend.tokenizer import Tokenizer
from sampling.logits_processor import LogitsProcessor, load_logits_processors
from sampling.params import SamplingParams, StructuredOutputsParams
from sampling.structured import LLTokenizer, load_lltokenizer, validate_structured_outputs

_GRAMMAR_CACHE_SIZE = 256  # constraints remembered as valid (serving validates each one twice)

# A prompt as users pass it: text, token ids, or vLLM's TextPrompt / TokensPrompt dicts.
PromptType = str | list[int] | dict[str, Any]


class Processor:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config.model.vocab_size
        # The engine's limit: the model's, capped at what the KV cache holds (CoreReady).
        self.max_model_len = config.model.max_model_len
        self._valid_constraints: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        # Custom logits processors check their extra_args here, so bad ones get a 400. Loading
        # imports the plug-in modules (possibly torch) into this process; only when configured.
        self.logits_processors: list[type[LogitsProcessor]] = load_logits_processors(
            config.model.logits_processors)
        self._valid_loras: set[str] = set()
        # Vision-language checkpoints only: images / videos -> pixel rows and placeholders.
        self.mm: MultiModalProcessor | None = (
            MultiModalProcessor(config.model.model, config.multimodal)
            if MultiModalProcessor.supports(config.model.model) else None)

    def process_prompt(self, prompt: PromptType
                       ) -> tuple[str | None, list[int], list[MMInput] | None]:
        """Like `tokenize_prompt`, plus a dict prompt's `multi_modal_data` (expanded ids)."""
        text, ids = self.tokenize_prompt(prompt)
        if not isinstance(prompt, dict):
            return text, ids, None
        if prompt.get("mm_inputs"):  # already processed (the chat endpoint)
            return text, ids, list(prompt["mm_inputs"])
        mm_data = prompt.get("multi_modal_data")
        if not mm_data:
            return text, ids, None
        if self.mm is None:
            raise ValueError("multi_modal_data: this model takes text only")
        ids, mm_inputs = self.mm.process(ids, mm_data, prompt.get("multi_modal_uuids"))
        return text, ids, mm_inputs or None

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Return (prompt text if any, prompt token ids); placeholders for embedding prompts."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if prompt.get("prompt_embeds") is not None:
                embeds = self.prompt_embeds(prompt)
                assert embeds is not None
                return None, [0] * embeds.shape[0]
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def prompt_embeds(self, prompt: PromptType) -> PromptEmbeds | None:
        """The prompt's embeddings ({"prompt_embeds": tensor or PromptEmbeds}), else None."""
        if not isinstance(prompt, dict) or prompt.get("prompt_embeds") is None:
            return None
        if not self.config.model.enable_prompt_embeds:
            raise ValueError(FLAG_OFF)
        embeds = prompt["prompt_embeds"]
        if isinstance(embeds, PromptEmbeds):
            return embeds
        return tensor_to_prompt_embeds(embeds, self.config.model.hidden_size)

    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, *, client_index: int = 0, priority: int = 0,
                     cache_salt: str | None = None, mm_inputs: list[MMInput] | None = None,
                     lora: LoRARef | None = None,
                     prompt_embeds: PromptEmbeds | None = None,
                     kv_transfer_params: KVTransferParams | None = None) -> AddRequest:
        """Validate and build the engine request; `params.n` must already be 1.

        `kv_transfer_params` (or, offline as in vLLM, `extra_args["kv_transfer_params"]`) are
        kept only by a NixlConnector instance; others ignore them."""
        params, kv_transfer_params = self._kv_transfer_params(params, kv_transfer_params)
        if lora is not None:
            self._check_lora(lora)
        max_len = self.max_model_len
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        if prompt_embeds is not None:
            if not self.config.model.enable_prompt_embeds:
                raise ValueError(FLAG_OFF)
            if params.prompt_logprobs is not None:
                raise ValueError("prompt_logprobs: not available for prompt_embeds prompts")
            assert prompt_embeds.shape[0] == len(prompt_token_ids)
        if len(prompt_token_ids) >= max_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; the model's "
                             f"max_model_len is {max_len} (prompt plus at least one new token)")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids contains id {bad[0]} outside the vocabulary "
                             f"[0, {self.vocab_size})")
        params.validate(self.vocab_size)
        self._check_logprobs(params)
        self._check_mm_inputs(mm_inputs)
        for cls in self.logits_processors:
            try:
                cls.validate_params(params)
            except Exception as e:  # a plug-in's own error type still becomes a clean 400
                raise ValueError(f"extra_args: {cls.__name__}: {e}") from None
        if params.structured_outputs is not None:
            params = msgspec.structs.replace(
                params, structured_outputs=self._structured_outputs(params.structured_outputs))
        if params.bad_words and params.bad_words_token_ids is None:
            params = msgspec.structs.replace(
                params, bad_words_token_ids=self._bad_words_ids(params.bad_words))
        return AddRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                          sampling=params, client_index=client_index, arrival_time=time.time(),
                          priority=priority, cache_salt=cache_salt, mm_inputs=mm_inputs,
                          lora=lora, prompt_embeds=prompt_embeds,
                          kv_transfer_params=kv_transfer_params)

    def _kv_transfer_params(self, params: SamplingParams, given: KVTransferParams | None
                            ) -> tuple[SamplingParams, KVTransferParams | None]:
        """Take kv_transfer_params out of extra_args; check them (None: not for this engine)."""
        extra = params.extra_args
        if extra is not None and "kv_transfer_params" in extra:
            rest = {k: v for k, v in extra.items() if k != "kv_transfer_params"}
            params = msgspec.structs.replace(params, extra_args=rest or None)
            if given is None:
                try:
                    given = msgspec.convert(extra["kv_transfer_params"], KVTransferParams)
                except msgspec.ValidationError as e:
                    raise ValueError(f"kv_transfer_params: {e}") from None
        kv = self.config.kv_transfer
        if given is None or kv is None or kv.kv_connector != "NixlConnector":
            return params, None
        if given.do_remote_prefill:
            error = given.remote_prefill_error(self.config.parallel.tensor_parallel_size)
            if error is not None:
                raise ValueError(error)
        return params, given

    def _check_mm_inputs(self, mm_inputs: list[MMInput] | None) -> None:
        """An item must fit the encoder budget and cache, or it could never be scheduled."""
        sched = self.config.scheduler
        limit = min(sched.max_num_encoder_input_tokens or sched.max_num_batched_tokens,
                    sched.encoder_cache_size or sched.max_num_batched_tokens)
        for item in mm_inputs or ():
            if item.length > limit:
                raise ValueError(f"multi_modal_data: a {item.modality} of {item.length} tokens "
                                 f"exceeds the encoder budget of {limit} tokens "
                                 "(--max-num-encoder-input-tokens, --encoder-cache-size)")

    def _check_lora(self, lora: LoRARef) -> None:
        """The adapter exists and fits (checked once per path): never a worker failure."""
        cfg = self.config.lora
        if not cfg.enable_lora:
            raise ValueError("lora_request: LoRA is not enabled (start the engine with "
                             "enable_lora=True / --enable-lora)")
        if lora.path not in self._valid_loras:
            inspect_lora_adapter(lora.path, cfg.max_lora_rank, self.config.model.model)
            self._valid_loras.add(lora.path)

    def _check_logprobs(self, params: SamplingParams) -> None:
        """`--max-logprobs` caps the top-k a request may ask for (each costs a row of output)."""
        cap = self.config.model.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if cap >= 0 and value is not None and value > cap:
                raise ValueError(f"{name}: at most {cap} (--max-logprobs), got {value}")

    def _structured_outputs(self, so: StructuredOutputsParams) -> StructuredOutputsParams:
        """Apply the engine-wide defaults, then check the constraint compiles (ValueError with
        llguidance's message otherwise)."""
        cfg = self.config.structured_outputs
        so = msgspec.structs.replace(
            so, disable_any_whitespace=so.disable_any_whitespace or cfg.disable_any_whitespace,
            disable_additional_properties=(so.disable_additional_properties
                                           or cfg.disable_additional_properties))
        key = msgspec.msgpack.encode(so)
        if key in self._valid_constraints:
            self._valid_constraints.move_to_end(key)
            return so
        validate_structured_outputs(so, self._lltokenizer)
        self._valid_constraints[key] = None
        if len(self._valid_constraints) > _GRAMMAR_CACHE_SIZE:
            self._valid_constraints.popitem(last=False)
        return so

    @functools.cached_property
    def _lltokenizer(self) -> LLTokenizer:
        # Built on the first constrained request (~5 ms at a 1k vocab, ~0.3 s at 32k).
        return load_lltokenizer(self.tokenizer.backend.to_str(), self.vocab_size,
                                tuple(self.config.model.eos_token_ids))

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as it tokenizes alone and after a space (both forms can be generated)."""
        out: list[list[int]] = []
        for word in words:
            for form in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(form, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

"""`OpenAIServing`: /v1/completions and /v1/chat/completions, from request body to response.

One HTTP request becomes a `_Job`: its prompts (one for chat, a batch for completions), one
validated `SamplingParams` per prompt, and `len(prompts) * n` choices. Each prompt runs as one
engine request (`AsyncEngine.generate` fans out `n`); their DELTA `RequestOutput`s are merged and
either streamed at once as SSE chunks or accumulated into one response:

    body --msgspec--> CompletionRequest | ChatCompletionRequest --> _Job(prompts, params)
        --> generate() per prompt --_merge--> (choice, delta) --> chunk | accumulated response

Everything a client can get wrong is checked before the first engine request is sent (length,
limits, SamplingParams.validate through the Processor), raising `APIError` or ValueError, which
the server answers with a 4xx. Leaving `_outputs` early (client gone: the handler is cancelled)
aborts every engine request of the job and counts its unfinished choices as aborted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from enginecore.protocol import KVTransferParams, MMInput, PromptEmbeds
from frontend import openai as api
from frontend.chat import ChatFeatures, ChatPlan, ChoiceParser
from frontend.cli import ServerConfig
from frontend.client import AsyncEngine, EngineDeadError
from frontend.lora import (
    LoRAModels,
    LoRARequest,
    load_lora_resolver_plugin,
    parse_lora_modules,
)
from frontend.media import MediaConnector, MediaRef, media_parts
from frontend.metrics import RequestTracker, ServerMetrics
from frontend.outputs import CompletionOutput, OutputKind, PositionLogprobs, RequestOutput
from frontend.prompt_embeds import FLAG_OFF, decode_prompt_embeds
from sampling.params import SamplingParams

logger = logging.getLogger("frontend.serving")

_MAX_CHOICES = 256  # prompts x n in one request
_MIN_LOGPROB = -9999.0  # JSON has no -inf


class APIError(Exception):
    """Answered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]
    echo: str = ""  # prepended to every choice's text when the request echoes
    mm_inputs: list[MMInput] | None = None  # images / videos of a chat prompt
    embeds: PromptEmbeds | None = None  # an embedding prompt (token_ids are placeholders)


@dataclass
class _Choice:
    """One completion of a request, accumulated from its deltas."""

    index: int
    tracker: RequestTracker
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False  # streaming: the echo went out
    parser: ChoiceParser | None = None  # chat with tools or reasoning (frontend/chat.py)
    offset: int = 0  # legacy logprobs: text offset of the next token

    def add(self, out: CompletionOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or [])
        self.tracker.on_tokens(len(out.token_ids))
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            self.tracker.finish(out.finish_reason)


@dataclass
class _Job:
    """One HTTP generation request: its prompts, their params, and its choices as they grow."""

    request_id: str
    model: str
    chat: bool
    prompts: list[_Prompt]
    params: list[SamplingParams]
    n: int
    choices: list[_Choice]
    stream: bool = False
    priority: int = 0
    cache_salt: str | None = None
    stream_options: api.StreamOptions | None = None
    echo_logprobs: bool = False  # completions: the echoed prompt carries logprobs too
    return_prompt_logprobs: bool = False
    lora: LoRARequest | None = None  # the adapter the `model` field named
    created: int = field(default_factory=lambda: int(time.time()))
    num_cached: list[int] = field(default_factory=list)
    prompt_logprobs: list[list[PositionLogprobs | None] | None] = field(default_factory=list)
    # NixlConnector: the request's kv_transfer_params, then (prefill) the answer's.
    kv_transfer_params: KVTransferParams | None = None
    kv_transfer_answer: KVTransferParams | None = None

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per generated token, None when the request wants none."""
        return self.params[0].logprobs

    def engine_id(self, i: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}"

    def usage(self) -> api.UsageInfo:
        num_prompt = sum(len(p.token_ids) for p in self.prompts)
        num_out = sum(len(c.token_ids) for c in self.choices)
        return api.UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_out,
                             total_tokens=num_prompt + num_out,
                             prompt_tokens_details=api.PromptTokensDetails(
                                 cached_tokens=sum(self.num_cached)))

    def chunk_usage(self) -> api.UsageInfo | None:
        opts = self.stream_options
        return self.usage() if opts is not None and opts.continuous_usage_stats else None


class OpenAIServing:
    """The two generation endpoints of one API server."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.model_names = list(config.served_model_name) or [engine.config.model.model]
        if config.lora_resolver_plugin is not None:
            load_lora_resolver_plugin(config.lora_resolver_plugin)
        self.loras = LoRAModels(engine.config, self.model_names[0],
                                parse_lora_modules(config.lora_modules, self.model_names[0]))
        self.chat_template = _read_template(config.chat_template)
        self.chat_features = ChatFeatures(config, self.tokenizer)
        self.media = MediaConnector(engine.config.multimodal)

    @property
    def max_model_len(self) -> int:
        """The engine's context limit (the model's, capped at the KV cache's capacity)."""
        return self.engine.processor.max_model_len

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        req = api.completion_request_decoder.decode(await request.read())
        await self.resolve_model(req.model)
        prompts = self._embeds_prompts(req)  # vLLM's order: embedding prompts first
        for p in req.prompts():
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, add_special_tokens=req.add_special_tokens)
                prompts.append(_Prompt(p, ids, p if req.echo else ""))
            else:
                echo = self.tokenizer.decode(p, skip_special_tokens=False) if req.echo else ""
                prompts.append(_Prompt(None, list(p), echo))
        job = self._make_job(req, prompts, chat=False)
        job.echo_logprobs = req.echo and req.logprobs is not None
        return await self._respond(request, job)

    def _embeds_prompts(self, req: api.CompletionRequest) -> list[_Prompt]:
        """Decode `prompt_embeds` (base64 torch.save'd tensors) into placeholder prompts."""
        if req.prompt_embeds is None:
            return []
        model = self.engine.config.model
        if not model.enable_prompt_embeds:
            raise APIError(400, FLAG_OFF, "prompt_embeds")
        if req.echo:
            raise APIError(400, "echo: not available with prompt_embeds", "echo")
        encoded = [req.prompt_embeds] if isinstance(req.prompt_embeds, str) else req.prompt_embeds
        prompts = []
        for item in encoded:
            embeds = decode_prompt_embeds(item, model.hidden_size)
            prompts.append(_Prompt(None, [0] * embeds.shape[0], "", embeds=embeds))
        return prompts

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        req = api.chat_request_decoder.decode(await request.read())
        await self.resolve_model(req.model)
        plan = self.chat_features.plan(req)
        job = self._make_job(req, [await self.chat_prompt(req, plan)], chat=True, plan=plan)
        for c in job.choices:
            c.parser = plan.choice_parser()
        return await self._respond(request, job)

    async def chat_prompt(self, req: api.ChatCompletionRequest,
                          plan: ChatPlan | None = None) -> _Prompt:
        """Render the messages (and tools) with the chat template and tokenize the result;
        fetch and preprocess the images and videos of content parts (multimodal models)."""
        plan = plan or self.chat_features.plan(req)
        messages = []
        media: list[MediaRef] = []
        for i, m in enumerate(req.messages):
            message = msgspec.to_builtins(m)
            if isinstance(m.content, list):
                if all(isinstance(part, api.TextPart) for part in m.content):
                    message["content"] = m.text_content()
                elif self.engine.processor.mm is None:
                    raise APIError(400, f"messages[{i}].content: this model takes text only",
                                   "messages")
                else:
                    message["content"] = media_parts(i, m.content, media)
            messages.append(message)
        kwargs: dict[str, Any] = {
            "add_generation_prompt": req.add_generation_prompt,
            "continue_final_message": req.continue_final_message, "tools": plan.template_tools,
            "chat_template": req.chat_template or self.chat_template}
        kwargs.update(req.chat_template_kwargs or {})  # vLLM lets these override the above
        try:
            text = self.tokenizer.apply_chat_template(plan.template_messages(messages), **kwargs)
        except TypeError as e:
            raise APIError(400, f"chat_template_kwargs: {e}", "chat_template_kwargs") from e
        ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        mm_inputs = None
        if media:  # fetch, preprocess, expand the placeholders
            ids, mm_inputs = await self.media.load_prompt_media(self.engine.processor.mm, ids,
                                                                media)
        plan.prompt = text
        # vLLM's echo: a reply that continues a final assistant message repeats that message.
        echo = ""
        if req.echo and messages[-1].get("role") == "assistant":
            echo = messages[-1].get("content") or ""
        return _Prompt(text, ids, echo, mm_inputs=mm_inputs)

    async def resolve_model(self, requested: str | None) -> None:
        """Let the LoRA resolvers find an adapter for a name nobody serves yet."""
        if requested is not None and requested not in self.model_names:
            await self.loras.lookup(requested)

    def model_name(self, requested: str | None) -> str:
        """The served name to answer with; APIError 404 for a name we do not serve."""
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names and requested not in self.loras.adapters:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")
        return requested

    def _make_job(self, req: api.CompletionRequest | api.ChatCompletionRequest,
                  prompts: list[_Prompt], chat: bool, plan: ChatPlan | None = None) -> _Job:
        model = self.model_name(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options: only allowed when stream is true",
                           "stream_options")
        if len(prompts) * req.n > _MAX_CHOICES:
            raise APIError(400, f"n: at most {_MAX_CHOICES} completions per request", "n")
        if req.kv_transfer_params is not None and len(prompts) * req.n > 1:
            raise APIError(400, "kv_transfer_params: only with one prompt and n=1",
                           "kv_transfer_params")
        params = [self._sampling_params(req, p, plan) for p in prompts]
        prefix = "chatcmpl" if chat else "cmpl"
        job = _Job(request_id=f"{prefix}-{uuid.uuid4().hex}", model=model, chat=chat,
                   prompts=prompts, params=params, n=req.n, choices=[], stream=req.stream,
                   priority=req.priority, cache_salt=req.cache_salt,
                   stream_options=req.stream_options,
                   return_prompt_logprobs=req.prompt_logprobs is not None,
                   num_cached=[0] * len(prompts), prompt_logprobs=[None] * len(prompts),
                   lora=self.loras.adapters.get(model), kv_transfer_params=req.kv_transfer_params)
        job.choices = [_Choice(i, self.metrics.track(len(prompts[i // req.n].token_ids)
                                                     if i % req.n == 0 else 0))
                       for i in range(len(prompts) * req.n)]
        self._log_request(job)
        return job

    def _sampling_params(self, req: api.CompletionRequest | api.ChatCompletionRequest,
                         prompt: _Prompt, plan: ChatPlan | None) -> SamplingParams:
        num_prompt, limit = len(prompt.token_ids), self.max_model_len
        where = "messages" if isinstance(req, api.ChatCompletionRequest) else "prompt"
        if num_prompt >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, and "
                           f"the prompt has {num_prompt} (a completion needs at least one more).",
                           where)
        params = req.to_sampling_params(limit - num_prompt)
        if plan is not None:  # tool choice constraint, reasoning gate
            params = plan.sampling_params(params)
        if params.max_tokens is not None and num_prompt + params.max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. You "
                           f"requested {num_prompt + params.max_tokens} tokens ({num_prompt} in "
                           f"the {where}, {params.max_tokens} for the completion).", "max_tokens")
        self.engine.processor.make_request("validate", prompt.token_ids, params,
                                           mm_inputs=prompt.mm_inputs,
                                           prompt_embeds=prompt.embeds,
                                           kv_transfer_params=req.kv_transfer_params)
        return params

    def _log_request(self, job: _Job) -> None:
        if not self.config.enable_log_requests:
            return
        cut = self.config.max_log_len
        for i, (prompt, params) in enumerate(zip(job.prompts, job.params, strict=True)):
            text = prompt.text if cut is None or prompt.text is None else prompt.text[:cut]
            ids = prompt.token_ids if cut is None else prompt.token_ids[:cut]
            logger.info("request %s: prompt %r, prompt_token_ids %s, params %s",
                        job.engine_id(i), text, ids, params)

    # ------------------------------------------------------------ running a job

    async def _respond(self, request: web.Request, job: _Job) -> web.StreamResponse:
        if job.stream:
            return await self._stream(request, job)
        async with aclosing(self._outputs(job)) as outputs:
            async for _ in outputs:
                pass
        return _json(self._chat_response(job) if job.chat else self._completion_response(job))

    async def _outputs(self, job: _Job) -> AsyncIterator[tuple[_Choice, CompletionOutput]]:
        """Run the job's engine requests; yield (choice, its delta) as outputs arrive."""
        streams = [self.engine.generate(
            {"prompt": p.text, "prompt_token_ids": p.token_ids, "mm_inputs": p.mm_inputs}
            if p.embeds is None else {"prompt_embeds": p.embeds}, params, job.engine_id(i),
            priority=job.priority, cache_salt=job.cache_salt, output_kind=OutputKind.DELTA,
            lora_request=job.lora, kv_transfer_params=job.kv_transfer_params)
            for i, (p, params) in enumerate(zip(job.prompts, job.params, strict=True))]
        try:
            async for i, out in _merge(streams):
                job.num_cached[i] = out.num_cached_tokens
                job.kv_transfer_answer = out.kv_transfer_params or job.kv_transfer_answer
                job.prompt_logprobs[i] = out.prompt_logprobs
                for delta in out.outputs:
                    choice = job.choices[i * job.n + delta.index]
                    choice.add(delta)
                    yield choice, delta
        finally:
            for choice in job.choices:  # left early: the client went away
                choice.tracker.finish("abort")
            for stream in streams:
                await stream.aclose()

    async def _stream(self, request: web.Request, job: _Job) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            if job.chat:  # the role (and vLLM's echo) first, as OpenAI does
                for c in job.choices:
                    c.started = True
                    delta = api.DeltaMessage(role="assistant", content=job.prompts[0].echo)
                    await _send(resp, self._chat_chunk(job, c, delta, None))
            async with aclosing(self._outputs(job)) as outputs:
                async for choice, out in outputs:
                    chunk = self._stream_chunk(job, choice, out)
                    if chunk is not None:
                        await _send(resp, chunk)
            if job.stream_options is not None and job.stream_options.include_usage:
                chunk_type = api.ChatCompletionChunk if job.chat else api.CompletionResponse
                await _send(resp, chunk_type(id=job.request_id, choices=[], created=job.created,
                                             model=job.model, usage=job.usage()))
        except EngineDeadError as e:
            await _send(resp, api.ErrorResponse.create(f"The engine is dead: {e}",
                                                       "ServiceUnavailableError", 503))
        except ConnectionResetError:  # the client left; leaving _outputs aborted the requests
            return resp
        except Exception as e:  # a bug of ours; the headers are out, so report it in-stream
            logger.exception("error in stream %s", job.request_id)
            await _send(resp, api.ErrorResponse.create(f"Internal server error: {e}",
                                                       "InternalServerError", 500))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _stream_chunk(self, job: _Job, c: _Choice, out: CompletionOutput) -> msgspec.Struct | None:
        text, ids, rows = out.text, out.token_ids, list(out.logprobs or [])
        if not c.started:
            c.started = True
            prompt = job.prompts[c.index // job.n]
            text = prompt.echo + text
            if job.echo_logprobs:
                ids = prompt.token_ids + ids
                rows = self._prompt_rows(job, c) + rows
        with_logprobs = job.num_logprobs is not None and bool(ids)
        finish, delta, held = out.finish_reason, api.DeltaMessage(content=text), not text
        if c.parser is not None:  # the parsers may hold text back too (a tag, an open call)
            delta = c.parser.feed(text, final=finish is not None)
            finish = c.parser.finish_reason(finish, c.parser.tools_called)
            held = delta == api.DeltaMessage()
        if held and not (finish or with_logprobs):
            return None  # tokens still held back (stop-string prefix, partial character)
        if job.chat:
            logprobs = _chat_logprobs(ids, rows, job.num_logprobs) if with_logprobs else None
            return self._chat_chunk(job, c, delta, logprobs, finish, out.stop_reason)
        legacy = None
        if with_logprobs:
            legacy, c.offset = self._legacy_logprobs(ids, rows, c.offset)
        choice = api.CompletionChoice(index=c.index, text=text, logprobs=legacy,
                                      finish_reason=out.finish_reason,
                                      stop_reason=out.stop_reason)
        return api.CompletionResponse(id=job.request_id, choices=[choice], created=job.created,
                                      model=job.model, usage=job.chunk_usage())

    def _chat_chunk(self, job: _Job, c: _Choice, delta: api.DeltaMessage,
                    logprobs: list[api.ChatLogprobToken] | None, finish_reason: str | None = None,
                    stop_reason: int | str | None = None) -> api.ChatCompletionChunk:
        choice = api.ChatStreamChoice(
            index=c.index, delta=delta, finish_reason=finish_reason, stop_reason=stop_reason,
            logprobs=None if logprobs is None else api.ChatLogprobs(content=logprobs))
        return api.ChatCompletionChunk(id=job.request_id, choices=[choice], created=job.created,
                                       model=job.model, usage=job.chunk_usage())

    # ------------------------------------------------------------ whole responses

    def _completion_response(self, job: _Job) -> api.CompletionResponse:
        choices = []
        for c in job.choices:
            i = c.index // job.n
            prompt, ids, rows = job.prompts[i], c.token_ids, c.logprobs
            if job.echo_logprobs:
                ids, rows = prompt.token_ids + ids, self._prompt_rows(job, c) + rows
            legacy = None
            if job.num_logprobs is not None:
                legacy = self._legacy_logprobs(ids, rows, 0)[0]
            choices.append(api.CompletionChoice(
                index=c.index, text=prompt.echo + "".join(c.text), logprobs=legacy,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                prompt_logprobs=_api_prompt_logprobs(job.prompt_logprobs[i])
                if job.return_prompt_logprobs else None))
        return api.CompletionResponse(id=job.request_id, choices=choices, created=job.created,
                                      model=job.model, usage=job.usage(),
                                      kv_transfer_params=job.kv_transfer_answer)

    def _chat_response(self, job: _Job) -> api.ChatCompletionResponse:
        choices = []
        for c in job.choices:
            message, finish = self._chat_message(job, c)
            choices.append(api.ChatChoice(
                index=c.index, message=message, finish_reason=finish, stop_reason=c.stop_reason,
                logprobs=None if job.num_logprobs is None else api.ChatLogprobs(
                    content=_chat_logprobs(c.token_ids, c.logprobs, job.num_logprobs))))
        prompt_logprobs = (_api_prompt_logprobs(job.prompt_logprobs[0])
                           if job.return_prompt_logprobs else None)
        return api.ChatCompletionResponse(id=job.request_id, choices=choices, created=job.created,
                                          model=job.model, usage=job.usage(),
                                          prompt_logprobs=prompt_logprobs,
                                          kv_transfer_params=job.kv_transfer_answer)

    def _chat_message(self, job: _Job, c: _Choice) -> tuple[api.ChatResponseMessage, str | None]:
        """One choice's message (reasoning and tool calls split off) and finish reason."""
        echo, text = job.prompts[0].echo, "".join(c.text)
        if c.parser is None:
            return api.ChatResponseMessage(content=echo + text), c.finish_reason
        message, called = c.parser.message(text)
        if echo:
            message.content = echo + (message.content or "")
        return message, c.parser.finish_reason(c.finish_reason, called)

    def _prompt_rows(self, job: _Job, c: _Choice) -> list[PositionLogprobs | None]:
        """The prompt's logprob rows for an echo (entry 0 is None: nothing precedes it)."""
        i = c.index // job.n
        rows = job.prompt_logprobs[i]
        return list(rows) if rows is not None else [None] * len(job.prompts[i].token_ids)

    def _legacy_logprobs(self, ids: list[int], rows: list[PositionLogprobs | None],
                         offset: int) -> tuple[api.CompletionLogprobs, int]:
        """Completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
        out = api.CompletionLogprobs()
        for token_id, row in zip(ids, rows, strict=True):
            chosen = row.get(token_id) if row else None
            text = chosen.decoded_token if chosen and chosen.decoded_token is not None else \
                self.tokenizer.decode([token_id], skip_special_tokens=False)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            out.token_logprobs.append(None if chosen is None else _clamp(chosen.logprob))
            out.top_logprobs.append(None if row is None else {
                lp.decoded_token or "": _clamp(lp.logprob) for lp in row.values()})
        return out, offset


# ---------------------------------------------------------------------- helpers


async def _merge(streams: list[AsyncIterator[RequestOutput]],
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several generate() streams as (stream index, output); cancels all on exit."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:  # cancelling a pump leaves its generate(), which aborts the request
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _chat_logprobs(ids: list[int], rows: list[PositionLogprobs | None],
                   num_top: int | None) -> list[api.ChatLogprobToken]:
    """Chat's logprobs.content: the chosen token and the `num_top` most likely ones."""
    out = []
    for token_id, row in zip(ids, rows, strict=True):
        if row is None:
            continue
        chosen = row[token_id]
        # The row holds the chosen token (its true rank) and the top-k (ranks 1..k).
        top = sorted(row.values(), key=lambda lp: lp.rank or 0)[:num_top or 0]
        text = chosen.decoded_token or ""
        out.append(api.ChatLogprobToken(
            token=text, logprob=_clamp(chosen.logprob), bytes=list(text.encode()),
            top_logprobs=[api.TopLogprob(token=lp.decoded_token or "", logprob=_clamp(lp.logprob),
                                         bytes=list((lp.decoded_token or "").encode()))
                          for lp in top]))
    return out


def _api_prompt_logprobs(rows: list[PositionLogprobs | None] | None) -> api.PromptLogprobs:
    return [None if row is None else {
        tok: api.Logprob(logprob=_clamp(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
        for tok, lp in row.items()} for row in rows or []]


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _json(body: msgspec.Struct) -> web.Response:
    return web.json_response(body=api.json_encoder.encode(body))


async def _send(resp: web.StreamResponse, chunk: msgspec.Struct) -> None:
    await resp.write(b"data: " + api.json_encoder.encode(chunk) + b"\n\n")


def _read_template(template: str | None) -> str | None:
    """`--chat-template`: a file's text, or the argument itself as an inline template."""
    if template is not None and "{" not in template and Path(template).is_file():
        return Path(template).read_text(encoding="utf-8")
    return template


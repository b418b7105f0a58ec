"""`OpenAIServer`: the OpenAI-compatible HTTP API (aiohttp) over one `AsyncEngine`.

    POST /v1/completions, /v1/chat/completions   generate (`frontend/serving.py`); SSE with `stream`
    GET  /v1/models                              the served model names
    POST /tokenize, /detokenize                  the tokenizer (vLLM's request shapes)
    GET  /health (503 once the engine is dead), /version, /metrics (Prometheus)
    GET  /openapi.json                           this API as OpenAPI 3.1 (`openapi_spec.py`)
    POST /reset_prefix_cache
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   with TLS_ALLOW_RUNTIME_LORA_UPDATING=1
    POST /sleep?level=1|2, POST /wake_up[?tags=weights|kv_cache], GET /is_sleeping,
    POST /reload_weights[?path=DIR]   (only with --enable-sleep-mode)

Every failure answers OpenAI's error JSON {"error": {"message", "type", "param", "code"}}: 400 for
bad JSON, wrong types and invalid values (any ValueError: msgspec's, the Processor's,
SamplingParams'), 401 for a bad API key (on /v1/* only), 404 for an unknown model or route, 405 for
a wrong method, 413 for a body over the size limit, 503 once the engine is dead; a 500 only for a
bug of ours. Requests run in handlers that aiohttp cancels when the client disconnects
(`handler_cancellation=True` on the runner), which aborts their engine requests.

Embedding: `OpenAIServer(engine, ServerConfig()).app` is an ordinary aiohttp application over an
`AsyncEngine`; `python -m frontend serve` runs one in each API-server process.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import re
import time
from typing import Any

import msgspec
from aiohttp import web

from frontend import openai as api
from frontend.cli import ServerConfig
from frontend.client import AsyncEngine, EngineDeadError
from frontend.lora import (
    LoadLoRAAdapterRequest,
    LoRANotFound,
    LoRARequest,
    UnloadLoRAAdapterRequest,
    lora_int_id,
)
from frontend.metrics import ServerMetrics
from frontend.openapi_spec import build_openapi_spec
from frontend.serving import APIError, OpenAIServing

logger = logging.getLogger("frontend.server")

MAX_BODY_BYTES = 16 << 20  # larger request bodies are answered 413
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 408: "RequestTimeoutError",
                413: "RequestTooLargeError",
                503: "ServiceUnavailableError"}
# Where a ValueError message names the offending field: msgspec paths, SamplingParams, "field: ".
_PARAM_RES = (re.compile(r"at `\$\.(\w+)"), re.compile(r"required field `(\w+)`"),
              re.compile(r"^SamplingParams\.(\w+) "), re.compile(r"^(\w+): "))


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    """OpenAI-style error body with `code` = the HTTP status."""
    body = api.ErrorResponse.create(message, _ERROR_TYPES.get(status, "InternalServerError"),
                                    status, param)
    return web.json_response(body=api.json_encoder.encode(body), status=status)


def _version() -> str:
    try:
        return importlib.metadata.version("tinyllm-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _param_of(message: str) -> str | None:
    for pattern in _PARAM_RES:
        if m := pattern.search(message):
            return m[1]
    return None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """Body of POST /tokenize: a `prompt`, or chat `messages` rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[api.ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """Body of POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class OpenAIServer:
    """Routes, middlewares and the small endpoints; `app` is the aiohttp application to run."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig,
                 metrics_dir: str | None = None):
        self.engine = engine
        self.config = config
        name = (config.served_model_name or [engine.config.model.model])[0]
        self.metrics = ServerMetrics(name, lambda: engine.stats_by_rank, metrics_dir)
        self.tokenizer = engine.tokenizer
        self.serving = OpenAIServing(engine, config, self.metrics)
        self.created = int(time.time())
        self._auth = None if config.api_key is None else f"Bearer {config.api_key}".encode()
        self._openapi: bytes | None = None
        self.app = web.Application(middlewares=[self._errors, self._check_key, self._read_body],
                                   client_max_size=MAX_BODY_BYTES)
        self.app.add_routes([
            web.post("/v1/completions", self.serving.completions),
            web.post("/v1/chat/completions", self.serving.chat_completions),
            web.get("/v1/models", self.models), web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize), web.get("/health", self.health),
            web.get("/version", self.version), web.get("/metrics", self.metrics_endpoint),
            web.post("/reset_prefix_cache", self.reset_prefix_cache),
            web.get("/openapi.json", self.openapi),
        ])
        if self.serving.loras.runtime_updates:
            self.app.add_routes([web.post("/v1/load_lora_adapter", self.load_lora_adapter),
                                 web.post("/v1/unload_lora_adapter", self.unload_lora_adapter)])
        if engine.config.model.enable_sleep_mode:  # dev endpoints, as vLLM's (docs/sleep_mode.md)
            self.app.add_routes([
                web.post("/sleep", self.sleep), web.post("/wake_up", self.wake_up),
                web.get("/is_sleeping", self.is_sleeping),
                web.post("/reload_weights", self.reload_weights),
            ])

    # ------------------------------------------------------------ middlewares

    @web.middleware
    async def _read_body(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Read a POST body within `request_body_timeout` (aiohttp caches it for the handler):
        a client trickling its body must not hold a handler forever."""
        if request.method == "POST" and request.can_read_body:
            try:
                await asyncio.wait_for(request.read(), self.config.request_body_timeout)
            except TimeoutError:
                return error_response(408, "request body not received within "
                                           f"{self.config.request_body_timeout} s")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e.status, str(e), e.param)
        except web.HTTPException as e:  # the router's 404 / 405, aiohttp's 413
            if e.status < 400:
                raise
            message = f"{e.reason}: {request.method} {request.path}"
            return error_response(e.status, message if e.status in (404, 405) else e.text or "")
        except EngineDeadError as e:
            return error_response(503, f"The engine is dead: {e}")
        except ValueError as e:  # msgspec's errors (and UnicodeDecodeError) are ValueErrors too
            if isinstance(e, UnicodeDecodeError | msgspec.DecodeError) and \
                    not isinstance(e, msgspec.ValidationError):
                return error_response(400, f"Invalid JSON body: {e}")
            return error_response(400, str(e), _param_of(str(e)))
        except Exception:
            logger.exception("error handling %s %s", request.method, request.path)
            return error_response(500, "Internal server error")

    @web.middleware
    async def _check_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._auth is not None and request.path.startswith("/v1"):
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, self._auth):  # constant time: no key-guessing clock
                raise APIError(401, "Invalid or missing API key")
        return await handler(request)

    # ------------------------------------------------------------ small endpoints

    async def health(self, request: web.Request) -> web.Response:
        if self.engine.dead:
            raise APIError(503, f"The engine is dead: {self.engine.dead}")
        return web.Response()

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": _version()})

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:  # built on first use, then served as is
            self._openapi = msgspec.json.encode(build_openapi_spec(
                _version(), {"/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest},
                secured=self._auth is not None))
        return web.Response(body=self._openapi, content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        root = self.engine.config.model.model
        cards = [api.ModelCard(id=name, created=self.created, root=root,
                               max_model_len=self.serving.max_model_len)
                 for name in self.serving.model_names]
        cards += [api.ModelCard(id=name, created=self.created, root=lora.lora_path,
                                parent=lora.base_model_name or self.serving.model_names[0],
                                max_model_len=self.serving.max_model_len)
                  for name, lora in self.serving.loras.adapters.items()]
        return web.json_response(body=api.json_encoder.encode(api.ModelList(data=cards)))

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        req = msgspec.json.decode(await request.read(), type=LoadLoRAAdapterRequest)
        loras = self.serving.loras
        if req.lora_name in self.serving.model_names:
            raise ValueError(f"lora_name: '{req.lora_name}' is the base model's name")
        loras.add(LoRARequest(req.lora_name, lora_int_id(req.lora_name, req.lora_path),
                              req.lora_path, self.serving.model_names[0]))  # ValueError: 400
        return web.Response(text=f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        req = msgspec.json.decode(await request.read(), type=UnloadLoRAAdapterRequest)
        try:
            lora = self.serving.loras.remove(req.lora_name)
        except LoRANotFound as e:
            raise APIError(404, str(e), "lora_name") from None
        await self.engine.remove_lora(lora)
        return web.Response(text=f"Success: LoRA adapter '{req.lora_name}' removed "
                                 "successfully.")

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        if not self.engine.dead:  # fresh engine-wide stats (KV usage, queues) for the scrape
            try:
                await asyncio.wait_for(self.engine.get_stats(), 5.0)
            except (EngineDeadError, TimeoutError):
                pass
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        return web.json_response({"success": await self.engine.reset_prefix_cache()})

    async def sleep(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            raise ValueError(f"level: must be 1 or 2, got {level!r}")
        await self.engine.sleep(int(level))
        return web.json_response({"success": True})

    async def wake_up(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", None)
        if tags is not None:  # ?tags=weights&tags=kv_cache or ?tags=weights,kv_cache
            tags = [t for value in tags for t in value.split(",") if t]
        await self.engine.wake_up(tags)
        return web.json_response({"success": True})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": await self.engine.is_sleeping()})

    async def reload_weights(self, request: web.Request) -> web.Response:
        await self.engine.reload_weights(request.query.get("path"))
        return web.json_response({"success": True})

    async def tokenize(self, request: web.Request) -> web.Response:
        req = msgspec.json.decode(await request.read(), type=TokenizeRequest)
        self.serving.model_name(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        if req.messages is not None:
            chat = api.ChatCompletionRequest(
                messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs,
                add_special_tokens=bool(req.add_special_tokens))
            ids = (await self.serving.chat_prompt(chat)).token_ids
        else:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = self.tokenizer.encode(req.prompt or "", add_special_tokens=special)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return web.json_response({"count": len(ids), "max_model_len": self.serving.max_model_len,
                                  "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        req = msgspec.json.decode(await request.read(), type=DetokenizeRequest)
        self.serving.model_name(req.model)
        vocab = self.engine.config.model.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise ValueError(f"tokens: ids must be in [0, {vocab})")
        return web.json_response({"prompt": self.tokenizer.decode(req.tokens)})

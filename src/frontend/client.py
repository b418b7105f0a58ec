"""`AsyncEngine`: the asyncio client of one engine core. Embeddable in any asyncio app.

    engine = await AsyncEngine.start(EngineConfig.create("path/to/model"))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
        print(out.outputs[0].text)
    await engine.shutdown()

Sockets: a ZMQ PUSH to the core's input address and a PULL from this client's output address.
One background task (`_output_loop`) demultiplexes `EngineOutputs` into per-request queues; it
also watches the core process, so a dead engine fails every pending request with
`EngineDeadError` instead of leaving callers waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from enginecore.config import EngineConfig, Env
from enginecore.protocol import (
    Abort,
    Control,
    CoreReady,
    EngineOutputs,
    LoRARef,
    MMInput,
    PromptEmbeds,
    SchedulerStats,
    TokenDelta,
    core_output_decoder,
    encode,
)
from frontend.launch import CoreHandle, start_engine_core
from frontend.lora import LoRARequest
from frontend.output_processor import ParentRequest, RequestState
from frontend.outputs import OutputKind, RequestOutput
from frontend.processor import Processor, PromptType
from frontend.tokenizer import Tokenizer
from sampling.params import SamplingParams

_READY_TIMEOUT_S = 900.0
_POLL_MS = 500


class EngineDeadError(RuntimeError):
    """The engine core (or one of its workers) died; no request can complete."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str,
                 client_index: int = 0, core: CoreHandle | None = None):
        self.config = config
        self.client_index = client_index
        self.core = core
        self.tokenizer = Tokenizer.from_pretrained(config.model.tokenizer or config.model.model)
        self.processor = Processor(config, self.tokenizer)
        self.ctx = zmq.asyncio.Context()
        self.input = self.ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(input_addr)
        self.output = self.ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.LINGER, 0)
        self.output.connect(output_addr)
        self.states: dict[str, RequestState] = {}  # engine request id -> state
        self.ready: CoreReady | None = None
        self.stats = SchedulerStats()
        self.dead: str | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._output_task: asyncio.Task | None = None

    @classmethod
    async def start(cls, config: EngineConfig) -> AsyncEngine:
        """Launch an engine core (and its workers) owned by this client."""
        core = start_engine_core(config, num_clients=1)
        engine = cls(config, core.input_addr, core.output_addrs[0], 0, core)
        try:
            await engine._wait_ready()
        except BaseException:
            await engine.shutdown()
            raise
        return engine

    @classmethod
    async def connect(cls, config: EngineConfig, input_addr: str, output_addr: str,
                      client_index: int) -> AsyncEngine:
        """Attach to a running engine core as client `client_index` (API server processes)."""
        engine = cls(config, input_addr, output_addr, client_index)
        await engine._wait_ready()
        return engine

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while self.ready is None:
            if self.core is not None and not self.core.alive():
                raise EngineDeadError(f"engine core exited with code {self.core.proc.poll()} "
                                      "during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("engine core did not become ready")
            if await self.output.poll(_POLL_MS):
                msg = core_output_decoder.decode(await self.output.recv())
                if isinstance(msg, CoreReady):
                    self.ready = msg
                    self.processor.max_model_len = msg.max_model_len
                elif msg.engine_error:
                    raise EngineDeadError(msg.engine_error)
        self._output_task = asyncio.create_task(self._output_loop())

    # ------------------------------------------------------------ output side

    async def _output_loop(self) -> None:
        try:
            while True:
                if not await self.output.poll(_POLL_MS):
                    if not self._core_alive():
                        self._fail_all("engine core process died")
                        return
                    continue
                msg = core_output_decoder.decode(await self.output.recv())
                if isinstance(msg, EngineOutputs):
                    self._handle_outputs(msg)
        except asyncio.CancelledError:
            pass

    def _core_alive(self) -> bool:
        if self.core is not None:
            return self.core.alive()
        try:
            os.kill(self.ready.engine_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def _handle_outputs(self, msg: EngineOutputs) -> None:
        if msg.stats is not None:
            self.stats = msg.stats
        if msg.engine_error:
            self._fail_all(msg.engine_error)
            return
        stopped: list[str] = []
        for delta in msg.outputs:
            state = self.states.get(delta.request_id)
            if state is None:
                continue  # already finished here (stop string) or aborted
            if state.process(delta):
                stopped.append(delta.request_id)
            if state.finished:
                del self.states[delta.request_id]
        if stopped:
            self._send(Abort(request_ids=stopped))
        if msg.control is not None and (fut := self._calls.pop(msg.control.call_id, None)):
            if not fut.done():
                fut.set_result(msg.control)

    def _fail_all(self, why: str) -> None:
        self.dead = why
        error = EngineDeadError(why)
        for state in list(self.states.values()):
            state.parent.fail(error)
        self.states.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
        self._calls.clear()

    # ------------------------------------------------------------ requests

    def _send(self, msg: msgspec.Struct) -> None:
        self.input.send(encode(msg), copy=False)

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0,
                       cache_salt: str | None = None,
                       output_kind: OutputKind = OutputKind.CUMULATIVE,
                       lora_request: LoRARequest | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Submit one request; yield RequestOutputs until it finishes.

        Breaking out of the iteration (or cancelling the task) aborts the request.
        """
        if self.dead:
            raise EngineDeadError(self.dead)
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        embeds = self.processor.prompt_embeds(prompt)
        if embeds is not None:  # a tensor is converted once, here
            prompt = {"prompt_embeds": embeds}
        text, prompt_ids, mm_inputs = self.processor.process_prompt(prompt)
        parent = ParentRequest(request_id, text, prompt_ids, params.n, output_kind)
        child_ids = self._add(parent, params, priority, cache_salt, mm_inputs,
                              None if lora_request is None else lora_request.to_ref(), embeds)
        try:
            while True:
                item = await parent.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            alive = [c for c in child_ids if c in self.states]
            for c in alive:
                del self.states[c]
            if alive and not self.dead:
                self._send(Abort(request_ids=alive))

    def _add(self, parent: ParentRequest, params: SamplingParams, priority: int,
             cache_salt: str | None, mm_inputs: list[MMInput] | None = None,
             lora: LoRARef | None = None,
             prompt_embeds: PromptEmbeds | None = None) -> list[str]:
        """Fan out n > 1 into n engine requests (distinct seeds), validated before any is sent."""
        n = params.n
        child_ids = [parent.request_id] if n == 1 else \
            [f"{parent.request_id}-{i}" for i in range(n)]
        requests = []
        for i, child_id in enumerate(child_ids):
            child = params if n == 1 else msgspec.structs.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            if child_id in self.states:
                raise ValueError(f"request_id {child_id!r} is already in use")
            requests.append(self.processor.make_request(
                child_id, parent.prompt_token_ids, child, client_index=self.client_index,
                priority=priority, cache_salt=cache_salt, mm_inputs=mm_inputs, lora=lora,
                prompt_embeds=prompt_embeds))
        for i, req in enumerate(requests):
            self.states[req.request_id] = RequestState(parent, i, self.tokenizer, req.sampling)
            self._send(req)
        return child_ids

    async def abort(self, request_id: str) -> None:
        """Abort a request (all of its n completions)."""
        ids = [rid for rid, s in self.states.items() if s.parent.request_id == request_id]
        for rid in ids:
            self.states.pop(rid).process(TokenDelta(request_id=rid, new_token_ids=[],
                                                    finish_reason="abort"))
        if ids:
            self._send(Abort(request_ids=ids))

    async def _control(self, op: str, timeout: float = 30.0, **fields: Any):
        if self.dead:
            raise EngineDeadError(self.dead)
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._send(Control(call_id=call_id, op=op, client_index=self.client_index, **fields))
        return await asyncio.wait_for(fut, timeout)

    async def _checked_control(self, op: str, **fields: Any):
        result = await self._control(op, timeout=600.0, **fields)  # offload/reload take a while
        if not result.ok:
            raise ValueError(result.error)
        return result

    async def sleep(self, level: int = 1) -> None:
        """Sleep mode: release weights (level 1: to host memory, 2: discarded) and KV cache."""
        await self._checked_control("sleep", level=level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Wake the named parts ("weights", "kv_cache"; default all)."""
        await self._checked_control("wake_up", tags=tags)

    async def is_sleeping(self) -> bool:
        """True until every part is awake."""
        return bool((await self._checked_control("is_sleeping")).value)

    async def reload_weights(self, path: str | None = None) -> None:
        """Load the weights again (after a level-2 sleep, or new ones of the same shapes)."""
        await self._checked_control("reload_weights", path=path)

    async def reset_prefix_cache(self) -> bool:
        return bool((await self._control("reset_prefix_cache")).value)

    async def remove_lora(self, lora_request: LoRARequest) -> None:
        """Tell the workers to drop an unloaded adapter from their caches."""
        await self._control("remove_lora", lora=lora_request.to_ref())

    async def get_stats(self) -> SchedulerStats:
        """Fresh scheduler stats (KV usage, prefix-cache counters, preemptions)."""
        await self._control("get_stats")
        return self.stats

    async def shutdown(self) -> None:
        """Stop the output task and, if this client launched it, the engine core."""
        if self._output_task is not None:
            self._output_task.cancel()
            await asyncio.gather(self._output_task, return_exceptions=True)
        if self.core is not None:
            await asyncio.to_thread(self.core.stop, Env.PEER_TIMEOUT_S * 2)
        self.input.close()
        self.output.close()
        self.ctx.term()

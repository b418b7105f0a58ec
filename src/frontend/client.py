"""`AsyncEngine`: the asyncio client of the engine cores. Embeddable in any asyncio app.

    engine = await AsyncEngine.start(EngineConfig.create("path/to/model"))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
        print(out.outputs[0].text)
    await engine.shutdown()

Sockets: per engine core (one per data-parallel rank, `frontend/engine_link.py`), a ZMQ PUSH to
the core's input address and a PULL from this client's output address. Each new request goes to
the least loaded core (vLLM's `waiting * 4 + running`); its aborts follow it there; control ops
go to every core. One background task (`_output_loop`) demultiplexes `EngineOutputs` from all
cores into per-request queues; it also watches every core, so one dead core (or a remote one
gone silent) fails every pending request with `EngineDeadError` instead of leaving callers
waiting.
"""

from __future__ import annotations

import asyncio
import itertools
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
    ControlResult,
    CoreReady,
    EngineOutputs,
    KVTransferParams,
    LoRARef,
    MMInput,
    PromptEmbeds,
    SchedulerStats,
    TokenDelta,
    core_output_decoder,
)
from frontend.engine_link import EngineEndpoint, EngineLink, sum_stats
from frontend.launch import CoreHandle, start_local_cores
from frontend.lora import LoRARequest
from frontend.output_processor import ParentRequest, RequestState
from frontend.outputs import OutputKind, RequestOutput
from frontend.processor import Processor, PromptType
from frontend.tokenizer import Tokenizer
from sampling.params import SamplingParams

_READY_TIMEOUT_S = 900.0
_POLL_MS = 500
_PING_S = 1.0  # how often a client pings each remote engine core


class EngineDeadError(RuntimeError):
    """The engine core (or one of its workers) died; no request can complete."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, endpoints: list[EngineEndpoint],
                 client_index: int = 0, cores: list[CoreHandle] | None = None):
        self.config = config
        self.client_index = client_index
        self.cores = cores or []  # the engine cores this client launched (and stops)
        self.tokenizer = Tokenizer.from_pretrained(config.model.tokenizer or config.model.model)
        self.processor = Processor(config, self.tokenizer)
        self.ctx = zmq.asyncio.Context()
        handles = {core.dp_rank: core for core in self.cores}
        self.links = [EngineLink(self.ctx, ep, handles.get(ep.dp_rank)) for ep in endpoints]
        self.states: dict[str, RequestState] = {}  # engine request id -> state
        self.link_of: dict[str, EngineLink] = {}  # engine request id -> the core running it
        self.ready: CoreReady | None = None  # rank 0's (every rank serves the same model)
        self.dead: str | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._output_task: asyncio.Task | None = None

    @property
    def core(self) -> CoreHandle | None:
        """The (first) engine core this client launched, if any."""
        return self.cores[0] if self.cores else None

    @property
    def stats(self) -> SchedulerStats:
        """Engine-wide scheduler stats (summed over DP ranks), as of the latest outputs."""
        if len(self.links) == 1:
            return self.links[0].stats
        return sum_stats([link.stats for link in self.links])

    @property
    def stats_by_rank(self) -> dict[int, SchedulerStats]:
        """DP rank -> that engine core's latest scheduler stats."""
        return {link.dp_rank: link.stats for link in self.links}

    @classmethod
    async def start(cls, config: EngineConfig) -> AsyncEngine:
        """Launch the engine cores (one per DP rank, each with its workers) owned by this client.

        Every rank runs on this machine here; several nodes need `python -m frontend serve`.
        """
        if config.parallel.local_dp_size != config.parallel.data_parallel_size:
            config = msgspec.structs.replace(config, parallel=msgspec.structs.replace(
                config.parallel, data_parallel_size_local=None, data_parallel_start_rank=0))
        cores = start_local_cores(config, num_clients=1)
        endpoints = [EngineEndpoint(dp_rank=c.dp_rank, input_addr=c.input_addr,
                                    output_addr=c.output_addrs[0]) for c in cores]
        engine = cls(config, endpoints, 0, cores)
        try:
            await engine._wait_ready()
        except BaseException:
            await engine.shutdown()
            raise
        return engine

    @classmethod
    async def connect(cls, config: EngineConfig, endpoints: list[EngineEndpoint],
                      client_index: int) -> AsyncEngine:
        """Attach to running engine cores as client `client_index` (API server processes)."""
        engine = cls(config, endpoints, client_index)
        await engine._wait_ready()
        return engine

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        poller = self._poller()
        while any(link.ready is None for link in self.links):
            if time.monotonic() > deadline:
                raise TimeoutError("engine core did not become ready")
            ready = await self._ready_links(poller)
            for link in ready:
                msg = core_output_decoder.decode(await link.output.recv())
                link.heard(msg)
                if isinstance(msg, EngineOutputs) and msg.engine_error:
                    raise EngineDeadError(msg.engine_error)
            if (why := self._dead_reason()) is not None:
                raise EngineDeadError(f"{why} during startup")
        self.ready = self.links[0].ready
        self.processor.max_model_len = min(link.ready.max_model_len for link in self.links)
        self._output_task = asyncio.create_task(self._output_loop())

    def _poller(self) -> zmq.asyncio.Poller:
        poller = zmq.asyncio.Poller()
        for link in self.links:
            poller.register(link.output, zmq.POLLIN)
        return poller

    async def _ready_links(self, poller: zmq.asyncio.Poller) -> list[EngineLink]:
        """The links with a message to read, after waiting up to _POLL_MS for one."""
        events = dict(await poller.poll(_POLL_MS))
        return [link for link in self.links if link.output in events]

    def _ping_remote(self) -> None:
        """Let remote cores know this client is alive (they exit when the head goes silent);
        the answers bring fresh stats for load balancing."""
        now = time.monotonic()
        for link in self.links:
            if not link.endpoint.local and now - link.last_pinged > _PING_S:
                link.last_pinged = now
                link.send(Control(call_id=-1, op="ping", client_index=self.client_index))

    def _dead_reason(self) -> str | None:
        """Why some core counts as dead, or None. Called right after reading what the poll
        found, so a core is never judged silent while its messages wait unread (a live core's
        heartbeats queue up even while this process is busy elsewhere)."""
        for link in self.links:
            if (why := link.dead_reason()) is not None:
                return why
        return None

    # ------------------------------------------------------------ output side

    async def _output_loop(self) -> None:
        poller = self._poller()
        last_check = time.monotonic()
        try:
            while True:
                ready = await self._ready_links(poller)
                for link in ready:
                    msg = core_output_decoder.decode(await link.output.recv())
                    link.heard(msg)
                    if isinstance(msg, EngineOutputs):
                        self._handle_outputs(msg)
                        if self.dead:
                            return
                if time.monotonic() - last_check > _POLL_MS / 1000:
                    last_check = time.monotonic()
                    if (why := self._dead_reason()) is not None:
                        self._fail_all(why)
                        return
                    self._ping_remote()
        except asyncio.CancelledError:
            pass

    def _handle_outputs(self, msg: EngineOutputs) -> None:
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
                if delta.request_id not in stopped:
                    self.link_of.pop(delta.request_id, None)
        if stopped:
            self._abort_ids(stopped)
        if msg.control is not None and (fut := self._calls.pop(msg.control.call_id, None)):
            if not fut.done():
                fut.set_result(msg.control)

    def _fail_all(self, why: str) -> None:
        self.dead = why
        error = EngineDeadError(why)
        for state in list(self.states.values()):
            state.parent.fail(error)
        self.states.clear()
        self.link_of.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
        self._calls.clear()

    # ------------------------------------------------------------ requests

    def _abort_ids(self, ids: list[str]) -> None:
        """Send Abort for engine request ids, each to the core that runs it."""
        per_link: dict[int, tuple[EngineLink, list[str]]] = {}
        for rid in ids:
            link = self.link_of.pop(rid, None)
            if link is not None:
                per_link.setdefault(id(link), (link, []))[1].append(rid)
        for link, rids in per_link.values():
            link.send(Abort(request_ids=rids))

    def _pick_link(self) -> EngineLink:
        """The least loaded core by vLLM's score (the first on ties)."""
        if len(self.links) == 1:
            return self.links[0]
        return min(self.links, key=EngineLink.score)

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None, *, priority: int = 0,
                       cache_salt: str | None = None,
                       output_kind: OutputKind = OutputKind.CUMULATIVE,
                       lora_request: LoRARequest | None = None,
                       kv_transfer_params: KVTransferParams | None = None,
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
                              None if lora_request is None else lora_request.to_ref(), embeds,
                              kv_transfer_params)
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
                self._abort_ids(alive)

    def _add(self, parent: ParentRequest, params: SamplingParams, priority: int,
             cache_salt: str | None, mm_inputs: list[MMInput] | None = None,
             lora: LoRARef | None = None,
             prompt_embeds: PromptEmbeds | None = None,
             kv_transfer_params: KVTransferParams | None = None) -> list[str]:
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
                prompt_embeds=prompt_embeds, kv_transfer_params=kv_transfer_params))
        # All n completions go to one core: they share the prompt's prefix-cache blocks there.
        link = self._pick_link()
        for i, req in enumerate(requests):
            self.states[req.request_id] = RequestState(parent, i, self.tokenizer, req.sampling)
            self.link_of[req.request_id] = link
            link.send(req)
            link.add_sent()
        return child_ids

    async def abort(self, request_id: str) -> None:
        """Abort a request (all of its n completions)."""
        ids = [rid for rid, s in self.states.items() if s.parent.request_id == request_id]
        for rid in ids:
            self.states.pop(rid).process(TokenDelta(request_id=rid, new_token_ids=[],
                                                    finish_reason="abort"))
        if ids:
            self._abort_ids(ids)

    async def _control(self, op: str, timeout: float = 30.0,
                       **fields: Any) -> list[ControlResult]:
        """Run a control op on every engine core; their results in link order."""
        if self.dead:
            raise EngineDeadError(self.dead)
        futures = []
        for link in self.links:
            call_id = next(self._call_ids)
            fut = asyncio.get_running_loop().create_future()
            self._calls[call_id] = fut
            futures.append(fut)
            link.send(Control(call_id=call_id, op=op, client_index=self.client_index, **fields))
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))

    async def _checked_control(self, op: str, **fields: Any) -> list[ControlResult]:
        # Every core (data parallel) runs it; offload and reload take a while.
        results = await self._control(op, timeout=600.0, **fields)
        for result in results:
            if not result.ok:
                raise ValueError(result.error)
        return results

    async def sleep(self, level: int = 1) -> None:
        """Sleep mode: release weights (level 1: to host memory, 2: discarded) and KV cache."""
        await self._checked_control("sleep", level=level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Wake the named parts ("weights", "kv_cache"; default all)."""
        await self._checked_control("wake_up", tags=tags)

    async def is_sleeping(self) -> bool:
        """True until every part is awake."""
        return any(bool(r.value) for r in await self._checked_control("is_sleeping"))

    async def reload_weights(self, path: str | None = None) -> None:
        """Load the weights again (after a level-2 sleep, or new ones of the same shapes)."""
        await self._checked_control("reload_weights", path=path)

    async def reset_prefix_cache(self) -> bool:
        """Reset every core's prefix cache; True only if all of them could."""
        return all(bool(r.value) for r in await self._control("reset_prefix_cache"))

    async def remove_lora(self, lora_request: LoRARequest) -> None:
        """Tell the workers to drop an unloaded adapter from their caches."""
        await self._control("remove_lora", lora=lora_request.to_ref())

    async def get_stats(self) -> SchedulerStats:
        """Fresh scheduler stats (KV usage, prefix-cache counters, preemptions), all ranks."""
        await self._control("get_stats")
        return self.stats

    async def shutdown(self) -> None:
        """Stop the output task and, if this client launched them, the engine cores."""
        if self._output_task is not None:
            self._output_task.cancel()
            await asyncio.gather(self._output_task, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(core.stop, Env.PEER_TIMEOUT_S * 2)
                               for core in self.cores))
        for link in self.links:
            link.close()
        self.ctx.term()

"""`LLM`: the synchronous offline API, a thin wrapper over `AsyncEngine`.

    llm = LLM(model="path/to/model", max_num_seqs=64)
    outputs = llm.generate(["Hello", "The capital of"], SamplingParams(max_tokens=16))

The async engine runs on an event loop in a private thread, so `LLM` also works inside programs
(and notebooks) that already run their own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from tqdm import tqdm

from enginecore.config import EngineConfig
from enginecore.protocol import SchedulerStats
from frontend.client import AsyncEngine
from frontend.lora import LoRARequest
from frontend.outputs import OutputKind, RequestOutput
from frontend.processor import PromptType
from sampling.logits_processor import processor_fqcn
from sampling.params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_args: object):
        if engine_args.get("logits_processors"):  # classes -> "module:Class" names
            engine_args["logits_processors"] = [
                processor_fqcn(c) for c in engine_args["logits_processors"]]  # type: ignore
        self.config = EngineConfig.create(model, **engine_args)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="llm-loop")
        self._thread.start()
        try:
            self.engine: AsyncEngine = self._run(AsyncEngine.start(self.config))
        except BaseException:
            self._stop_loop()
            raise
        self._counter = 0

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.

        `lora_request`: one adapter for every prompt, or one (or None: the base model) per prompt.
        """
        if isinstance(prompts, str | dict) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError("sampling_params must be one value or one per prompt")
        prios = list(priority) if priority is not None else [0] * len(prompts)
        loras = list(lora_request) if isinstance(lora_request, Sequence) else \
            [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("lora_request must be one value or one per prompt")
        ids = [f"offline-{self._counter + i}" for i in range(len(prompts))]
        self._counter += len(prompts)
        return self._run(self._generate_all(ids, prompts, params, prios, loras, use_tqdm))

    async def _generate_all(self, ids, prompts, params, prios, loras,
                            use_tqdm) -> list[RequestOutput]:
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm)

        async def one(rid, prompt, sp, prio, lora) -> RequestOutput:
            final = None
            async for out in self.engine.generate(prompt, sp, rid, priority=prio,
                                                  output_kind=OutputKind.FINAL_ONLY,
                                                  lora_request=lora):
                final = out
            bar.update(1)
            return final

        try:
            # Validate everything before any request runs: a bad prompt fails the whole call.
            tokenized = []
            for prompt, sp, lora in zip(prompts, params, loras, strict=True):
                processor = self.engine.processor
                embeds = processor.prompt_embeds(prompt)
                if embeds is not None:  # convert the tensor once
                    prompt = {"prompt_embeds": embeds}
                text, token_ids, mm = processor.process_prompt(prompt)
                processor.make_request("validate", token_ids, sp, mm_inputs=mm,
                                       lora=None if lora is None else lora.to_ref(),
                                       prompt_embeds=embeds)
                tokenized.append({"prompt": text, "prompt_token_ids": token_ids, "mm_inputs": mm}
                                 if embeds is None else prompt)
            jobs = (one(*a) for a in zip(ids, tokenized, params, prios, loras, strict=True))
            return list(await asyncio.gather(*jobs))
        finally:
            bar.close()

    def get_stats(self) -> SchedulerStats:
        return self._run(self.engine.get_stats())

    def reset_prefix_cache(self) -> bool:
        return self._run(self.engine.reset_prefix_cache())

    def sleep(self, level: int = 1) -> None:
        """Release device memory: level 1 offloads the weights to host memory, 2 drops them;
        both drop the KV cache (needs enable_sleep_mode=True)."""
        self._run(self.engine.sleep(level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Wake "weights" and/or "kv_cache" (default both)."""
        self._run(self.engine.wake_up(tags))

    def is_sleeping(self) -> bool:
        return self._run(self.engine.is_sleeping())

    def reload_weights(self, path: str | None = None) -> None:
        """Load the weights again from `path` (default: the model directory)."""
        self._run(self.engine.reload_weights(path))

    def shutdown(self) -> None:
        if self._loop.is_running():
            self._run(self.engine.shutdown())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

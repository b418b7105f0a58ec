"""`ModelRunner`: turns one `ExecuteStep` into a forward pass, samples, returns a `StepResult`.

The runner keeps its own copy of every live request (`CachedRequestState`): the scheduler sends a
request in full once (`NewReq`), then only deltas (`CachedReqs`: new block ids and
num_computed_tokens).
Sampled tokens are appended here as well as in the scheduler, so both sides stay in sync without
resending token lists.

Dimension legend: T = tokens scheduled this step (all requests, flattened), B = requests in the
step, N = rows that sample this step, V = vocab size, K = logprobs asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from enginecore.config import EngineConfig
from enginecore.protocol import ExecuteStep, NewReq, StepResult, TokenLogprobs
from sampling.params import SamplingParams
from sampling.sampler import Sampler, SamplingBatch, gather_logprobs
from sampling.structured import GrammarCompiler, RequestGrammar
from workers.attention import AttnMetadata, kv_cache_torch_dtype, set_forward_context
from workers.block_table import BlockTable
from workers.cudagraph import CudaGraphs
from workers.inputs import InputBuffers
from workers.models import load_model

_MASK63 = (1 << 63) - 1


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    num_computed_tokens: int
    row: int  # this request's row in the runner's BlockTable
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: RequestGrammar | None = None  # structured outputs: this request's matcher

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the two lists."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p: end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


@dataclass
class StepInputs:
    num_tokens: int  # T
    num_reqs: int  # B
    num_cols: int  # block-table columns in use
    max_query_len: int
    max_seq_len: int
    sample_rows: list[int]  # for each sampling request, its last token's index in [0, T)
    sample_reqs: list[CachedRequestState]
    # Prompt-logprob requests: (state, first token index in T, first position, count of rows)
    prompt_lp: list[tuple[CachedRequestState, int, int, int]]


class ModelRunner:
    """Owns the model, the KV cache tensors and the per-request state of one worker."""

    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.model = load_model(config.model.model, dtype, device, config.model.load_format,
                                config.model.quantization)
        self.kv_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, dtype)
        self.sampler = Sampler(config.model.vocab_size, config.model.eos_token_ids)
        # Matchers live here, not in the engine core: with async scheduling only the workers
        # know a step's sampled token before the next step runs.
        self.grammars = GrammarCompiler(config.model.tokenizer or config.model.model,
                                        config.model.vocab_size, config.model.eos_token_ids)
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        sched = config.scheduler
        self.max_blocks_per_req = -(-config.model.max_model_len // self.block_size)
        # Async scheduling can briefly hold finished requests next to new ones: twice the seqs.
        self.block_table = BlockTable(2 * sched.max_num_seqs, self.max_blocks_per_req,
                                      self.block_size)
        self.buffers = InputBuffers(max(sched.max_num_batched_tokens, sched.max_num_seqs),
                                    sched.max_num_seqs, self.max_blocks_per_req, device)
        self.graphs: CudaGraphs | None = None

    # ------------------------------------------------------------ KV cache

    def bytes_per_block(self) -> int:
        shape = self.model.kv_cache_shape(1, self.block_size)
        elems = int(np.prod(shape))
        return elems * torch.empty((), dtype=self.kv_dtype).element_size() * self.model.num_layers

    def init_kv_cache(self, num_blocks: int) -> None:
        shape = self.model.kv_cache_shape(num_blocks, self.block_size)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(self.model.num_layers)]
        self.model.bind_kv_cache(self.kv_caches)
        if self.device.type == "cuda" and not self.config.model.enforce_eager:
            self.graphs = CudaGraphs(self.model, self.buffers, self.config.scheduler.max_num_seqs)
            self.graphs.capture()

    @torch.inference_mode()
    def profile_run(self) -> None:
        """Run the largest step the scheduler can emit (no cache bound) to find peak memory."""
        sched = self.config.scheduler
        num_tokens = min(sched.max_num_batched_tokens,
                         sched.max_num_seqs * self.config.model.max_model_len)
        # Fresh prefills of <= 256 tokens each: the no-cache attention path is quadratic.
        starts = list(range(0, num_tokens, 256)) + [num_tokens]
        meta = AttnMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(np.diff(starts), dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(starts) - 1, 1), dtype=torch.int32,
                                     device=self.device),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            max_query_len=256, max_seq_len=256)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        with set_forward_context(meta):
            hidden = self.model(ids, ids)
        rows = min(sched.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:rows])
        torch.softmax(logits, dim=-1).argmax(-1)

    # ------------------------------------------------------------ step

    @torch.inference_mode()
    def execute(self, step: ExecuteStep) -> StepResult:
        self._update_states(step)
        if not step.num_scheduled_tokens:
            return StepResult(step_id=step.step_id, req_ids=[], sampled=[])
        inputs = self._prepare_inputs(step)
        hidden = self._forward(inputs)
        result = StepResult(step_id=step.step_id, req_ids=[], sampled=[])
        if inputs.prompt_lp:
            result.prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        if inputs.sample_reqs:
            self._sample(hidden, inputs, result)
        return result

    def _update_states(self, step: ExecuteStep) -> None:
        for req_id in step.finished:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.block_table.free_row(state.row)
        for new in step.new:
            self.requests[new.req_id] = self._new_state(new)
        cached = step.cached
        for req_id, block_ids, num_computed in zip(cached.req_ids, cached.new_block_ids,
                                                   cached.num_computed_tokens, strict=True):
            state = self.requests[req_id]
            self.block_table.append(state.row, block_ids)
            state.num_computed_tokens = num_computed

    def _new_state(self, new: NewReq) -> CachedRequestState:
        generator = None
        if new.sampling.seed is not None:
            generator = torch.Generator(device=self.device)
        structured = new.sampling.structured_outputs
        # Compiles in a thread pool; only the first sample of this request waits for it.
        grammar = None if structured is None else self.grammars.compile(
            structured, new.output_token_ids, new.prompt_token_ids)
        return CachedRequestState(
            req_id=new.req_id, prompt_token_ids=list(new.prompt_token_ids),
            sampling=new.sampling, num_computed_tokens=new.num_computed_tokens,
            row=self.block_table.add_row(new.block_ids),
            output_token_ids=list(new.output_token_ids), generator=generator, grammar=grammar)

    def _prepare_inputs(self, step: ExecuteStep) -> StepInputs:
        """Stage the step's flat inputs in the host buffers (copied to the device later).

        One Python pass collects per-request scalars; positions, slots and block tables are
        then vectorized numpy gathers.
        """
        buf, bt = self.buffers, self.block_table
        reqs = [self.requests[r] for r in step.num_scheduled_tokens]
        num_reqs = len(reqs)
        n = np.fromiter(step.num_scheduled_tokens.values(), np.int64, num_reqs)
        start = np.fromiter((s.num_computed_tokens for s in reqs), np.int64, num_reqs)
        rows = np.fromiter((s.row for s in reqs), np.int64, num_reqs)
        end = start + n
        cu = np.cumsum(n)
        num_tokens = int(cu[-1])
        ids = buf.input_ids[:num_tokens]
        if num_tokens == num_reqs:  # pure decode: one token per request
            ids[:] = [s.token_slice(a, a + 1)[0] for s, a in zip(reqs, start.tolist(),
                                                                  strict=True)]
        else:
            ids[:] = [t for s, a, b in zip(reqs, start.tolist(), end.tolist(), strict=True)
                      for t in s.token_slice(a, b)]
        pos = np.arange(num_tokens, dtype=np.int64) - np.repeat(cu - n - start, n)
        buf.positions[:num_tokens] = pos
        buf.slot_mapping[:num_tokens] = bt.slots(np.repeat(rows, n), pos)
        buf.query_start_loc[0] = 0
        buf.query_start_loc[1: num_reqs + 1] = cu
        buf.seq_lens[:num_reqs] = end
        max_seq_len = int(end.max())
        num_cols = -(-max_seq_len // self.block_size)
        buf.block_tables[:num_reqs, :num_cols] = bt.table[rows, :num_cols]

        sample_rows: list[int] = []
        sample_reqs: list[CachedRequestState] = []
        prompt_lp: list[tuple[CachedRequestState, int, int, int]] = []
        for state, a, b, last in zip(reqs, start.tolist(), end.tolist(), cu.tolist(),
                                     strict=True):
            if b == state.num_tokens:
                sample_rows.append(last - 1)
                sample_reqs.append(state)
            num_prompt = len(state.prompt_token_ids)
            if state.sampling.prompt_logprobs is not None and a < num_prompt - 1:
                # Position p's logits score prompt token p + 1.
                prompt_lp.append((state, last - (b - a), a, min(b, num_prompt - 1) - a))
        return StepInputs(num_tokens=num_tokens, num_reqs=num_reqs, num_cols=num_cols,
                          max_query_len=int(n.max()), max_seq_len=max_seq_len,
                          sample_rows=sample_rows, sample_reqs=sample_reqs, prompt_lp=prompt_lp)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, H]: replayed from a CUDA graph for decode steps, else eager."""
        buf = self.buffers
        if self.graphs is not None and inputs.max_query_len == 1:
            size = self.graphs.bucket(inputs.num_reqs)
            if size is not None:
                return self.graphs.replay(inputs.num_reqs, inputs.num_cols, size)
        buf.copy_to_device(inputs.num_tokens, inputs.num_reqs, inputs.num_cols)
        meta = buf.metadata(inputs.num_tokens, inputs.num_reqs, inputs.num_cols,
                            inputs.max_query_len, inputs.max_seq_len)
        with set_forward_context(meta):
            return self.model(buf.input_ids_dev[: inputs.num_tokens],
                              buf.positions_dev[: inputs.num_tokens])

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, result: StepResult) -> None:
        reqs = inputs.sample_reqs
        rows = torch.tensor(inputs.sample_rows, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [N, V] fp32
        batch = SamplingBatch(
            params=[r.sampling for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            generators=[r.generator for r in reqs],
            grammars=[r.grammar for r in reqs] if any(r.grammar is not None for r in reqs)
            else None)
        for r in reqs:
            if r.generator is not None:
                # Re-seed from (seed, output position): seeded output then depends on nothing
                # else, neither batch neighbours nor preemption and replay.
                r.generator.manual_seed(hash((r.sampling.seed, len(r.output_token_ids))) & _MASK63)
        # Counted before sampling (the sampler uses logits as scratch), fetched with the tokens:
        # one host sync per step.
        num_nans = torch.isnan(logits).any(dim=-1).sum().view(1)
        out = self.sampler(logits, batch)
        *sampled, result.num_nans = torch.cat([out.sampled, num_nans]).tolist()
        result.req_ids = [r.req_id for r in reqs]
        result.sampled = sampled
        for state, token in zip(reqs, sampled, strict=True):
            state.output_token_ids.append(token)
            if state.grammar is not None:
                state.grammar.accept_tokens((token,))
        if out.logprobs is not None:
            ids, lps = out.logprob_token_ids.tolist(), out.logprobs.tolist()
            ranks = out.ranks.tolist()
            result.logprobs = [
                None if r.sampling.logprobs is None else TokenLogprobs(
                    token_ids=[ids[i][: r.sampling.logprobs + 1]],
                    logprobs=[lps[i][: r.sampling.logprobs + 1]], ranks=[ranks[i]])
                for i, r in enumerate(reqs)]

    def _prompt_logprobs(self, hidden: torch.Tensor,
                         inputs: StepInputs) -> dict[str, TokenLogprobs]:
        out: dict[str, TokenLogprobs] = {}
        for state, offset, start, count in inputs.prompt_lp:
            if count <= 0:
                continue
            logits = self.model.compute_logits(hidden[offset: offset + count])
            targets = torch.tensor(state.prompt_token_ids[start + 1: start + 1 + count],
                                   dtype=torch.int64, device=self.device)
            k = state.sampling.prompt_logprobs or 0
            ids, lps, ranks = gather_logprobs(torch.log_softmax(logits, dim=-1), targets, k)
            out[state.req_id] = TokenLogprobs(token_ids=ids.tolist(), logprobs=lps.tolist(),
                                              ranks=ranks.tolist())
        return out

"""`ModelRunner`: turns one `ExecuteStep` into a forward pass, samples, returns a `StepResult`.

The runner keeps its own copy of every live request (`CachedRequestState`): the scheduler sends a
request in full once (`NewReq`), then only deltas (`CachedReqs`: new block ids and
num_computed_tokens).
Sampled tokens are appended here as well as in the scheduler, so both sides stay in sync without
resending token lists.

Tensor parallelism: every rank runs the same steps on its shards; the LM head gathers full
logits on rank 0 only, rank 0 samples and broadcasts the tokens, so every rank appends the same
token without relying on bit-identical sampling across processes. Only rank 0 keeps grammar
matchers and computes logprobs (its `StepResult` is the one the core reads).

Dimension legend: T = tokens scheduled this step (all requests, flattened), B = requests in the
step, N = rows that sample this step, V = vocab size, K = logprobs asked for.
"""

from __future__ import annotations

import numpy as np
import torch

from enginecore.config import EngineConfig
from enginecore.protocol import ExecuteStep, NewReq, StepResult, TokenLogprobs
from sampling.batch_logits import BatchLogits
from sampling.logits import to_device
from sampling.logits_processor import ProcessorContext, load_logits_processors
from sampling.rejection import verify_drafts
from sampling.sampler import Sampler, SamplingBatch, gather_logprobs
from sampling.structured import GrammarCompiler
from workers.attention import AttnMetadata, kv_cache_torch_dtype, set_forward_context
from workers.block_table import BlockTable
from workers.cudagraph import CudaGraphs
from workers.inputs import InputBuffers
from workers.loader import load_weights
from workers.lora import LoRAManager
from workers.models import load_model
from workers.multimodal import MultiModalRunner
from workers.parallel import SINGLE, TPGroup
from workers.persistent_batch import PersistentBatch
from workers.request_state import CachedRequestState, StepInputs
from workers.spec import SpecDecoder

_MASK63 = (1 << 63) - 1


class ModelRunner:
    """Owns the model, the KV cache tensors and the per-request state of one worker."""

    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 tp: TPGroup = SINGLE):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.tp = tp
        self.block_size = config.cache.block_size
        self.model = load_model(config.model.model, dtype, device, config.model.load_format, tp,
                                config.model.quantization)
        self.kv_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, dtype)
        if config.model.batch_invariant:  # layers that have a batch-invariant path switch to it
            for module in self.model.modules():
                if hasattr(module, "batch_invariant"):
                    module.batch_invariant = True
        self.sampler = Sampler(config.model.vocab_size, config.model.eos_token_ids)
        # Matchers live here, not in the engine core: with async scheduling only the workers
        # know a step's sampled token before the next step runs. Only the sampling rank needs
        # them.
        self.grammars = GrammarCompiler(config.model.tokenizer or config.model.model,
                                        config.model.vocab_size, config.model.eos_token_ids
                                        ) if tp.is_first else None
        self.requests: dict[str, CachedRequestState] = {}
        # Row order seen by batch-level logits processors (built-in and --logits-processors).
        self.batch = PersistentBatch()
        context = ProcessorContext(vocab_size=config.model.vocab_size,
                                   eos_token_ids=tuple(config.model.eos_token_ids),
                                   max_num_seqs=config.scheduler.max_num_seqs)
        self.logits_processors = BatchLogits.create(
            context, device, load_logits_processors(config.model.logits_processors))
        self.kv_caches: list[torch.Tensor] = []
        sched = config.scheduler
        self.max_blocks_per_req = -(-config.model.max_model_len // self.block_size)
        # Async scheduling can briefly hold finished requests next to new ones: twice the seqs.
        self.block_table = BlockTable(2 * sched.max_num_seqs, self.max_blocks_per_req,
                                      self.block_size)
        self.buffers = InputBuffers(max(sched.max_num_batched_tokens, sched.max_num_seqs),
                                    sched.max_num_seqs, self.max_blocks_per_req, device)
        # Decode graphs (query length 1), then, with speculative decoding, verify graphs
        # (query length k + 1); empty: every step eager.
        self.graphs: list[CudaGraphs] = []
        self.mm = (MultiModalRunner(self.model, device)
                   if getattr(self.model, "uses_mrope", False) else None)
        # Wraps the model's projections; before CUDA-graph capture, so graphs contain the LoRA
        # kernels.
        self.lora = LoRAManager(config, self.model, device, dtype, self.buffers.input_ids.shape[0]
                                ) if config.lora.enable_lora else None
        self.num_blocks = 0
        self.spec: SpecDecoder | None = None
        if config.speculative.enabled:
            self.spec = SpecDecoder(config, self.model, self.block_table, device, dtype)

    # ------------------------------------------------------------ KV cache

    def bytes_per_block(self) -> int:
        shape = self.model.kv_cache_shape(1, self.block_size)
        elems = int(np.prod(shape))
        drafter = self.spec.bytes_per_block() if self.spec is not None else 0
        return (elems * torch.empty((), dtype=self.kv_dtype).element_size()
                * self.model.num_layers + drafter)

    def init_kv_cache(self, num_blocks: int, capture: bool = True) -> None:
        shape = self.model.kv_cache_shape(num_blocks, self.block_size)
        self.num_blocks = num_blocks
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(self.model.num_layers)]
        self.model.bind_kv_cache(self.kv_caches)
        if self.spec is not None:
            self.spec.init_kv_cache(num_blocks)
        if capture:
            self.capture_graphs()

    def capture_graphs(self) -> None:
        """Capture the decode CUDA graphs (CUDA, not enforce_eager); needs weights and cache."""
        if self.device.type == "cuda" and not self.config.model.enforce_eager:
            if self.lora is not None:
                self.lora.clear()
            seqs = self.config.scheduler.max_num_seqs
            graphs = [CudaGraphs(self.model, self.buffers, seqs)]
            if self.spec is not None:
                graphs.append(CudaGraphs(self.model, self.buffers, seqs, self.spec.k + 1))
            pool = None
            for g in reversed(graphs):  # the larger verify graphs first: one shared pool
                g.capture(pool)
                pool = g.pool
            self.graphs = graphs
            if self.spec is not None:
                self.spec.capture_graphs()

    def reload_weights(self, path: str) -> None:
        """Load every parameter again from the checkpoint at `path` (same architecture)."""
        load_weights(self.model, path)

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
        logits = self.model.compute_logits(hidden[:rows])  # None on TP ranks > 0
        if logits is not None:
            torch.softmax(logits, dim=-1).argmax(-1)
        if self.mm is not None:  # the vision tower's activations at the encoder budget
            self.mm.profile(sched.max_num_encoder_input_tokens or sched.max_num_batched_tokens)

    # ------------------------------------------------------------ step

    @torch.inference_mode()
    def execute(self, step: ExecuteStep) -> StepResult:
        self._update_states(step)
        if self.mm is not None:  # drop, then encode: a step may free and re-encode one hash
            self.mm.free(step.free_encoder_hashes)
            self.mm.encode([self.requests[r].mm_inputs[i]
                            for r, idx in step.encoder_inputs.items() for i in idx])
        if not step.num_scheduled_tokens:
            return StepResult(step_id=step.step_id, req_ids=[], sampled=[])
        inputs = self._prepare_inputs(step)
        hidden = self._forward(inputs)
        result = StepResult(step_id=step.step_id, req_ids=[], sampled=[], failed=inputs.failed)
        if inputs.prompt_lp:
            result.prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        if inputs.sample_reqs:
            self._sample(hidden, inputs, result)
        if self.spec is not None:
            result.draft_token_ids = self.spec.propose(inputs.entries, hidden, inputs.sample_reqs)
        return result

    def _update_states(self, step: ExecuteStep) -> None:
        for lora_id in step.removed_loras:
            if self.lora is not None:
                self.lora.remove(lora_id)
        for req_id in step.finished:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.block_table.free_row(state.row)
        added = []
        for new in step.new:
            state = self.requests[new.req_id] = self._new_state(new)
            added.append((state.req_id, state.sampling, state.prompt_token_ids,
                          state.output_token_ids))
        self.logits_processors.update_state(self.batch.update(step.finished, added))
        cached = step.cached
        for req_id, block_ids, num_computed in zip(cached.req_ids, cached.new_block_ids,
                                                   cached.num_computed_tokens, strict=True):
            state = self.requests[req_id]
            self.block_table.append(state.row, block_ids)
            state.num_computed_tokens = num_computed
        if self.spec is not None:
            spec = step.scheduled_spec_tokens
            for req_id in step.num_scheduled_tokens:
                self.requests[req_id].spec_token_ids = spec.get(req_id, [])

    def _new_state(self, new: NewReq) -> CachedRequestState:
        generator = None
        if new.sampling.seed is not None:
            generator = torch.Generator(device=self.device)
        structured = new.sampling.structured_outputs
        # Compiles in a thread pool; only the first sample of this request waits for it.
        grammar = None if structured is None or self.grammars is None else self.grammars.compile(
            structured, new.output_token_ids, new.prompt_token_ids)
        mrope, delta = (None, 0) if self.mm is None else self.mm.prompt_positions(
            len(new.prompt_token_ids), new.mm_inputs)
        embeds = None
        if new.prompt_embeds is not None:
            e = new.prompt_embeds
            embeds = torch.frombuffer(bytearray(e.data), dtype=getattr(torch, e.dtype)).view(
                *e.shape).to(self.device, self.dtype)
        return CachedRequestState(
            prompt_embeds=embeds, req_id=new.req_id, prompt_token_ids=list(new.prompt_token_ids),
            sampling=new.sampling, num_computed_tokens=new.num_computed_tokens,
            row=self.block_table.add_row(new.block_ids),
            output_token_ids=list(new.output_token_ids), generator=generator, grammar=grammar,
            mm_inputs=new.mm_inputs, mrope=mrope, mrope_delta=delta, lora=new.lora)

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
        failed = [] if self.lora is None else \
            [reqs[i].req_id for i in self.lora.prepare([s.lora for s in reqs], n)]

        sample_rows: list[int] = []
        sample_reqs: list[CachedRequestState] = []
        prompt_lp: list[tuple[CachedRequestState, int, int, int]] = []
        embeds: list[tuple[int, torch.Tensor]] = []
        for state, a, b, last in zip(reqs, start.tolist(), end.tolist(), cu.tolist(),
                                     strict=True):
            if b - len(state.spec_token_ids) == state.num_tokens:
                sample_rows.append(last - 1)
                sample_reqs.append(state)
            num_prompt = len(state.prompt_token_ids)
            if state.prompt_embeds is not None and a < num_prompt:
                embeds.append((last - (b - a), state.prompt_embeds[a: min(b, num_prompt)]))
            if state.sampling.prompt_logprobs is not None and a < num_prompt - 1:
                # Position p's logits score prompt token p + 1.
                prompt_lp.append((state, last - (b - a), a, min(b, num_prompt - 1) - a))
        entries = [] if self.spec is None else list(zip(
            reqs, start.tolist(), n.tolist(), (cu - n).tolist(), strict=True))
        inputs = StepInputs(num_tokens=num_tokens, num_reqs=num_reqs, num_cols=num_cols,
                            max_query_len=int(n.max()), max_seq_len=max_seq_len,
                            sample_rows=sample_rows, sample_reqs=sample_reqs, prompt_lp=prompt_lp,
                            failed=failed, embeds=embeds, entries=entries)
        if self.mm is not None:
            self._prepare_mm(inputs, reqs, start.tolist(), end.tolist(), (cu - n).tolist())
        self._order_samples(inputs)
        return inputs

    def _order_samples(self, inputs: StepInputs) -> None:
        """Sampling rows in persistent-batch order: when every live request samples, the logits
        rows are the batch-level processors' rows as they are (no scatter)."""
        index = self.batch.index
        order = sorted(range(len(inputs.sample_reqs)),
                       key=lambda i: index[inputs.sample_reqs[i].req_id])
        inputs.sample_reqs = [inputs.sample_reqs[i] for i in order]
        inputs.sample_rows = [inputs.sample_rows[i] for i in order]

    def _prepare_mm(self, inputs: StepInputs, reqs: list[CachedRequestState],
                    starts: list[int], ends: list[int], bases: list[int]) -> None:
        """M-RoPE positions and placeholder embeddings of the step (vision-language models)."""
        assert self.mm is not None
        positions = self.mm.step_positions([(s.mrope, s.mrope_delta, a, b) for s, a, b in
                                            zip(reqs, starts, ends, strict=True)])
        if (positions == positions[0]).all():
            self.buffers.positions[: inputs.num_tokens] = positions[0]  # plain RoPE suffices
        else:
            inputs.mrope = positions
        for state, a, b, base in zip(reqs, starts, ends, bases, strict=True):
            if state.mm_inputs and a < len(state.prompt_token_ids):
                inputs.mm_embeds += self.mm.embeds_for(state.mm_inputs, a, b, base)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, H]: replayed from a CUDA graph for decode (and speculative
        verify) steps, else eager."""
        buf = self.buffers
        plain = inputs.mrope is None and not inputs.mm_embeds and not inputs.embeds
        for graphs in self.graphs if plain else ():
            size = graphs.bucket(inputs.num_reqs, inputs.num_tokens, inputs.max_query_len)
            if size is not None:
                return graphs.replay(inputs.num_reqs, inputs.num_cols, size, inputs.num_tokens)
        buf.copy_to_device(inputs.num_tokens, inputs.num_reqs, inputs.num_cols)
        meta = buf.metadata(inputs.num_tokens, inputs.num_reqs, inputs.num_cols,
                            inputs.max_query_len, inputs.max_seq_len)
        ids = buf.input_ids_dev[: inputs.num_tokens]
        positions = buf.positions_dev[: inputs.num_tokens]
        with set_forward_context(meta):
            if plain:
                return self.model(ids, positions)
            inputs_embeds = None
            if inputs.mrope is not None or inputs.mm_embeds:
                assert self.mm is not None
                if inputs.mrope is not None:
                    positions = torch.from_numpy(inputs.mrope).to(self.device, non_blocking=True)
                inputs_embeds = self.mm.inputs_embeds(ids, inputs.mm_embeds)
            if inputs.embeds:  # prompt embeddings replace the placeholder ids' embedding rows
                if inputs_embeds is None:
                    inputs_embeds = self.model.embed_input_ids(ids)
                for offset, rows in inputs.embeds:
                    inputs_embeds[offset: offset + rows.shape[0]] = rows
            return self.model(ids, positions, inputs_embeds)

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, result: StepResult) -> None:
        reqs = inputs.sample_reqs  # in persistent-batch order (`_order_samples`)
        verify = [i for i, r in enumerate(reqs) if r.spec_token_ids]
        if not verify:
            self._sample_rows(hidden, reqs, inputs.sample_rows, result)
            return
        # Speculative decoding: plain rows sample as usual, requests with drafts verify them.
        plain = [i for i, r in enumerate(reqs) if not r.spec_token_ids]
        tokens: list[list[int]] = [[] for _ in reqs]
        part = StepResult(step_id=result.step_id, req_ids=[], sampled=[])
        if plain:
            self._sample_rows(hidden, [reqs[i] for i in plain],
                              [inputs.sample_rows[i] for i in plain], part)
            for i, token in zip(plain, part.sampled, strict=True):
                tokens[i] = [token]
        verified = [reqs[i] for i in verify]
        rows = [row for i in verify for row in range(
            inputs.sample_rows[i] - len(reqs[i].spec_token_ids), inputs.sample_rows[i] + 1)]
        logits = self.model.compute_logits(
            hidden.index_select(0, to_device(rows, torch.int64, self.device)))
        grammars = [r.grammar for r in verified]
        kept = verify_drafts(logits, [r.sampling for r in verified],
                             [r.spec_token_ids for r in verified],
                             grammars if any(g is not None for g in grammars) else None)
        for i, state, new in zip(verify, verified, kept, strict=True):
            tokens[i] = new
            state.output_token_ids.extend(new)
            if state.grammar is not None:
                state.grammar.accept_tokens(new)
        result.req_ids = [r.req_id for r in reqs]
        result.sampled = [t[-1] for t in tokens]
        result.spec_token_ids = tokens
        result.num_nans = part.num_nans
        if part.logprobs is not None:
            result.logprobs = [None] * len(reqs)
            for i, lp in zip(plain, part.logprobs, strict=True):
                result.logprobs[i] = lp

    def _sample_rows(self, hidden: torch.Tensor, reqs: list[CachedRequestState],
                     sample_rows: list[int], result: StepResult) -> None:
        """One token per request from its row of `hidden`, into `result`."""
        index = self.batch.index
        self.logits_processors.set_step_rows([index[r.req_id] for r in reqs])
        # Pinned, non-blocking: a plain torch.tensor(..., device=cuda) copy waits for the
        # forward to finish, and the sampler's host work (bitmask fill) would follow it.
        rows = to_device(sample_rows, torch.int64, self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [N, V] fp32, rank 0
        out = None
        if logits is None:  # a TP rank > 0: receives rank 0's tokens (and NaN count)
            tokens = torch.empty(len(reqs) + 1, dtype=torch.int64, device=self.device)
        else:
            out, tokens = self._run_sampler(logits, reqs)
        # One host sync per step: tokens and the NaN count together.
        *sampled, result.num_nans = self.tp.broadcast(tokens).tolist()
        result.req_ids = [r.req_id for r in reqs]
        result.sampled = sampled
        for state, token in zip(reqs, sampled, strict=True):
            state.output_token_ids.append(token)
            if state.grammar is not None:
                # Consumed by the next step's bitmask fill, off the sync-to-launch path.
                state.grammar.defer_tokens((token,))
        if out is not None and out.logprobs is not None:
            ids, lps = out.logprob_token_ids.tolist(), out.logprobs.tolist()
            ranks = out.ranks.tolist()
            result.logprobs = [
                None if r.sampling.logprobs is None else TokenLogprobs(
                    token_ids=[ids[i][: r.sampling.logprobs + 1]],
                    logprobs=[lps[i][: r.sampling.logprobs + 1]], ranks=[ranks[i]])
                for i, r in enumerate(reqs)]

    def _run_sampler(self, logits: torch.Tensor, reqs: list[CachedRequestState]):
        """logits [N, V] -> (sampler output, int64 [N + 1]: the N tokens then the NaN count)."""
        batch = SamplingBatch(
            params=[r.sampling for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            generators=[r.generator for r in reqs],
            grammars=[r.grammar for r in reqs] if any(r.grammar is not None for r in reqs)
            else None, logits_processors=self.logits_processors)
        for r in reqs:
            if r.generator is not None:
                # Re-seed from (seed, output position): seeded output then depends on nothing
                # else, neither batch neighbours nor preemption and replay.
                r.generator.manual_seed(hash((r.sampling.seed, len(r.output_token_ids))) & _MASK63)
        # Counted before sampling (the sampler uses logits as scratch), fetched with the tokens:
        # one host sync per step.
        num_nans = torch.isnan(logits).any(dim=-1).sum().view(1)
        out = self.sampler(logits, batch)
        return out, torch.cat([out.sampled.long(), num_nans.long()])

    def _prompt_logprobs(self, hidden: torch.Tensor,
                         inputs: StepInputs) -> dict[str, TokenLogprobs]:
        out: dict[str, TokenLogprobs] = {}
        for state, offset, start, count in inputs.prompt_lp:
            if count <= 0:
                continue
            logits = self.model.compute_logits(hidden[offset: offset + count])  # collective
            if logits is None:
                continue  # a TP rank > 0: rank 0 answers
            targets = to_device(state.prompt_token_ids[start + 1: start + 1 + count],
                                torch.int64, self.device)
            k = state.sampling.prompt_logprobs or 0
            ids, lps, ranks = gather_logprobs(torch.log_softmax(logits, dim=-1), targets, k)
            out[state.req_id] = TokenLogprobs(token_ids=ids.tolist(), logprobs=lps.tolist(),
                                              ranks=ranks.tolist())
        return out

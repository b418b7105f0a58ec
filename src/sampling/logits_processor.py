"""`LogitsProcessor`: the batch-level plug-in interface for editing logits (vLLM v1's shape).

A processor lives as long as the engine. It sees the worker's *persistent batch*: one row per
live request, indexed 0 .. batch_size-1, kept contiguous. Each step the runner first calls
`update_state(batch_update)` with how the rows changed since the last step (None: unchanged),
then `apply(logits)` on a `[batch_size, V]` tensor whose row i belongs to the request at index i.
Rows of requests that do not sample this step hold scratch values; whatever a processor writes
there is discarded.

`BatchUpdate` contract (what `workers/persistent_batch.py` produces, and what implementations
must follow):
    1. `removed`: indices of finished requests that no new request replaced; forget them.
    2. `added`: (index, params, prompt_token_ids, output_token_ids) - index as it is at the
       time of the add, before any move; a finished request's slot may be reused (forget its
       old state). `output_token_ids` is the live list the runner appends to each step.
    3. `moved`: (a, b, direction) in order. UNIDIRECTIONAL: the request at a now sits at b
       (a becomes empty); SWAP: a and b exchange requests.
Process them in that order: removes, adds, moves.

This module imports no torch (the API servers import it to run `validate_params`); `apply`
receives a torch tensor and may use its methods.

Dimension legend: B rows of the persistent batch, V vocabulary size.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sampling.params import SamplingParams

# torch.Tensor / torch.device: not imported, so the API servers can import this module torch-free.
Tensor = Any
Device = Any


class MoveDirectionality(enum.Enum):
    """How a move in `BatchUpdate.moved` relocates rows."""

    UNIDIRECTIONAL = enum.auto()  # a -> b, a left empty
    SWAP = enum.auto()  # a <-> b


# (index, params, prompt token ids, output token ids: the runner's live list)
AddedRequest = tuple[int, SamplingParams, list[int], list[int]]
MovedRequest = tuple[int, int, MoveDirectionality]


@dataclass
class BatchUpdate:
    """How the persistent batch changed since the previous step (apply removes, adds, moves)."""

    batch_size: int  # rows after the update (all contiguous from 0)
    removed: list[int] = field(default_factory=list)
    added: list[AddedRequest] = field(default_factory=list)
    moved: list[MovedRequest] = field(default_factory=list)


@dataclass(frozen=True)
class ProcessorContext:
    """What a processor's constructor gets in place of vLLM's `VllmConfig`."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_num_seqs: int
    extra: dict[str, Any] = field(default_factory=dict)


class LogitsProcessor:
    """Base class of batch-level logits processors; subclass and override the methods."""

    def __init__(self, config: ProcessorContext, device: Device,
                 is_pin_memory: bool) -> None:
        self.config = config
        self.device = device
        self.is_pin_memory = is_pin_memory

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ValueError when a request's settings (e.g. extra_args) are invalid for us."""

    def is_argmax_invariant(self) -> bool:
        """True if `apply` never changes a row's argmax (then it is skipped for greedy rows)."""
        raise NotImplementedError

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removes, then adds, then moves (None: no change)."""
        raise NotImplementedError

    def apply(self, logits: Tensor) -> Tensor:
        """Edit logits [B, V] (in place or not) and return the result."""
        raise NotImplementedError


def apply_moves(state: dict[int, Any], moved: Sequence[MovedRequest]) -> None:
    """Apply `BatchUpdate.moved` to sparse per-row state {index: value}, in order."""
    for a, b, direction in moved:
        a_val, b_val = state.pop(a, None), state.pop(b, None)
        if a_val is not None:
            state[b] = a_val
        if direction is MoveDirectionality.SWAP and b_val is not None:
            state[a] = b_val


def update_sparse_state(state: dict[int, Any], batch_update: BatchUpdate | None,
                        make: Callable[[SamplingParams, list[int], list[int]], Any]) -> bool:
    """Track {index: make(...)} for rows where `make` returns non-None; True if it changed."""
    if batch_update is None:
        return False
    for index in batch_update.removed:
        state.pop(index, None)
    for index, params, prompt_ids, output_ids in batch_update.added:
        value = make(params, prompt_ids, output_ids)
        if value is None:
            state.pop(index, None)  # the slot may still hold a finished request's value
        else:
            state[index] = value
    apply_moves(state, batch_update.moved)
    return True


# A V0-style per-request callable: (output ids, logits row [V]) or (prompt ids, output ids, row).
RequestLogitsProcessor = (Callable[[list[int], Tensor], Tensor]
                          | Callable[[list[int], list[int], Tensor], Tensor])


class AdapterLogitsProcessor(LogitsProcessor):
    """Runs a per-request callable on each row that has one; subclasses override
    `new_req_logits_processor` (and `is_argmax_invariant`, `validate_params`)."""

    def __init__(self, config: ProcessorContext, device: Device,
                 is_pin_memory: bool) -> None:
        super().__init__(config, device, is_pin_memory)
        # index -> (callable, takes prompt ids?, prompt ids, live output ids)
        self._rows: dict[int, tuple[Callable, bool, list[int], list[int]]] = {}

    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        """The callable for a new request, or None when this processor does not apply to it."""
        raise NotImplementedError

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Create one callable per added request (None: not applied), follow removes and moves."""
        def make(params: SamplingParams, prompt_ids: list[int], output_ids: list[int]):
            fn = self.new_req_logits_processor(params)
            if fn is None:
                return None
            takes_prompt = len(inspect.signature(fn).parameters) == 3
            return fn, takes_prompt, prompt_ids, output_ids

        update_sparse_state(self._rows, batch_update, make)

    def apply(self, logits: Tensor) -> Tensor:
        """Replace each enabled row by its callable's result (rows without one are untouched)."""
        for index, (fn, takes_prompt, prompt_ids, output_ids) in self._rows.items():
            row = logits[index]
            out = fn(prompt_ids, output_ids, row) if takes_prompt else fn(output_ids, row)
            if out is not row:
                logits[index] = out
        return logits


# ---------------------------------------------------------------- loading

ENTRY_POINT_GROUP = "tinyllm.logits_processors"


def processor_fqcn(spec: str | type) -> str:
    """A class or "pkg.mod:Class" -> "pkg.mod:Class" (classes must be importable by name:
    workers are separate processes and nothing is pickled)."""
    if isinstance(spec, str):
        return spec
    if not isinstance(spec, type):
        raise ValueError(f"logits_processors: expected a class or 'module:Class', got {spec!r}")
    if spec.__module__ == "__main__" or "<locals>" in spec.__qualname__:
        raise ValueError(f"logits_processors: {spec.__qualname__} must be defined at the top "
                         "level of an importable module (workers import it by name)")
    return f"{spec.__module__}:{spec.__qualname__}"


def resolve_processor(fqcn: str) -> type[LogitsProcessor]:
    """Import "pkg.mod:Class" (or "pkg.mod.Class") and check it is a LogitsProcessor."""
    import importlib

    module_name, sep, attr = fqcn.partition(":")
    if not sep:
        module_name, _, attr = fqcn.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"logits_processors: {fqcn!r} is not 'module:Class'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"logits_processors: cannot import {fqcn!r}: {e}") from None
    if not (isinstance(obj, type) and issubclass(obj, LogitsProcessor)):
        raise ValueError(f"logits_processors: {fqcn!r} is not a LogitsProcessor subclass")
    return obj


def load_logits_processors(fqcns: Sequence[str]) -> list[type[LogitsProcessor]]:
    """The entry-point group's processors (all of them, always) then the named ones, deduped."""
    from importlib.metadata import entry_points

    classes: list[type[LogitsProcessor]] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        classes.append(resolve_processor(ep.value))
    for fqcn in fqcns:
        classes.append(resolve_processor(fqcn))
    return list(dict.fromkeys(classes))

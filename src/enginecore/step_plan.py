"""`StepPlan` and `SpecCounters`: the scheduler's scratch record of one `schedule()` call, and
its cumulative speculative-decoding acceptance counts. Core-side, torch-free.
"""

from __future__ import annotations


class StepPlan:
    """What one `schedule()` call hands out, turned into an ExecuteStep at the end."""

    __slots__ = ("budget", "num_scheduled", "new_block_ids", "admitted", "preempted",
                 "encoder_budget", "encoder_inputs", "encoding", "spec")

    def __init__(self, budget: int, encoder_budget: int) -> None:
        self.budget = budget  # tokens left this step
        self.encoder_budget = encoder_budget  # placeholder tokens of items still encodable
        self.encoder_inputs: dict[str, list[int]] = {}  # req_id -> mm_inputs indices to encode
        self.encoding: set[str] = set()  # hashes encoded this step
        self.num_scheduled: dict[str, int] = {}
        self.new_block_ids: dict[str, list[int]] = {}
        self.admitted: set[str] = set()  # sent as NewReq (first schedule or resumed)
        self.preempted: set[str] = set()
        self.spec: dict[str, list[int]] = {}  # draft tokens scheduled for verification

    def add(self, req_id: str, num_tokens: int, new_block_ids: list[int]) -> None:
        self.num_scheduled[req_id] = num_tokens
        self.new_block_ids[req_id] = new_block_ids
        self.budget -= num_tokens

    def drop(self, req_id: str) -> None:
        """Un-schedule a request preempted after it was scheduled (priority policy)."""
        self.budget += self.num_scheduled.pop(req_id, 0)
        self.new_block_ids.pop(req_id, None)
        self.spec.pop(req_id, None)


class SpecCounters:
    """Cumulative speculative-decoding acceptance counts (SchedulerStats.spec_*)."""

    __slots__ = ("num_drafts", "num_draft_tokens", "num_accepted", "per_pos")

    def __init__(self, k: int) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted = 0
        self.per_pos = [0] * k

    def record(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted += num_accepted
        for j in range(num_accepted):
            self.per_pos[j] += 1

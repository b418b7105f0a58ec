"""`EngineLink`: a client's connection to one engine core (one data-parallel rank).

It holds the two sockets (PUSH to the core's input, PULL from this client's output address),
the core's `CoreReady`, its latest `SchedulerStats`, and what the client can tell about its load
and liveness:

- load: vLLM's score, `waiting * 4 + running`, from the stats the core sends with its outputs and
  heartbeats, plus the requests this client sent since those stats (they are in no count yet);
- liveness: a core on this node is watched by pid; any core is dead once it has been silent for
  `Env.PEER_TIMEOUT_S` after having been heard (the core sends a heartbeat at least every second),
  which is how a lost remote node shows up.
"""

from __future__ import annotations

import os
import time

import msgspec
import zmq
import zmq.asyncio

from enginecore.config import Env
from enginecore.protocol import CoreReady, EngineOutputs, SchedulerStats, encode
from frontend.launch import CoreHandle


class EngineEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where one engine core listens for one client."""

    dp_rank: int
    input_addr: str
    output_addr: str  # the core's output address for this client index
    local: bool = True  # on this node: its pid can be watched


class EngineLink:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: EngineEndpoint,
                 handle: CoreHandle | None = None):
        self.endpoint = endpoint
        self.dp_rank = endpoint.dp_rank
        self.handle = handle  # set when this client launched the core
        self.input = ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(endpoint.input_addr)
        self.output = ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.LINGER, 0)
        self.output.connect(endpoint.output_addr)
        self.ready: CoreReady | None = None
        self.stats = SchedulerStats()
        self.sent_since_stats = 0  # requests added here that the latest stats may not count
        self.last_heard: float | None = None  # monotonic time of the last message
        self.last_pinged = 0.0  # monotonic time of the last ping sent (remote cores)

    def send(self, msg: msgspec.Struct) -> None:
        self.input.send(encode(msg), copy=False)

    def add_sent(self) -> None:
        """Count a request just sent here (until the core's next stats include it)."""
        self.sent_since_stats += 1

    def score(self) -> int:
        """vLLM's DP load score: waiting * 4 + running, counting requests in transit as waiting."""
        return (self.stats.num_waiting + self.sent_since_stats) * 4 + self.stats.num_running

    def heard(self, msg: CoreReady | EngineOutputs) -> None:
        """Note a message from the core (any message proves it alive)."""
        self.last_heard = time.monotonic()
        if isinstance(msg, CoreReady):
            self.ready = msg
        elif msg.stats is not None:
            self.stats = msg.stats
            self.sent_since_stats = 0

    def dead_reason(self) -> str | None:
        """Why this core counts as dead, or None while it looks alive."""
        name = f"engine core (DP rank {self.dp_rank})"
        if self.handle is not None:
            if not self.handle.alive():
                return f"{name} exited with code {self.handle.proc.poll()}"
        elif self.endpoint.local and self.ready is not None:
            try:
                os.kill(self.ready.engine_pid, 0)
            except ProcessLookupError:
                return f"{name} process died"
            except PermissionError:
                pass
        if self.last_heard is not None and \
                time.monotonic() - self.last_heard > Env.PEER_TIMEOUT_S:
            return f"{name} at {self.endpoint.input_addr} stopped responding " \
                   f"(silent for over {Env.PEER_TIMEOUT_S:g}s)"
        return None

    def close(self) -> None:
        self.input.close()
        self.output.close()


def sum_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Engine-wide stats of several DP ranks: counts add up, KV usage is over all blocks."""
    total = SchedulerStats()
    for s in stats:
        for name in SchedulerStats.__struct_fields__:
            if name != "kv_cache_usage":
                setattr(total, name, getattr(total, name) + getattr(s, name))
    used = sum(s.kv_cache_usage * s.num_total_blocks for s in stats)
    total.kv_cache_usage = used / total.num_total_blocks if total.num_total_blocks else \
        (sum(s.kv_cache_usage for s in stats) / len(stats) if stats else 0.0)
    return total

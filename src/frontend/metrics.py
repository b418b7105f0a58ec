"""`ServerMetrics`: what `/metrics` reports, in the Prometheus text format (prometheus-client).

Two kinds of metrics, collected two ways:

    per-request   request counts by finish reason, TTFT, inter-token latency, end-to-end latency,
                  prompt and generation token counters. Each API server observes its own
                  requests. With several API servers (`--api-server-count`), prometheus-client's
                  multiprocess mode adds them up: every process writes its values to mmap'd files
                  in one directory (the launcher creates it and sets PROMETHEUS_MULTIPROC_DIR for
                  its children), and a scrape, whichever process answers it, reads all the files.
    engine-wide   KV-cache usage, running and waiting requests, prefix-cache queries and hits
                  (and their ratio), preemptions, speculative-decoding acceptance. They belong
                  to the engine cores, so summing them over API servers would be wrong: the
                  process answering the scrape fetches fresh `SchedulerStats` from every core and
                  reports them through a collector, one sample per data-parallel rank (label
                  `engine="<rank>"`, as vLLM).

`tinyllm:api_servers` (a `livesum` gauge: each live process contributes 1) shows how many API
servers the files describe. Metric names follow vLLM's, under the `tinyllm:` prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from enginecore.protocol import SchedulerStats

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0)


class ServerMetrics:
    """The metrics of one API server process; `render()` answers a scrape."""

    def __init__(self, model_name: str, stats: Callable[[], dict[int, SchedulerStats]],
                 multiprocess_dir: str | None = None):
        # In multiprocess mode the values live in files, so the metric objects need no registry;
        # a scrape builds a fresh one over the files (MultiProcessCollector).
        own = None if multiprocess_dir else CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.requests = Counter("tinyllm:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=own)
        self.prompt_tokens = Counter("tinyllm:prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=own).labels(model_name)
        self.generation_tokens = Counter("tinyllm:generation_tokens", "Tokens generated.",
                                         labels, registry=own).labels(model_name)
        self.ttft = Histogram("tinyllm:time_to_first_token_seconds",
                              "Arrival to first generated token.", labels,
                              buckets=_TTFT_BUCKETS, registry=own).labels(model_name)
        self.itl = Histogram("tinyllm:inter_token_latency_seconds",
                             "Time between consecutive outputs of one request.", labels,
                             buckets=_ITL_BUCKETS, registry=own).labels(model_name)
        self.e2e = Histogram("tinyllm:e2e_request_latency_seconds",
                             "Arrival to finish of a request.", labels,
                             buckets=_E2E_BUCKETS, registry=own).labels(model_name)
        Gauge("tinyllm:api_servers", "Live API server processes.", registry=own,
              multiprocess_mode="livesum").set(1)
        engine = _EngineCollector(model_name, stats)
        if multiprocess_dir:
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, path=multiprocess_dir)
        else:
            assert own is not None
            self.registry = own
        self.registry.register(engine)

    def track(self, num_prompt_tokens: int) -> RequestTracker:
        """Start timing one completion (one choice) that arrived now."""
        return RequestTracker(self, num_prompt_tokens)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTracker:
    """Timings of one completion from arrival to finish; `finish` records it exactly once."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int):
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = self.last = time.monotonic()
        self.num_tokens = 0
        self.finished = False

    def on_tokens(self, num_new: int) -> None:
        """Record an output carrying `num_new` generated tokens."""
        if num_new <= 0:
            return
        now = time.monotonic()
        m = self.metrics
        if self.num_tokens == 0:
            m.ttft.observe(now - self.arrival)
        else:
            m.itl.observe(now - self.last)
        self.last = now
        self.num_tokens += num_new
        m.generation_tokens.inc(num_new)

    def finish(self, reason: str) -> None:
        """Count the request under its finish reason (stop | length | abort | error)."""
        if self.finished:
            return
        self.finished = True
        m = self.metrics
        m.requests.labels(m.model_name, reason).inc()
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.e2e.observe(time.monotonic() - self.arrival)


class _EngineCollector:
    """Engine gauges and counters from each DP rank's latest SchedulerStats, read at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], dict[int, SchedulerStats]]):
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        per_rank = sorted(self.stats().items())
        gauges = (
            ("tinyllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
             lambda s: s.kv_cache_usage),
            ("tinyllm:num_requests_running", "Requests in the running batch.",
             lambda s: s.num_running),
            ("tinyllm:num_requests_waiting", "Requests waiting to be scheduled.",
             lambda s: s.num_waiting),
            ("tinyllm:prefix_cache_hit_rate", "Prompt tokens found cached / looked up, since "
             "start.", lambda s: s.prefix_cache_hits / s.prefix_cache_queries
             if s.prefix_cache_queries else 0.0),
        )
        counters = (
            ("tinyllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             lambda s: s.prefix_cache_queries),
            ("tinyllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             lambda s: s.prefix_cache_hits),
            ("tinyllm:num_preemptions", "Requests preempted by the scheduler.",
             lambda s: s.num_preemptions),
        )
        for kind, table in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, doc, value in table:
                family = kind(name, doc, labels=["model_name", "engine"])
                for rank, s in per_rank:
                    family.add_metric([self.model_name, str(rank)], value(s))
                yield family
        spec = [(rank, s) for rank, s in per_rank if s.spec_accepted_per_pos]
        if spec:  # speculative decoding is on
            yield from self._spec_decode(spec)

    def _spec_decode(self, per_rank: list[tuple[int, SchedulerStats]]) -> Iterator[Metric]:
        counters = (
            ("tinyllm:spec_decode_num_drafts", "Draft verifications (a request with drafts in a "
             "step).", lambda s: s.spec_num_drafts),
            ("tinyllm:spec_decode_num_draft_tokens", "Draft tokens verified.",
             lambda s: s.spec_num_draft_tokens),
            ("tinyllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
             lambda s: s.spec_num_accepted_tokens),
        )
        labels = ["model_name", "engine"]
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=labels)
            for rank, s in per_rank:
                family.add_metric([self.model_name, str(rank)], value(s))
            yield family
        per_pos = CounterMetricFamily(
            "tinyllm:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0: the first draft).",
            labels=[*labels, "position"])
        mean = GaugeMetricFamily("tinyllm:spec_decode_mean_acceptance_length",
                                 "1 + accepted / drafts, since start.", labels=labels)
        for rank, s in per_rank:
            for pos, value in enumerate(s.spec_accepted_per_pos):
                per_pos.add_metric([self.model_name, str(rank), str(pos)], value)
            # 1 + accepted drafts per verification: tokens a request gains per verifying step.
            mean.add_metric([self.model_name, str(rank)], 1.0 + s.spec_num_accepted_tokens
                            / s.spec_num_drafts if s.spec_num_drafts else 1.0)
        yield per_pos
        yield mean

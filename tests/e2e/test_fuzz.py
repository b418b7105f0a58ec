"""Fuzzing: schemathesis generates requests from GET /openapi.json (valid and mutated bodies) and
sends them to a live server. Bounded: a few examples per operation and mode, a short context
(--max-model-len 32) so no generation runs long. Nothing may answer a 5xx, and the server must
still be healthy and generating afterwards.
"""

from __future__ import annotations

import collections

import pytest
import schemathesis
from e2e_server import http
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

pytestmark = pytest.mark.timeout(120)

_EXAMPLES = 30  # per operation and mode; ~10 operations, ~15 s in all
_SKIP = {"GET /openapi.json"}  # static; fetched once below


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir):
    return server_factory([tiny_model_dir, "--num-gpu-blocks-override", "64",
                           "--max-model-len", "32", "--max-num-seqs", "64"])


def test_openapi_document_lists_the_routes(server):
    status, spec = http("GET", server.url + "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.1")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
            "/health", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    request = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    # `prompt` is optional since `prompt_embeds` may replace it (as in vLLM); one is required.
    assert {"prompt", "prompt_embeds"} <= set(request["properties"])
    assert request["properties"]["n"]["type"] == "integer"


def test_fuzzed_requests_never_answer_5xx(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 9
    for op in operations:
        if op.label in _SKIP:
            continue
        _fuzz(op, GenerationMode.POSITIVE, server.url, statuses, failures)
        if len(op.body):  # bodies that break the schema
            _fuzz(op, GenerationMode.NEGATIVE, server.url, statuses, failures)
    assert not failures, "\n".join(failures[:10])
    # Both the generation path and the validation path were exercised.
    assert statuses[200] >= 10 and statuses[400] >= 10, statuses
    assert http("GET", server.url + "/health")[0] == 200
    status, body = http("POST", server.url + "/v1/completions",
                        {"prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def _fuzz(op, mode: GenerationMode, url: str, statuses: collections.Counter[int],
          failures: list[str]) -> None:
    """Send `_EXAMPLES` generated requests of one operation; count statuses, record 5xx."""

    @settings(max_examples=_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(mode))
    def check(case) -> None:
        response = case.call(base_url=url, timeout=30)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{op.label} -> {response.status_code}: {case.body!r:.300} "
                            f"{response.text[:300]}")

    check()

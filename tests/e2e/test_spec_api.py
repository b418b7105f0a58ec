"""`--speculative-config` through the real server: greedy output unchanged, acceptance metrics
on /metrics, a bad config refused at startup with the field named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from e2e_server import TINY_ENGINE_FLAGS, child_env, http, metric

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3})
PROMPT = [11, 12, 13, 14, 15, 11, 12, 13, 14, 15, 11, 12, 13]


@pytest.fixture(scope="module")
def servers(server_factory, tiny_model_dir):
    plain = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS])
    spec = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--speculative-config", NGRAM])
    return plain, spec


def test_same_tokens_and_acceptance_metrics(servers, tiny_model_dir):
    plain, spec = servers
    body = {"model": tiny_model_dir, "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0}
    texts = []
    for server in (plain, spec):
        status, out = http("POST", server.url + "/v1/completions", body)
        assert status == 200, out
        texts.append(out["choices"][0]["text"])
    assert texts[0] == texts[1]
    page = http("GET", spec.url + "/metrics")[1]
    drafted = metric(page, "tinyllm:spec_decode_num_draft_tokens_total")
    accepted = metric(page, "tinyllm:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 <= accepted <= drafted
    assert metric(page, "tinyllm:spec_decode_num_accepted_tokens_per_pos_total",
                  position="0") <= metric(page, "tinyllm:spec_decode_num_drafts_total")
    assert metric(page, "tinyllm:spec_decode_mean_acceptance_length") >= 1.0
    assert "spec_decode" not in http("GET", plain.url + "/metrics")[1]


def test_bad_speculative_config_fails_startup(tiny_model_dir):
    bad = json.dumps({"method": "ngram", "num_speculative_tokens": 0})
    proc = subprocess.run([sys.executable, "-m", "frontend", "serve", tiny_model_dir,
                           "--speculative-config", bad], capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode != 0
    assert "num_speculative_tokens" in proc.stderr

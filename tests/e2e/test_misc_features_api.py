"""Over HTTP: sleep-mode dev endpoints, vllm_xargs reaching a custom logits processor, and
`prompt_embeds` (base64 torch.save'd tensors) on /v1/completions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e_server import TINY_ENGINE_FLAGS, child_env, http

PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")
C = "/v1/completions"


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir):
    path = os.pathsep.join(p for p in (PLUGINS, os.environ.get("PYTHONPATH", "")) if p)
    return server_factory(
        [tiny_model_dir, *TINY_ENGINE_FLAGS, "--enable-sleep-mode", "--enable-prompt-embeds",
         "--logits-processors", "lp_plugins:TargetTokenLogitsProcessor"],
        env=child_env(PYTHONPATH=path))


def complete(server, **extra):
    return http("POST", server.url + C, {"prompt": [5, 6, 7], "max_tokens": 5,
                                          "temperature": 0, **extra})


def test_vllm_xargs_drive_the_custom_processor_and_bad_ones_get_400(server):
    status, body = complete(server, vllm_xargs={"target_token": 42}, return_token_ids=True)
    assert status == 200, body
    status, plain = complete(server)
    assert status == 200
    assert body["choices"][0]["text"] != plain["choices"][0]["text"]
    status, body = complete(server, vllm_xargs={"target_token": "x"})
    assert status == 400 and "target_token" in body["error"]["message"]


def test_sleep_endpoints(server):
    status, before = complete(server)
    assert status == 200
    assert http("GET", server.url + "/is_sleeping") == (200, {"is_sleeping": False})
    assert http("POST", server.url + "/sleep?level=3")[0] == 400
    assert http("POST", server.url + "/sleep?level=1")[0] == 200
    assert http("GET", server.url + "/is_sleeping") == (200, {"is_sleeping": True})
    assert http("POST", server.url + "/wake_up?tags=weights")[0] == 200
    assert http("GET", server.url + "/is_sleeping") == (200, {"is_sleeping": True})
    assert http("POST", server.url + "/wake_up?tags=bogus")[0] == 400
    assert http("POST", server.url + "/wake_up")[0] == 200
    assert http("GET", server.url + "/is_sleeping") == (200, {"is_sleeping": False})
    status, after = complete(server)
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]


def test_prompt_embeds_completions(server, tiny_model_dir):
    import base64
    import io

    import torch
    from transformers import AutoModelForCausalLM

    table = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings()
    ids = [[5, 6, 7], [8, 9, 10, 11]]
    encoded = []
    for prompt in ids:
        buf = io.BytesIO()
        torch.save(table(torch.tensor(prompt)).detach(), buf)
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    status, want = http("POST", server.url + C, {"prompt": ids, "max_tokens": 5,
                                                 "temperature": 0})
    assert status == 200
    # Embedding prompts are answered first, then the token prompt.
    status, got = http("POST", server.url + C, {"prompt_embeds": encoded[1], "prompt": ids[0],
                                                "max_tokens": 5, "temperature": 0})
    assert status == 200, got
    texts = [c["text"] for c in sorted(got["choices"], key=lambda c: c["index"])]
    want_texts = [c["text"] for c in sorted(want["choices"], key=lambda c: c["index"])]
    assert texts == [want_texts[1], want_texts[0]]
    status, body = http("POST", server.url + C, {"prompt_embeds": "%%%", "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt_embeds"

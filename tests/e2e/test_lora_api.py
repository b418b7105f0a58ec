"""Multi-LoRA through the real server: adapters as `model`, /v1/models, runtime load/unload while
a request streams, the filesystem resolver, and the errors (404 unknown, 400 bad adapter).

One server: `serve TINY_LLAMA --enable-lora --max-loras 2 --max-lora-rank 8 --lora-modules
sql=PATH '{"name": "chat", ...}'` with TLS_ALLOW_RUNTIME_LORA_UPDATING=1 and a resolver directory
holding the "math" adapter. Greedy outputs are checked against peft on the same adapter.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from e2e_server import TINY_ENGINE_FLAGS, child_env, http
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = "tiny"
PROMPT = [11, 12, 13, 14, 15, 16, 17]


@pytest.fixture(scope="module")
def resolver_dir(tmp_path_factory, lora_adapters) -> str:
    root = tmp_path_factory.mktemp("resolver")
    shutil.copytree(lora_adapters["math"], root / "math")
    return str(root)


@pytest.fixture(scope="module")
def server(server_factory, tiny_models, lora_adapters, resolver_dir):
    chat = json.dumps({"name": "chat", "path": lora_adapters["chat"], "base_model_name": MODEL})
    return server_factory(
        [tiny_models["llama"], *TINY_ENGINE_FLAGS, "--served-model-name", MODEL,
         "--dtype", "float32", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
         "--lora-modules", f"sql={lora_adapters['sql']}", chat],
        env=child_env(TLS_ALLOW_RUNTIME_LORA_UPDATING="1",
                      TLS_LORA_RESOLVER_CACHE_DIR=resolver_dir))


def peft_tokens(model_dir: str, adapter: str | None, max_new: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(max_new):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(PROMPT):]


def complete(server, model: str, max_tokens: int = 6) -> tuple[int, dict]:
    return http("POST", server.url + "/v1/completions",
                {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
                 "ignore_eos": True, "skip_special_tokens": False})


def text(body: dict) -> str:
    return body["choices"][0]["text"]


def peft_text(model_dir: str, adapter: str | None, max_new: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.decode(peft_tokens(model_dir, adapter, max_new), skip_special_tokens=False)


def test_models_lists_adapters(server, lora_adapters):
    status, body = http("GET", server.url + "/v1/models")
    assert status == 200
    cards = {m["id"]: m for m in body["data"]}
    assert list(cards)[:3] == [MODEL, "sql", "chat"]
    assert cards["sql"]["root"] == lora_adapters["sql"] and cards["sql"]["parent"] == MODEL


def test_adapters_match_peft(server, tiny_models, lora_adapters):
    for name in ("sql", "chat", MODEL):
        status, body = complete(server, name)
        assert status == 200, body
        assert body["model"] == name
        adapter = None if name == MODEL else lora_adapters[name]
        assert text(body) == peft_text(tiny_models["llama"], adapter, 6), name


def test_chat_with_adapter(server):
    status, body = http("POST", server.url + "/v1/chat/completions",
                        {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4, "temperature": 0.0})
    assert status == 200 and body["model"] == "chat", body
    assert body["usage"]["completion_tokens"] >= 1


def test_unknown_model_is_404(server):
    status, body = complete(server, "nope")
    assert status == 404 and "nope" in body["error"]["message"]


def test_load_unload_while_serving(server, lora_adapters):
    # A long base-model stream runs through the whole load / use / unload sequence.
    result: dict = {}

    def long_request() -> None:
        result["resp"] = complete(server, MODEL, max_tokens=600)

    thread = threading.Thread(target=long_request)
    thread.start()
    status, msg = http("POST", server.url + "/v1/load_lora_adapter",
                        {"lora_name": "sql2", "lora_path": lora_adapters["sql"]})
    assert status == 200 and "added successfully" in msg
    assert thread.is_alive()  # loaded while the long request is still generating
    status, body = complete(server, "sql2")
    assert status == 200 and text(body) == text(complete(server, "sql")[1])
    assert "sql2" in [m["id"] for m in http("GET", server.url + "/v1/models")[1]["data"]]
    status, msg = http("POST", server.url + "/v1/unload_lora_adapter", {"lora_name": "sql2"})
    assert status == 200 and "removed successfully" in msg
    assert complete(server, "sql2")[0] == 404
    thread.join(60)
    status, body = result["resp"]
    assert status == 200 and body["usage"]["completion_tokens"] == 600
    # Loading it again after the unload works (workers reload it from its path).
    assert http("POST", server.url + "/v1/load_lora_adapter",
                {"lora_name": "sql2", "lora_path": lora_adapters["sql"]})[0] == 200
    assert complete(server, "sql2")[0] == 200


def test_bad_adapters_are_400(server, lora_adapters, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(lora_adapters["chat"], big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    for body, words in [({"lora_name": "big", "lora_path": str(big)}, "rank exceeds"),
                        ({"lora_name": "gone", "lora_path": str(tmp_path / "x")}, "not found"),
                        ({"lora_name": "sql", "lora_path": lora_adapters["chat"]}, "already"),
                        ({"lora_name": "n"}, "lora_path")]:
        status, out = http("POST", server.url + "/v1/load_lora_adapter", body)
        assert status == 400 and words in out["error"]["message"], out
    status, out = http("POST", server.url + "/v1/unload_lora_adapter", {"lora_name": "zzz"})
    assert status == 404
    assert complete(server, "sql")[0] == 200  # the engine is fine


def test_resolver_finds_adapter(server, tiny_models, lora_adapters):
    status, body = complete(server, "math")
    assert status == 200, body
    assert text(body) == peft_text(tiny_models["llama"], lora_adapters["math"], 6)
    assert "math" in [m["id"] for m in http("GET", server.url + "/v1/models")[1]["data"]]

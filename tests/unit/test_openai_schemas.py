"""OpenAI schemas: request decoding (valid and invalid bodies), the mapping to SamplingParams, and
responses that the official `openai` client's types accept."""

from __future__ import annotations

import json

import msgspec
import pytest

from frontend import openai as api
from sampling.params import SamplingParams

openai_types = pytest.importorskip("openai.types")
chat_types = pytest.importorskip("openai.types.chat")


def _completion(body: dict) -> api.CompletionRequest:
    return api.completion_request_decoder.decode(json.dumps(body).encode())


def _chat(body: dict) -> api.ChatCompletionRequest:
    return api.chat_request_decoder.decode(json.dumps(body).encode())


def _roundtrip(struct: msgspec.Struct) -> dict:
    return json.loads(api.json_encoder.encode(struct))


# ---------------------------------------------------------------------- decoding


@pytest.mark.parametrize(("prompt", "batch"), [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_forms(prompt: object, batch: list) -> None:
    req = _completion({"model": "m", "prompt": prompt, "unknown_field": {"x": 1}})
    assert req.prompts() == batch
    assert req.model == "m" and req.stream is False and req.add_special_tokens is True


def test_chat_request_decodes_all_message_shapes() -> None:
    req = _chat({
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "look", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        "stream": True, "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "look"}}], "tool_choice": "auto",
        "response_format": {"type": "json_object"}, "chat_template_kwargs": {"think": False},
        "metadata": {"ignored": True},
    })
    user, assistant = req.messages[1], req.messages[2]
    assert isinstance(user.content, list) and isinstance(user.content[1], api.ImagePart)
    assert user.content[1].image_url.url.startswith("data:image/png")
    assert user.text_content() == "what is\nthis?"
    assert assistant.tool_calls is not None and assistant.tool_calls[0].function.name == "look"
    assert req.stream_options is not None and req.stream_options.include_usage
    assert req.add_generation_prompt and req.add_special_tokens is False
    # Template messages drop unset fields, as templates test `'key' in message`.
    msgs = req.template_messages()
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1]["content"][1] == {"type": "image_url",
                                     "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert "content" not in msgs[2] and msgs[2]["tool_calls"][0]["function"]["name"] == "look"
    assert msgs[3] == {"role": "tool", "content": "a cat", "tool_call_id": "call_1"}


@pytest.mark.parametrize(("decode", "body", "path"), [
    (_completion, {"prompt": 5}, "$.prompt"),
    (_completion, {"prompt": "x", "max_tokens": "10"}, "$.max_tokens"),
    (_completion, {"prompt": "x", "temperature": "hot"}, "$.temperature"),
    (_completion, {"prompt": "x", "stop": [1]}, "$.stop"),
    (_completion, {"prompt": "x", "logit_bias": {"5": "a lot"}}, "$.logit_bias"),
    (_completion, {"prompt": [[1, "a"]]}, "$.prompt[0][1]"),
    (_chat, {"messages": [{"role": "robot", "content": "x"}]}, "$.messages[0].role"),
    (_chat, {"messages": [{"role": "user", "content": 3}]}, "$.messages[0].content"),
    (_chat, {"messages": [{"role": "user", "content": [{"type": "sound", "x": 1}]}]},
     "$.messages[0].content[0].type"),
    (_chat, {"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "$.logprobs"),
    (_chat, {"messages": [{"role": "user", "content": "x"}], "n": True}, "$.n"),
])
def test_invalid_bodies_name_the_field(decode, body: dict, path: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        decode(body)
    assert path in str(err.value)


def test_invalid_bodies_without_path() -> None:
    with pytest.raises(msgspec.ValidationError, match="messages"):
        _chat({"model": "m"})
    with pytest.raises(msgspec.ValidationError, match="prompt"):
        _completion({"prompt": [1, "a"]})  # mixed ids and strings
    with pytest.raises(msgspec.ValidationError, match="prompt"):
        _completion({"prompt": []})
    with pytest.raises(msgspec.DecodeError):
        api.chat_request_decoder.decode(b"{not json")


# ---------------------------------------------------------------------- to_sampling_params


def test_completion_to_sampling_params_maps_every_field() -> None:
    req = _completion({
        "prompt": "x", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": "END",
        "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2, "logit_bias": {"11": 250},
        "logprobs": 2, "echo": True, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
        "ignore_eos": True, "min_tokens": 1, "stop_token_ids": [9], "skip_special_tokens": False,
        "include_stop_str_in_output": True, "allowed_token_ids": [1, 2, 11],
        "bad_words": ["bad"], "spaces_between_special_tokens": False,
        "vllm_xargs": {"my_proc": 1}, "priority": -1, "cache_salt": "s",
    })
    params = req.to_sampling_params(default_max_tokens=100)
    assert params == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=["END"], seed=3,
        presence_penalty=0.1, frequency_penalty=0.2, logit_bias={11: 100.0}, logprobs=2,
        prompt_logprobs=2, top_k=5, min_p=0.05, repetition_penalty=1.1, ignore_eos=True,
        min_tokens=1, stop_token_ids=[9], skip_special_tokens=False,
        include_stop_str_in_output=True, allowed_token_ids=[1, 2, 11], bad_words=["bad"],
        spaces_between_special_tokens=False, extra_args={"my_proc": 1})
    params.validate(vocab_size=50)
    assert (req.priority, req.cache_salt) == (-1, "s")


def test_unset_fields_keep_sampling_defaults() -> None:
    params = _completion({"prompt": "x"}).to_sampling_params(default_max_tokens=33)
    assert params == SamplingParams(max_tokens=33)
    params = _chat({"messages": [{"role": "user", "content": "x"}]}).to_sampling_params(44)
    assert params == SamplingParams(max_tokens=44)
    assert _completion({"prompt": "x", "top_k": -1}).to_sampling_params(1).top_k == 0


def test_chat_to_sampling_params() -> None:
    base = {"messages": [{"role": "user", "content": "x"}]}
    req = _chat({**base, "max_tokens": 5, "max_completion_tokens": 9, "logprobs": True,
                 "top_logprobs": 3, "stop": ["a", "b"], "prompt_logprobs": 1})
    params = req.to_sampling_params(100)
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs) == (9, 3, 1)
    assert params.stop == ["a", "b"]
    assert _chat({**base, "max_tokens": 5}).to_sampling_params(100).max_tokens == 5
    assert _chat({**base, "logprobs": True}).to_sampling_params(100).logprobs == 0
    assert _chat({**base, "logprobs": False}).to_sampling_params(100).logprobs is None


@pytest.mark.parametrize(("decode", "body", "field"), [
    (_completion, {"prompt": "x", "logit_bias": {"abc": 1.0}}, "logit_bias"),
    (_completion, {"prompt": "x", "suffix": "tail"}, "suffix"),
    (_completion, {"prompt": "x", "best_of": 3}, "best_of"),
    (_chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_values_raise_value_error_naming_field(decode, body: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        decode(body).to_sampling_params(10)


def test_out_of_range_values_fail_validation() -> None:
    params = _completion({"prompt": "x", "temperature": -1}).to_sampling_params(10)
    with pytest.raises(ValueError, match="temperature"):
        params.validate()


# ---------------------------------------------------------------------- responses


def test_completion_response_parses_with_openai_client() -> None:
    logprobs = api.CompletionLogprobs(text_offset=[0, 3], token_logprobs=[-0.1, -2.5],
                                      tokens=["Hel", "lo"],
                                      top_logprobs=[{"Hel": -0.1, "He": -3.0}, {"lo": -2.5}])
    resp = api.CompletionResponse(
        id="cmpl-1", created=1700000000, model="tiny",
        choices=[api.CompletionChoice(index=0, text="Hello", logprobs=logprobs,
                                      finish_reason="stop", stop_reason="\n")],
        usage=api.UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5,
                            prompt_tokens_details=api.PromptTokensDetails(cached_tokens=2)))
    data = _roundtrip(resp)
    parsed = openai_types.Completion.model_validate(data)
    assert parsed.object == "text_completion" and parsed.choices[0].text == "Hello"
    assert parsed.choices[0].logprobs.top_logprobs[0]["He"] == -3.0
    assert parsed.usage.total_tokens == 5 and parsed.usage.prompt_tokens_details.cached_tokens == 2
    # Streamed chunks share the shape; mid-stream ones carry explicit nulls.
    chunk = _roundtrip(api.CompletionStreamResponse(
        id="cmpl-1", created=1, model="tiny", choices=[api.CompletionChoice(index=0, text="He")]))
    assert chunk["choices"][0]["finish_reason"] is None and chunk["usage"] is None


def test_chat_response_parses_with_openai_client() -> None:
    top = [api.TopLogprob(token="Hi", logprob=-0.2, bytes=[72, 105])]
    resp = api.ChatCompletionResponse(
        id="chatcmpl-1", created=1700000000, model="tiny",
        choices=[api.ChatChoice(
            index=0, finish_reason="tool_calls",
            message=api.ChatResponseMessage(
                content="Hi", reasoning_content="thinking",
                tool_calls=[api.ToolCall(id="call_1", function=api.FunctionCall(
                    name="get", arguments="{\"q\": 1}"))]),
            logprobs=api.ChatLogprobs(content=[api.ChatLogprobToken(
                token="Hi", logprob=-0.2, bytes=[72, 105], top_logprobs=top)]))],
        usage=api.UsageInfo(prompt_tokens=4, completion_tokens=1, total_tokens=5))
    parsed = chat_types.ChatCompletion.model_validate(_roundtrip(resp))
    choice = parsed.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hi"
    assert choice.message.tool_calls[0].function.arguments == "{\"q\": 1}"
    assert choice.logprobs.content[0].top_logprobs[0].bytes == [72, 105]
    assert choice.message.model_extra["reasoning_content"] == "thinking"


def test_chat_chunks_parse_with_openai_client() -> None:
    def chunk(delta: api.DeltaMessage, finish: str | None = None,
              usage: api.UsageInfo | None = None) -> dict:
        choices = [] if usage else [api.ChatStreamChoice(index=0, delta=delta,
                                                         finish_reason=finish)]
        return _roundtrip(api.ChatCompletionChunk(id="c", created=1, model="tiny",
                                                  choices=choices, usage=usage))

    first = chunk(api.DeltaMessage(role="assistant", content=""))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    middle = chunk(api.DeltaMessage(tool_calls=[api.DeltaToolCall(
        index=0, id="call_1", type="function",
        function=api.DeltaFunctionCall(name="get", arguments="{\"q\""))]))
    assert middle["choices"][0]["delta"]["tool_calls"][0]["function"] == {
        "name": "get", "arguments": "{\"q\""}
    last = chunk(api.DeltaMessage(content="!"), finish="stop")
    usage = chunk(api.DeltaMessage(), usage=api.UsageInfo(prompt_tokens=1, completion_tokens=2,
                                                         total_tokens=3))
    parsed = [chat_types.ChatCompletionChunk.model_validate(c)
              for c in (first, middle, last, usage)]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[1].choices[0].delta.tool_calls[0].id == "call_1"
    assert parsed[2].choices[0].finish_reason == "stop" and parsed[2].usage is None
    assert parsed[3].choices == [] and parsed[3].usage.completion_tokens == 2


def test_error_and_model_list_shapes() -> None:
    err = _roundtrip(api.ErrorResponse.create("bad temperature", param="temperature"))
    assert err == {"error": {"message": "bad temperature", "type": "BadRequestError",
                             "param": "temperature", "code": 400}}
    models = _roundtrip(api.ModelList(data=[api.ModelCard(id="tiny", created=1, root="tiny",
                                                          max_model_len=2048)]))
    assert models["object"] == "list"
    model = openai_types.Model.model_validate(models["data"][0])
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "tinyllm")

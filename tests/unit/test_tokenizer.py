"""`frontend.tokenizer.Tokenizer` against transformers' AutoTokenizer on three small tokenizers:

- chatml:    the demo byte-level BPE (`workers.demo.build_tokenizer`), ChatML template file;
- bos:       the same BPE with a BOS-adding TemplateProcessing post-processor, hand-written config
             (AddedToken dicts, inline Llama-2 style template, legacy special_tokens_map.json);
- metaspace: a SentencePiece-style BPE (Metaspace, byte fallback, `<s>` post-processor) whose config
             names an added token that tokenizer.json lacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from frontend.tokenizer import Tokenizer
from workers.demo import build_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    " leading space and trailing ",
    "ünïcødé wörds, emoji 😀🎉 and 你好世界",
    "multi\nline\n\n  indented\ttab",
    "<|im_start|>user\nhi<|im_end|>",
    "<s>[INST] hello [/INST]</s>",
    "",
    "a" * 40,
]

LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Exercises what transformers' environment adds: tojson options, namespace, loop controls,
# the generation tag, strftime_now, template kwargs, and None-valued keys being dropped.
FEATURE_TEMPLATE = """{% set ns = namespace(count=0) %}
{% if tools %}Tools: {{ tools | tojson }}
{% endif %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.count = ns.count + 1 %}
  {% generation %}{{ m.role }}: {{ m.content }}{% endgeneration %}
  {% if 'tool_calls' in m %} calls={{ m.tool_calls | tojson(indent=2, sort_keys=True) }}{% endif %}

{% endfor %}
{{ ns.count }} messages; {{ greeting | default('none') }}; year={{ strftime_now('%Y') }}
{% if add_generation_prompt %}assistant:{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "You are helpful. ünï 😀 What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "<b>thanks</b> & bye"},
    ],
]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tokenizer(tmp_path_factory.mktemp("chatml")))


@pytest.fixture(scope="module")
def bos_dir(chatml_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bos")
    backend = BackendTokenizer.from_file(str(chatml_dir / "tokenizer.json"))
    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A:0", pair="<|bos|> $A:0 <|bos|>:1 $B:1",
        special_tokens=[("<|bos|>", bos_id)])
    backend.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<|bos|>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": "<|eos|>",
        "chat_template": LLAMA2_TEMPLATE,
        "clean_up_tokenization_spaces": True,  # ignored for BPE, here and in transformers
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    legacy = {"pad_token": "<|pad|>", "additional_special_tokens": ["<|im_start|>"]}
    (out / "special_tokens_map.json").write_text(json.dumps(legacy))
    return out


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("metaspace")
    words = "the quick brown fox jumps over lazy dog hello world model token said yes".split()
    corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(200)]
    backend = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A:0", pair="<s> $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte fallback needs the <0xXX> pieces as ordinary vocab entries
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    (out / "tokenizer.json").write_text(json.dumps(spec))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    added[str(len(vocab))] = {"content": "<|tool|>", "lstrip": False, "normalized": False,
                              "rstrip": False, "single_word": False, "special": True}
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "added_tokens_decoder": added}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(params=["chatml_dir", "bos_dir", "metaspace_dir"])
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, object]:
    path = request.getfixturevalue(request.param)
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


def test_encode_decode_match_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, ref = pair
    for text in TEXTS:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == ref.encode(text, add_special_tokens=add_special), (text, add_special)
            assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip), (text, skip)


def test_special_ids_and_vocab_match_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, ref = pair
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.all_special_ids == ref.all_special_ids


def test_bos_post_processor_and_added_tokens(bos_dir: Path, metaspace_dir: Path) -> None:
    bos = Tokenizer.from_pretrained(bos_dir)
    assert bos.encode("hi")[0] == bos.bos_token_id
    assert bos.encode("hi", add_special_tokens=False)[0] != bos.bos_token_id
    assert bos.pad_token_id is not None  # only special_tokens_map.json names it
    meta = Tokenizer.from_pretrained(metaspace_dir)
    tool_id = meta.token_to_id("<|tool|>")
    assert tool_id == meta.vocab_size - 1  # added from the config's added_tokens_decoder
    assert meta.encode("a<|tool|>b", add_special_tokens=False).count(tool_id) == 1
    assert "<|tool|>" not in meta.decode(meta.encode("a<|tool|>b"))
    assert meta.name_or_path == str(metaspace_dir)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    chatml_dir: Path, bos_dir: Path, add_generation_prompt: bool
) -> None:
    for path in (chatml_dir, bos_dir):
        ours = Tokenizer.from_pretrained(path)
        ref = transformers.AutoTokenizer.from_pretrained(path)
        for messages in CONVERSATIONS:
            expected = ref.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt) == expected


def test_template_features_match_transformers(chatml_dir: Path) -> None:
    ours = Tokenizer.from_pretrained(chatml_dir)
    ref = transformers.AutoTokenizer.from_pretrained(chatml_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter ☀",
                                               "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "weather in Zürich?", "name": None},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function", "function": {
             "name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
        {"role": "tool", "content": "<sunny>", "tool_calls": None},
    ]
    for kwargs in ({}, {"greeting": "hallo"}):
        expected = ref.apply_chat_template(messages, tools=tools, chat_template=FEATURE_TEMPLATE,
                                           tokenize=False, add_generation_prompt=True, **kwargs)
        got = ours.apply_chat_template(messages, tools=tools, chat_template=FEATURE_TEMPLATE,
                                       **kwargs)
        assert got == expected
    assert "calls=" in got and "Zürich" in got and "\\u" not in got


def test_continue_final_message_matches_transformers(chatml_dir: Path) -> None:
    ours = Tokenizer.from_pretrained(chatml_dir)
    ref = transformers.AutoTokenizer.from_pretrained(chatml_dir)
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    expected = ref.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    got = ours.apply_chat_template(messages, add_generation_prompt=False,
                                   continue_final_message=True)
    assert got == expected and got.endswith("1, 2,")
    with pytest.raises(ValueError, match="exclusive"):
        ours.apply_chat_template(messages, continue_final_message=True)


def test_template_errors_are_value_errors(chatml_dir: Path, bos_dir: Path) -> None:
    llama2 = Tokenizer.from_pretrained(bos_dir)
    with pytest.raises(ValueError, match="roles must alternate"):
        llama2.apply_chat_template([{"role": "assistant", "content": "x"}])
    chatml = Tokenizer.from_pretrained(chatml_dir)
    with pytest.raises(ValueError, match="empty"):
        chatml.apply_chat_template([])
    # The sandbox blocks attribute escapes and underscore names on namespaces.
    msgs = [{"role": "user", "content": "x"}]
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError):
        chatml.apply_chat_template(msgs, chat_template=escape)
    with pytest.raises(ValueError, match="not allowed"):
        chatml.apply_chat_template(msgs, chat_template="{% set ns = namespace(_x=1) %}{{ ns._x }}")


def test_missing_and_named_templates(metaspace_dir: Path, chatml_dir: Path, tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(metaspace_dir).apply_chat_template(msgs)
    # A default template file plus a named one in additional_chat_templates/.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((chatml_dir / name).read_bytes())
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(
        "TOOLS {{ tools | length if tools else 0 }}"
        "{% for m in messages %} {{ m.content }}{% endfor %}")
    ours = Tokenizer.from_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(msgs, tools=tools) == "TOOLS 1 hi"
    assert ours.apply_chat_template(msgs, tools=tools) == ref.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs, chat_template="tool_use") == "TOOLS 0 hi"
    assert ours.apply_chat_template(msgs).startswith("<|im_start|>user\nhi")


def test_frontend_text_modules_do_not_import_torch(chatml_dir: Path) -> None:
    code = (
        "import sys\n"
        "from frontend.tokenizer import Tokenizer\n"
        "import frontend.detokenizer, frontend.openai\n"
        f"t = Tokenizer.from_pretrained({str(chatml_dir)!r})\n"
        "assert t.decode(t.encode('hi there')) == 'hi there'\n"
        "t.apply_chat_template([{'role': 'user', 'content': 'x'}])\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""`IncrementalDetokenizer`: streamed deltas add up to the full decode, multi-byte characters come
out whole, stop strings cut the text (earliest match wins) and end the stream."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from frontend.detokenizer import IncrementalDetokenizer
from frontend.tokenizer import Tokenizer
from sampling.params import SamplingParams
from workers.demo import build_tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "ünïcødé wörds and naïve café",
    "emoji 😀🎉👍🏽 and 你好世界",
    "mixed\nlines\ttabs  double  spaces ",
    'the model said: "ok" {json: [1, 2]}',
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """SentencePiece-style BPE: lowercase letters and a few merges; all else via byte fallback."""
    merges = [("▁", "h"), ("e", "l"), ("el", "l"), ("ell", "o"), ("▁h", "ello"), ("▁", "w"),
              ("o", "r"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld")]
    pieces = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + list("▁abcdefghijklmnopqrstuvwxyz") + [a + b for a, b in merges])
    backend = BackendTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                          merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>",
                                              "unk_token": "<unk>"})


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], params: SamplingParams,
            chunk: int = 1, finish: bool = True) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas = [detok.update(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    if finish:
        deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("name", ["demo", "metaspace"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_add_up_to_decode(name: str, chunk: int, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    prompt = tok.encode("Prompt: say hello", add_special_tokens=False)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok, deltas = _stream(tok, prompt, ids, SamplingParams(), chunk)
        assert "".join(deltas) == detok.output_text
        # The stream continues the prompt: a leading "▁" piece decodes as a space here.
        assert tok.decode(prompt + ids) == tok.decode(prompt) + detok.output_text
        assert not any("\ufffd" in d for d in deltas)
        # Without a prompt the text is exactly the plain decode.
        detok, deltas = _stream(tok, [], ids, SamplingParams(), chunk)
        assert "".join(deltas) == detok.output_text == tok.decode(ids) == text


@pytest.mark.parametrize("name", ["demo", "metaspace"])
def test_multibyte_characters_come_out_whole(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    ids = tok.encode("a😀", add_special_tokens=False)
    assert len(ids) >= 3  # the emoji's four bytes span several tokens
    _, deltas = _stream(tok, [], ids, SamplingParams())
    assert [d for d in deltas if d] == ["a", "😀"]


def test_skip_special_tokens(demo: Tokenizer) -> None:
    im_end = demo.token_to_id("<|im_end|>")
    ids = demo.encode("hi", add_special_tokens=False) + [im_end] + demo.encode(" there")
    for skip in (True, False):
        detok, deltas = _stream(demo, [], ids, SamplingParams(skip_special_tokens=skip))
        assert "".join(deltas) == detok.output_text == demo.decode(ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in detok.output_text) is not skip


@pytest.mark.parametrize("chunk", [1, 100])
def test_stop_string_cuts_and_ends_stream(demo: Tokenizer, chunk: int) -> None:
    ids = demo.encode("The answer is 42. Done here.", add_special_tokens=False)
    detok, deltas = _stream(demo, [], ids, SamplingParams(stop=["42"]), chunk, finish=False)
    assert detok.stop_string == "42" and detok.finished
    assert "".join(deltas) == detok.output_text == "The answer is "
    # Tokens after the one completing the stop are ignored, now and later.
    assert demo.decode(detok.token_ids).endswith("42")
    assert len(detok.token_ids) < len(ids)
    assert detok.update(demo.encode(" more")) == "" and detok.flush() == ""
    assert detok.output_text == "The answer is "
    detok, deltas = _stream(demo, [], ids, SamplingParams(stop=["42"],
                                                         include_stop_str_in_output=True))
    assert "".join(deltas) == detok.output_text == "The answer is 42"


def test_stop_string_spanning_token_boundary(demo: Tokenizer) -> None:
    text = "quick brown foxes jumped"
    ids = demo.encode(text, add_special_tokens=False)
    ends = [len(demo.decode(ids[:i + 1])) for i in range(len(ids))]
    # A boundary with at least two chars on each side inside neighbouring tokens.
    k = next(i for i in range(1, len(ids))
             if ends[i - 1] - (ends[i - 2] if i > 1 else 0) >= 2 and ends[i] - ends[i - 1] >= 2)
    stop = text[ends[k - 1] - 2:ends[k - 1] + 2]
    assert text.find(stop) == ends[k - 1] - 2
    detok, deltas = _stream(demo, [], ids, SamplingParams(stop=[stop]), finish=False)
    assert detok.stop_string == stop
    assert "".join(deltas) == detok.output_text == text[:ends[k - 1] - 2]
    assert len(detok.token_ids) == k + 1
    # Before the stop completed, its first half was held back rather than released.
    assert "".join(deltas[:k]) == text[:ends[k - 1] - 2]


@pytest.mark.parametrize("stops", [["goodbye", "world", "o wo"], ["o wo", "world", "goodbye"]])
def test_earliest_stop_wins(demo: Tokenizer, stops: list[str]) -> None:
    ids = demo.encode("hello world, goodbye world", add_special_tokens=False)
    for chunk in (1, len(ids)):
        detok, deltas = _stream(demo, [], ids, SamplingParams(stop=stops), chunk)
        assert detok.stop_string == "o wo"
        assert "".join(deltas) == detok.output_text == "hell"


def test_hold_back_only_possible_stop_prefixes(demo: Tokenizer) -> None:
    ids = demo.encode("hello wor", add_special_tokens=False)
    detok, deltas = _stream(demo, [], ids, SamplingParams(stop=["world!"]), finish=False)
    assert "".join(deltas) == "hello " and detok.output_text == "hello wor"
    assert detok.flush() == "wor" and detok.stop_string is None
    detok, deltas = _stream(demo, [], ids, SamplingParams(stop=["xyz"]), finish=False)
    assert "".join(deltas) == "hello wor"


def test_min_tokens_delays_stop_strings(demo: Tokenizer) -> None:
    ids = demo.encode("stop here, then stop again", add_special_tokens=False)
    n_first = len(demo.encode("stop", add_special_tokens=False))
    detok, _ = _stream(demo, [], ids, SamplingParams(stop=["stop"]))
    assert detok.output_text == ""
    detok, deltas = _stream(demo, [], ids, SamplingParams(stop=["stop"], min_tokens=n_first + 1))
    assert detok.stop_string == "stop"
    assert "".join(deltas) == detok.output_text == "stop here, then "


def test_flush_emits_incomplete_tail_like_decode(demo: Tokenizer) -> None:
    ids = demo.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok, deltas = _stream(demo, [], ids, SamplingParams())
    assert "".join(deltas) == detok.output_text == demo.decode(ids)
    assert detok.output_text.startswith("ok ") and detok.output_text.endswith("\ufffd")


def test_detokenize_false_tracks_tokens_only(demo: Tokenizer) -> None:
    ids = demo.encode("some text", add_special_tokens=False)
    detok, deltas = _stream(demo, [], ids, SamplingParams(detokenize=False, stop=["text"]))
    assert deltas == [""] * len(deltas) and detok.output_text == ""
    assert detok.token_ids == ids and detok.stop_string is None


def test_random_token_streams_round_trip(demo: Tokenizer) -> None:
    rng = random.Random(0)
    for trial in range(200):
        # Mostly single-byte tokens, so many sequences are broken or split UTF-8.
        high = 261 if trial % 2 else demo.vocab_size
        ids = [rng.randrange(5, high) for _ in range(rng.randint(1, 24))]
        prompt = [rng.randrange(0, demo.vocab_size) for _ in range(rng.randint(0, 8))]
        detok = IncrementalDetokenizer(demo, prompt, SamplingParams())
        out, i = "", 0
        while i < len(ids):
            step = rng.randint(1, 4)
            out += detok.update(ids[i:i + step])
            i += step
        out += detok.flush()
        assert out == detok.output_text == demo.decode(ids), (prompt, ids)



class _PrefixUnstableDecoder:
    """Upper-cases any text of two or more tokens: decoding more tokens rewrites earlier text."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        text = "".join(tokens)
        return [text.upper() if len(tokens) >= 2 else text]


def test_recovers_from_prefix_unstable_decoder() -> None:
    backend = BackendTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate("abcdefg ")},
                                                unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Decoder.custom(_PrefixUnstableDecoder())
    tok = Tokenizer(backend)
    ids = backend.encode("abc defg").ids
    for prompt in ([], backend.encode("gg").ids):
        # DecodeStream raises "Invalid prefix" here; the detokenizer restarts it and goes on.
        detok, deltas = _stream(tok, prompt, ids, SamplingParams(), chunk=1)
        assert "".join(deltas) == detok.output_text
        assert detok.output_text.lower() == "abc defg"

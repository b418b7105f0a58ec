"""`Tokenizer`: a torch-free stand-in for transformers' `AutoTokenizer` (fast tokenizers only).

`transformers.AutoTokenizer` imports torch, which the frontend must not load, so this module reads a
checkpoint's tokenizer files itself and wraps `tokenizers.Tokenizer`:

    tokenizer.json              the Rust tokenizer (model, pre-tokenizer, decoder, post-processor)
    tokenizer_config.json       named special tokens, added tokens, chat_template (a string or a
                                list of named templates), clean_up_tokenization_spaces
    special_tokens_map.json     older home of the special tokens (read, and winning, only when
                                the config has no added_tokens_decoder, as in transformers)
    chat_template.jinja         the chat template (wins over the other two places)
    chat_template.json          {"chat_template": ...}, the format before chat_template.jinja
    additional_chat_templates/  named templates, one `<name>.jinja` each

BOS/EOS come only from tokenizer.json's post-processor: like transformers 5, we ignore the config's
`add_bos_token` / `add_eos_token` whenever a tokenizer.json exists (and we always need one).

Chat templates render in a sandboxed jinja2 environment set up like transformers' (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that keeps non-ASCII, `strftime_now`,
a no-op `{% generation %}` tag), so a template renders the same text here as there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

# Named special tokens in transformers' order (`all_special_ids` lists them in this order).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
# Appended to the final message's content so the rendered text can be cut right after it.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class Tokenizer:
    """Encode/decode text and render chat templates without transformers or torch."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        extra_special_tokens: list[str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        # Only the names in SPECIAL_TOKEN_NAMES that are set; these are also template variables.
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.extra_special_tokens = list(extra_special_tokens or [])
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._name_or_path = name_or_path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer files of a local checkpoint directory."""
        root = Path(path)
        backend = BackendTokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        special = {name: _token_str(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        extra = _extra_special_tokens(config)
        if "added_tokens_decoder" not in config:
            # Legacy checkpoints: transformers lets special_tokens_map.json override the config.
            legacy = _read_json(root / "special_tokens_map.json")
            special.update((n, _token_str(legacy[n])) for n in SPECIAL_TOKEN_NAMES if n in legacy)
            extra += [t for t in _extra_special_tokens(legacy) if t not in extra]
        _add_missing_tokens(backend, config, special, extra)
        return cls(
            backend,
            special_tokens=special,
            extra_special_tokens=extra,
            chat_template=_load_chat_template(root, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name_or_path=str(path),
        )

    # ------------------------------------------------------------------ properties

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens then the extra ones, without duplicates."""
        tokens = [self.special_tokens[n] for n in SPECIAL_TOKEN_NAMES if n in self.special_tokens]
        return list(dict.fromkeys(tokens + self.extra_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self.backend.token_to_id(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; the post-processor adds BOS/EOS when `add_special_tokens`."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (incomplete UTF-8 sequences come out as U+FFFD)."""
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers skips this cleanup for BPE models too: it would eat real spaces there.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        """Vocabulary strings of `ids` (None for an id outside the vocabulary)."""
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string, or None."""
        return self.backend.token_to_id(token)

    # ------------------------------------------------------------------ chat templates

    def get_chat_template(
        self, chat_template: str | None = None, tools: list[Any] | None = None
    ) -> str:
        """The template text: `chat_template` itself, a template name, or the tokenizer's own."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None:
                return own.get(chat_template, chat_template)
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ValueError(
                f"The tokenizer has several chat templates and none named 'default'; pass one of "
                f"{sorted(own)} as chat_template."
            )
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ValueError(
                f"The tokenizer of '{self._name_or_path}' has no chat template: pass one "
                "(--chat-template) or use the completions API."
            )
        return own

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` to the prompt text (not tokenized)."""
        source = self.get_chat_template(chat_template, tools)
        if not messages:
            raise ValueError("Cannot apply a chat template to an empty list of messages.")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are exclusive.")
        # Like transformers: drop None-valued keys, since templates test `'key' in message`.
        chat = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
        if continue_final_message:
            _tag_final_message(chat)
        variables = {**self.special_tokens, "documents": None, **_plain(template_kwargs)}
        try:
            rendered = _compile(source).render(
                messages=chat, tools=_plain(tools), add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as e:  # template bugs and bad messages alike are the request's fault
            raise ValueError(f"Chat template error: {type(e).__name__}: {e}") from e
        if continue_final_message:
            rendered = _cut_at_tag(rendered)
        return rendered


# ---------------------------------------------------------------------- loading helpers


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    # Special tokens are stored either as strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _extra_special_tokens(config: dict[str, Any]) -> list[str]:
    raw = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(raw, dict):  # model-specific named tokens, e.g. {"image_token": "<image>"}
        raw = list(raw.values())
    return [t for t in (_token_str(v) for v in raw) if t is not None]


def _add_missing_tokens(
    backend: BackendTokenizer, config: dict[str, Any], special: dict[str, str | None],
    extra: list[str],
) -> None:
    """Add to the backend the added/special tokens the config names but tokenizer.json lacks."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    new: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder", {})
    for spec in (decoder[key] for key in sorted(decoder, key=int)):
        if spec["content"] not in known:
            new.append(AddedToken(
                spec["content"], single_word=spec.get("single_word", False),
                lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                normalized=spec.get("normalized", True), special=spec.get("special", False),
            ))
            known.add(spec["content"])
    for token in [t for t in special.values() if t is not None] + extra:
        if token not in known:
            new.append(AddedToken(token, special=True, normalized=False))
            known.add(token)
    if new:
        backend.add_tokens(new)


def _load_chat_template(root: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The default template, or a name -> template dict when several are named."""
    template: Any = None
    if (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    elif (root / "chat_template.json").is_file():
        template = _read_json(root / "chat_template.json").get("chat_template")
    else:
        template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        named = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))}
        if isinstance(template, str):
            named["default"] = template
        elif isinstance(template, dict):
            named.update(template)
        template = named or None
    return template


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------- template rendering


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types, so templates see no objects with callable methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    # Subclasses (enums, ...) are cut back to the base type and lose their extra methods.
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    return str(value)


def _tag_final_message(chat: list[dict[str, Any]]) -> None:
    """Mark where the final message's text ends, so rendering can stop there."""
    content = chat[-1].get("content")
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_TAG
        return
    for part in reversed(content or []):
        if isinstance(part, dict) and "text" in part:
            part["text"] += _CONTINUE_TAG
            return
    raise ValueError("continue_final_message is set but the final message has no text content.")


def _cut_at_tag(rendered: str) -> str:
    at = rendered.rfind(_CONTINUE_TAG.strip())
    if at < 0:
        raise ValueError("continue_final_message: the template dropped the final message's text.")
    # A template that strips the message loses the tag's trailing space: strip ours too.
    keeps_space = rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG
    return rendered[:at] if keeps_space else rendered[:at].rstrip()


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (used for training masks)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace that refuses underscore names (no route to CPython internals)."""

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attr_name(name)
        super().__setitem__(name, value)


def _namespace(*args: Any, **kwargs: Any) -> _Namespace:
    for name in dict(*args, **kwargs):
        _check_attr_name(name)
    return _Namespace(*args, **kwargs)


def _check_attr_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_namespace, dict=_make_dict)
    return env.from_string(source)

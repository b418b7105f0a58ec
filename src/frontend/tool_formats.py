"""Scanning tool-call text: JSON call objects, Python call lists, Qwen's XML, and the parsers of
forced tool choice (a named function, `required`).

Every scanner works on a possibly cut-off text and reports how far it got, so one function serves
the complete reply and the stream (see `frontend/tools.py` for the stability contract). Arguments
of JSON calls are the raw text of the model's arguments object, so a streamed prefix is always a
prefix of the final arguments; formats whose arguments are converted (Python, XML) send one
argument at a time: `json.dumps(done_so_far)` without its closing brace.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

_WS = " \t\r\n"
_OPENERS, _CLOSERS = "{[(", "}])"
_SCALAR_END = ",;}]) \t\r\n"
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_KWARG = re.compile(r"\s*[A-Za-z_]\w*\s*=")
_JSON_NAMES = {"true": True, "false": False, "null": None}
_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>")
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text; while `done` is False, a prefix of the final text
    done: bool = True


@dataclass
class ToolParse:
    content: str  # the text outside tool calls
    calls: list[ParsedCall]


# ---------------------------------------------------------------------- low-level scanning


def skip_ws(text: str, i: int) -> int:
    """Index of the first non-whitespace character at or after i."""
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def hold_back(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (may become it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def string_end(text: str, i: int) -> int | None:
    """text[i] is a quote: the index after its closing quote, None while unterminated."""
    quote, i = text[i], i + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == quote:
            return i + 1
        else:
            i += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """End of the JSON (or Python literal) value starting at text[i]; None while incomplete.

    Brackets are only counted, not matched by kind: validation is json.loads' (or ast's) job
    once the value is complete.
    """
    if text[i] in "\"'":
        return string_end(text, i)
    if text[i] not in _OPENERS:
        j = i
        while j < len(text) and text[j] not in _SCALAR_END:
            j += 1
        return j if j < len(text) else None  # a number may still grow
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            end = string_end(text, i)
            if end is None:
                return None
            i = end
            continue
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def object_members(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """text[i] is '{': key -> (value start, value end or None), and the index after the '}'
    (None while open). ValueError where the text cannot be a JSON object."""
    members: dict[str, tuple[int, int | None]] = {}
    i = skip_ws(text, i + 1)
    while i < len(text):
        if text[i] == "}":
            return members, i + 1
        if text[i] != '"':
            raise ValueError(f"expected a key at {i}")
        key_start, key_end = i, string_end(text, i)
        if key_end is None:
            break
        i = skip_ws(text, key_end)
        if i >= len(text):
            break
        if text[i] != ":":
            raise ValueError(f"expected ':' at {i}")
        start = skip_ws(text, i + 1)
        if start >= len(text):
            break
        end = value_end(text, start)
        members[json.loads(text[key_start:key_end])] = (start, end)
        if end is None:
            break
        i = skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = skip_ws(text, i + 1)
        elif i < len(text) and text[i] != "}":
            raise ValueError(f"expected ',' or '}}' at {i}")
    return members, None


# ---------------------------------------------------------------------- JSON calls


def json_args(text: str, start: int) -> tuple[str, int | None]:
    """The arguments value at text[start]: (its stable text so far, its end or None)."""
    if start >= len(text):
        return "", None
    end = value_end(text, start)
    if end is None:  # only an object's raw text is a safe prefix; wait for anything else
        return (text[start:] if text[start] == "{" else ""), None
    value = json.loads(text[start:end])
    return (value if isinstance(value, str) else text[start:end]), end


def json_call(text: str, start: int) -> tuple[ParsedCall | None, int | None]:
    """One `{"name": ..., "arguments"|"parameters": ...}` object: (the call once its name is
    known, the index after the object or None)."""
    members, end = object_members(text, start)
    name = None
    if (span := members.get("name")) is not None and span[1] is not None:
        name = json.loads(text[span[0]:span[1]])
        if not isinstance(name, str):
            raise ValueError("tool name is not a string")
    key = next((k for k in ("arguments", "parameters") if k in members), None)
    if key is not None:
        args, args_end = json_args(text, members[key][0])
    else:
        args, args_end = ("{}", end) if end is not None else ("", None)
    if end is not None:
        json.loads(text[start:end])  # the object as a whole must be JSON
        if name is None:
            raise ValueError("tool call without a name")
    if name is None:
        return None, end
    return ParsedCall(name, args, done=args_end is not None and end is not None), end


def json_call_list(text: str, start: int, sep: str) -> tuple[list[ParsedCall], int | None]:
    """Calls from text[start]: a JSON array of call objects, or objects joined by `sep` ("" for
    one object). Returns the calls and the index after the last one (None while open)."""
    calls: list[ParsedCall] = []
    if start >= len(text):
        return calls, None
    array = text[start] == "["
    i = skip_ws(text, start + 1) if array else start
    if array and i < len(text) and text[i] == "]":
        return calls, i + 1
    while i < len(text):
        if text[i] != "{":
            raise ValueError(f"expected a call object at {i}")
        call, end = json_call(text, i)
        if call is not None:
            calls.append(call)
        if end is None:
            return calls, None
        i = skip_ws(text, end)
        if i >= len(text):
            return calls, None if array else end
        if array and text[i] == "]":
            return calls, i + 1
        if text[i] != ("," if array else sep or "\0"):
            if array:
                raise ValueError(f"expected ',' or ']' at {i}")
            return calls, end
        i = skip_ws(text, i + 1)
        if not array and i >= len(text):
            return calls, len(text)  # a trailing separator
    return calls, None


# ---------------------------------------------------------------------- Python calls


def python_call_list(body: str) -> tuple[list[ParsedCall], bool]:
    """`[f(a=1), g(b="x")]` from body[0] == '[': the calls and whether the list closed."""
    calls: list[ParsedCall] = []
    i = skip_ws(body, 1)
    while i < len(body):
        if body[i] == "]":
            if body[i + 1:].strip():
                raise ValueError("text after the call list")
            return calls, True
        m = _NAME.match(body, i)
        if m is None:
            raise ValueError(f"expected a function name at {i}")
        paren = skip_ws(body, m.end())
        if paren >= len(body):
            return calls, False  # the name may still grow
        if body[paren] != "(":
            raise ValueError(f"expected '(' at {paren}")
        end = value_end(body, paren)
        if end is None:
            # Commit to the call only once it shows a keyword argument (f(1) is not a call).
            if _KWARG.match(body, paren + 1):
                calls.append(ParsedCall(m[0], _partial_kwargs(body, m[0], paren), done=False))
            return calls, False
        kwargs = _kwargs(m[0] + body[paren:end])
        calls.append(ParsedCall(m[0], json.dumps(kwargs, ensure_ascii=False)))
        i = skip_ws(body, end)
        if i < len(body) and body[i] == ",":
            i = skip_ws(body, i + 1)
        elif i < len(body) and body[i] != "]":
            raise ValueError(f"expected ',' or ']' at {i}")
    return calls, False


def _kwargs(call_src: str) -> dict[str, Any]:
    node = ast.parse(call_src, mode="eval").body
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("tool calls take keyword arguments only")
    out = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError("no **kwargs in tool calls")
        out[kw.arg] = _literal(kw.value)
    try:
        json.dumps(out)
    except TypeError as e:
        raise ValueError(str(e)) from e
    return out


def _literal(node: ast.expr) -> Any:
    """A Python literal as JSON data (JSON's true/false/null accepted too)."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("no ** in tool call arguments")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)
                if k is not None}
    return ast.literal_eval(node)


def _partial_kwargs(body: str, name: str, paren: int) -> str:
    """Arguments JSON of an open call: the keyword arguments before its last top-level comma,
    without the closing brace (a prefix of the final arguments)."""
    depth, i, last_comma = 0, paren + 1, -1
    while i < len(body):
        c = body[i]
        if c in "\"'":
            end = string_end(body, i)
            if end is None:
                break
            i = end
            continue
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
        elif c == "," and depth == 0:
            last_comma = i
        i += 1
    if last_comma < 0:
        return "{"
    return json.dumps(_kwargs(name + body[paren:last_comma] + ")"), ensure_ascii=False)[:-1]


# ---------------------------------------------------------------------- Qwen XML calls


def qwen_xml_function(block: str, schemas: dict[str, dict[str, Any]],
                      closed: bool) -> ParsedCall | None:
    """The call in one `<tool_call>` block (None until its function name is complete)."""
    m = _XML_FUNCTION.search(block)
    if m is None:
        return None
    name = m[1].strip()
    properties = schemas.get(name, {}).get("properties") or {}
    args = {key.strip(): _xml_value(value, properties.get(key.strip()))
            for key, value in _XML_PARAMETER.findall(block, m.end())}
    done = closed or "</function>" in block
    text = json.dumps(args, ensure_ascii=False)
    return ParsedCall(name, text if done else text[:-1], done)


def _xml_value(raw: str, schema: Any) -> Any:
    """A parameter's text as its schema's type (one newline each side is layout)."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    kind = schema.get("type") if isinstance(schema, dict) else None
    kinds = kind if isinstance(kind, list) else [kind]
    if kind is None or "string" in kinds:
        return value
    text = value.strip()
    if "boolean" in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except ValueError:
        return value


# ---------------------------------------------------------------------- forced tool choice


class NamedToolParser:
    """`tool_choice` names a function: the whole reply (held to its parameter schema by a
    grammar) is the arguments of one call, even when cut short by max_tokens."""

    markers: tuple[str, ...] = ()

    def __init__(self, name: str, call_id: Any):
        self.name = name
        self.call_id = call_id

    def parse(self, text: str, final: bool) -> ToolParse:
        args = text.strip() if final else text.lstrip().rstrip(_WS)
        return ToolParse("", [ParsedCall(self.name, args, final)])


class RequiredToolParser:
    """`tool_choice="required"`: the reply is a JSON array of `{"name", "parameters"}`."""

    markers: tuple[str, ...] = ()

    def __init__(self, call_id: Any):
        self.call_id = call_id

    def parse(self, text: str, final: bool) -> ToolParse:
        start = skip_ws(text, 0)
        try:
            calls, end = json_call_list(text, start, "")
            if final and (end is None or text[end:].strip() or not calls):
                raise ValueError("not a complete list of calls")
        except (ValueError, IndexError):
            return ToolParse(text, []) if final else ToolParse("", [])
        return ToolParse("", calls)

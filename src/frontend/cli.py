"""The `python -m frontend serve` command line, generated from the config structs.

`ServerConfig` (defined here: the HTTP settings the launcher hands every API server) and the
sub-structs of `EngineConfig` (`ModelConfig`, `CacheConfig`, `SchedulerConfig`, `ParallelConfig`,
`LoRAConfig`)
are the single source of the flags. Every field becomes a vLLM-style flag (`max_num_seqs` ->
`--max-num-seqs`); booleans get a `--no-` twin, `Literal` fields get choices, and the field's
trailing comment (or the comment lines just above it) becomes the help text. Engine flags default
to None, so only what the user set reaches `EngineConfig.create`, whose struct defaults fill the
rest.
`--structured-outputs-config` and `--speculative-config` are the hand-written flags: vLLM's JSON
forms (`'{"backend": "guidance", "disable_any_whitespace": true}'`,
`'{"method": "ngram", "num_speculative_tokens": 3}'`) of `StructuredOutputsConfig` and
`SpeculativeConfig`.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
from typing import Any

import msgspec

from enginecore.config import (
    CacheConfig,
    LoRAConfig,
    ModelConfig,
    MultiModalConfig,
    ParallelConfig,
    SchedulerConfig,
)
from frontend.lora import load_lora_resolver_plugin, parse_lora_modules
from frontend.reasoning import get_reasoning_parser
from frontend.tools import get_tool_parser, load_tool_parser_plugin

logger = logging.getLogger(__name__)


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """HTTP settings of the API servers (the `serve` flags that are not engine flags)."""

    host: str = "0.0.0.0"  # address to listen on
    port: int = 8000  # 0: any free port (the launcher logs the one it got)
    api_server_count: int = 1  # API server processes sharing the listening socket
    api_key: str | None = None  # clients must send `Authorization: Bearer KEY` on /v1/*
    served_model_name: list[str] = []  # model names clients may use (default: the model path)
    chat_template: str | None = None  # jinja file or inline template replacing the tokenizer's
    enable_log_requests: bool = False  # log each request's prompt and sampling parameters
    max_log_len: int | None = None  # prompt characters / token ids logged per request
    timeout_keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    # seconds a client may take to send its request body (slow senders get 408)
    request_body_timeout: float = 30.0
    # let the model call tools on its own (tool_choice "auto"); needs --tool-call-parser
    enable_auto_tool_choice: bool = False
    # format of tool calls in the output: hermes, llama3_json, mistral, pythonic, qwen3_xml, or
    # one a --tool-parser-plugin registers
    tool_call_parser: str | None = None
    # a .py file (or module name) whose import registers tool parsers (register_tool_parser)
    tool_parser_plugin: str | None = None
    # with tool_choice "none", leave the tool definitions out of the prompt
    exclude_tools_when_tool_choice_none: bool = False
    # split replies into reasoning and content: deepseek_r1, qwen3, think
    reasoning_parser: str | None = None
    # LoRA adapters to serve, each name=path or JSON {"name", "path", "base_model_name"}
    lora_modules: list[str] = []
    # a .py file (or module name) whose import registers LoRA resolvers (register_lora_resolver)
    lora_resolver_plugin: str | None = None
    # multi-node data parallel: run only this node's engine cores (ranks from
    # --data-parallel-start-rank), registered with the head at --data-parallel-address; no API
    # server, no HTTP port
    headless: bool = False

    def validate(self) -> None:
        """Raise ValueError naming a bad field."""
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_server_count < 1:
            raise ValueError(f"api_server_count must be >= 1, got {self.api_server_count}")
        if self.tool_parser_plugin is not None:
            load_tool_parser_plugin(self.tool_parser_plugin)
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)
        elif self.enable_auto_tool_choice:
            raise ValueError("enable_auto_tool_choice needs --tool-call-parser")
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)
        parse_lora_modules(self.lora_modules, "")  # syntax only; files are checked at start
        if self.lora_resolver_plugin is not None:
            load_lora_resolver_plugin(self.lora_resolver_plugin)


ENGINE_STRUCTS: tuple[type[msgspec.Struct], ...] = (
    ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, MultiModalConfig, LoRAConfig)
# Filled from the checkpoint (or positional), never flags.
_NOT_FLAGS = {"model", "architecture", "vocab_size", "eos_token_ids", "hidden_size"}
# vLLM's flag names where they differ from the field name.
_FLAG_NAMES = {
    "policy": ["--scheduling-policy"],
    "tensor_parallel_size": ["--tensor-parallel-size", "-tp"],
    "data_parallel_size": ["--data-parallel-size", "-dp"],
    "data_parallel_size_local": ["--data-parallel-size-local", "-dpl"],
    "data_parallel_address": ["--data-parallel-address", "-dpa"],
    "data_parallel_rpc_port": ["--data-parallel-rpc-port", "-dpp"],
    "data_parallel_start_rank": ["--data-parallel-start-rank", "-dpr"],
}
_FIELD_LINE = re.compile(r"\s+(\w+):[^#]*(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"\s+#\s*(.*)$")


def field_comments(struct: type) -> dict[str, str]:
    """Field name -> its comment in the struct's source (trailing, else the lines above)."""
    try:
        source = inspect.getsource(struct)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines()[1:]:
        if m := _COMMENT_LINE.match(line):
            above.append(m[1])
        elif m := _FIELD_LINE.match(line):
            text = m[2] or " ".join(above)
            if text:
                comments[m[1]] = text
            above = []
        else:
            above = []
    return comments


def _add_struct_flags(group: argparse._ArgumentGroup, struct: type[msgspec.Struct],
                      engine: bool) -> list[str]:
    """Add one flag per field of `struct`; return the dests added."""
    helps = field_comments(struct)
    dests = []
    for f in msgspec.inspect.type_info(struct).fields:
        if f.name in _NOT_FLAGS:
            continue
        kind = f.type
        if isinstance(kind, msgspec.inspect.UnionType):  # `X | None`
            kind = next(t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType))
        default = None if f.default is msgspec.NODEFAULT else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "default": None if engine else default}
        text = helps.get(f.name, "")
        if "default" not in text:
            text = f"{text} (default: {default})" if text else f"default: {default}"
        kwargs["help"] = text
        if isinstance(kind, msgspec.inspect.BoolType):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(kind, msgspec.inspect.LiteralType):
            kwargs["choices"] = list(kind.values)
        elif isinstance(kind, msgspec.inspect.ListType):
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = {msgspec.inspect.IntType: int,
                              msgspec.inspect.FloatType: float}.get(type(kind), str)
        flags = _FLAG_NAMES.get(f.name, ["--" + f.name.replace("_", "-")])
        group.add_argument(*flags, **kwargs)
        dests.append(f.name)
    return dests


def build_parser() -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    """The `serve` parser plus the dests of its engine flags and of its server flags."""
    parser = argparse.ArgumentParser(
        prog="python -m frontend serve",
        description="Serve a model with an OpenAI-compatible HTTP API.")
    parser.add_argument("model", nargs="?", default=None,
                        help="HF checkpoint directory (default: the bundled demo model, built "
                             "once into the cache directory)")
    engine_dests: list[str] = []
    for struct in ENGINE_STRUCTS:
        group = parser.add_argument_group(struct.__name__)
        engine_dests += _add_struct_flags(group, struct, engine=True)
    parser.add_argument(
        "--structured-outputs-config", default=None, metavar="JSON",
        help='structured outputs settings as JSON: {"backend": "auto" | "guidance", '
             '"disable_any_whitespace": bool, "disable_additional_properties": bool}')
    parser.add_argument(
        "--speculative-config", default=None, metavar="JSON",
        help='speculative decoding as JSON: {"method": "ngram" | "draft_model" | "eagle" | '
             '"eagle3" | "mtp", "num_speculative_tokens": int, "model": path, '
             '"prompt_lookup_min": int, "prompt_lookup_max": int}')
    # vLLM's older separate flags: still accepted, folded into --speculative-config.
    parser.add_argument("--speculative-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument(
        "--kv-transfer-config", default=None, metavar="JSON",
        help='disaggregated prefill, as JSON: {"kv_connector": "SharedMemoryConnector" | '
             '"NixlConnector", "kv_role": "kv_producer" | "kv_consumer" | "kv_both", '
             '"kv_connector_extra_config": {"shm_path": DIR}}; NixlConnector also takes '
             '"side_channel_host", "side_channel_port", "engine_id", "abort_request_timeout" '
             '(docs/parallelism.md)')
    server_group = parser.add_argument_group("ServerConfig")
    server_dests = _add_struct_flags(server_group, ServerConfig, engine=False)
    return parser, engine_dests, server_dests


def parse_serve_args(argv: list[str]) -> tuple[str | None, dict[str, Any], ServerConfig]:
    """argv (after `serve`) -> (model or None, engine kwargs that were set, ServerConfig)."""
    parser, engine_dests, server_dests = build_parser()
    args = parser.parse_args(argv)
    engine_kwargs = {d: getattr(args, d) for d in engine_dests if getattr(args, d) is not None}
    if args.structured_outputs_config is not None:
        engine_kwargs["structured_outputs_config"] = args.structured_outputs_config
    if args.speculative_config is not None:
        engine_kwargs["speculative_config"] = args.speculative_config
    elif args.speculative_model is not None or args.num_speculative_tokens is not None:
        logger.warning("--speculative-model / --num-speculative-tokens are deprecated: use "
                       "--speculative-config '{\"model\": ..., \"num_speculative_tokens\": "
                       "...}'")
        engine_kwargs["speculative_config"] = {
            "model": args.speculative_model,
            "num_speculative_tokens": args.num_speculative_tokens or 0}
    if args.kv_transfer_config is not None:
        engine_kwargs["kv_transfer_config"] = args.kv_transfer_config
    try:
        server = ServerConfig(**{d: v for d in server_dests if (v := getattr(args, d)) is not None})
        server.validate()
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return args.model, engine_kwargs, server

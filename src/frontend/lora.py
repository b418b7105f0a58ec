"""LoRA on the API side: `LoRARequest`, served adapters, runtime load/unload and resolvers.

    LLM.generate(prompts, params, lora_request=LoRARequest("sql", 1, "/adapters/sql"))
    python -m frontend serve MODEL --enable-lora --lora-modules sql=/adapters/sql \\
        '{"name": "chat", "path": "/adapters/chat", "base_model_name": "MODEL"}'

A request names its adapter in the OpenAI `model` field. `LoRAModels` maps names to adapters:
the `--lora-modules` given at start, adapters loaded at runtime (`/v1/load_lora_adapter`,
only with TLS_ALLOW_RUNTIME_LORA_UPDATING=1) and adapters that a resolver finds for an unknown
name (same switch). Resolvers form a small registry (`register_lora_resolver`, called by a module
that `--lora-resolver-plugin` imports); the built-in filesystem resolver serves
`$TLS_LORA_RESOLVER_CACHE_DIR/<name>/` when that variable is set.

Adapters are checked here, without torch (`enginecore.lora_adapter.inspect_lora_adapter`: files,
rank <= max_lora_rank, supported modules, shapes against the base model), so a bad adapter is a
400 for its request, never a worker failure. Workers load an adapter from its path on first use.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from enginecore.config import EngineConfig, Env
from enginecore.lora_adapter import inspect_lora_adapter
from enginecore.protocol import LoRARef
from frontend.registry import import_plugin


class LoadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    """Body of POST /v1/load_lora_adapter."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    """Body of POST /v1/unload_lora_adapter."""

    lora_name: str
    lora_int_id: int | None = None


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for one request (vLLM's): a name, a globally unique id and a PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")

    def to_ref(self) -> LoRARef:
        """The engine's reference to this adapter."""
        return LoRARef(name=self.lora_name, int_id=self.lora_int_id, path=self.lora_path)


def lora_int_id(name: str, path: str) -> int:
    """A stable id for an adapter the server names (the same in every API-server process)."""
    return 1 + zlib.crc32(f"{name}\0{path}".encode()) + (1 << 32)


def parse_lora_modules(specs: list[str], base_model: str) -> list[LoRARequest]:
    """`--lora-modules` values (`name=path` or JSON {"name", "path", "base_model_name"})."""
    out = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                item = json.loads(spec)
                name, path = item["name"], item["path"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"lora_modules: bad JSON entry {spec!r}: {e!r}") from None
            base = item.get("base_model_name") or base_model
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules: expected name=path or JSON, got {spec!r}")
            base = base_model
        out.append(LoRARequest(name, lora_int_id(name, path), path, base))
    return out


class LoRAResolver(Protocol):
    """Finds an adapter for a model name nobody loaded (vLLM's LoRA resolver plugins)."""

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The adapter named `lora_name`, or None if this resolver does not know it."""
        ...


class FilesystemResolver:
    """Serves `<root>/<lora_name>/` when that directory holds an adapter_config.json."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        path = self.root / lora_name
        if "/" in lora_name or lora_name.startswith(".") or \
                not (path / "adapter_config.json").is_file():
            return None
        return LoRARequest(lora_name, lora_int_id(lora_name, str(path)), str(path),
                           base_model_name)


_RESOLVERS: dict[str, LoRAResolver] = {}


def register_lora_resolver(name: str, resolver: LoRAResolver) -> None:
    """Add a resolver; resolvers are tried in registration order until one finds the adapter."""
    _RESOLVERS[name] = resolver


def load_lora_resolver_plugin(path: str) -> None:
    """Import a user module (a .py file or a dotted module name) that calls
    `register_lora_resolver` (`--lora-resolver-plugin`)."""
    import_plugin(path, "lora_resolver_plugin")


def lora_resolvers() -> list[LoRAResolver]:
    """The registered resolvers, with the filesystem one first when its directory is set."""
    built_in = [FilesystemResolver(Env.LORA_RESOLVER_CACHE_DIR)] \
        if Env.LORA_RESOLVER_CACHE_DIR else []
    return built_in + list(_RESOLVERS.values())


class LoRANotFound(LookupError):
    """No adapter of that name is served (HTTP 404)."""


class LoRAModels:
    """The adapters one API server serves, by name (vLLM's OpenAIServingModels, LoRA part)."""

    def __init__(self, config: EngineConfig, base_model_name: str,
                 modules: list[LoRARequest]) -> None:
        self.config = config
        self.base_model_name = base_model_name
        self.adapters: dict[str, LoRARequest] = {}
        for module in modules:
            self.add(module)

    @property
    def runtime_updates(self) -> bool:
        """Whether load/unload endpoints and resolvers are on (TLS_ALLOW_RUNTIME_LORA_UPDATING)."""
        return Env.ALLOW_RUNTIME_LORA_UPDATING and self.config.lora.enable_lora

    def check(self, lora: LoRARequest) -> None:
        """ValueError when the engine cannot serve this adapter."""
        if not self.config.lora.enable_lora:
            raise ValueError("lora_request: LoRA is not enabled (start with --enable-lora)")
        inspect_lora_adapter(lora.lora_path, self.config.lora.max_lora_rank,
                             self.config.model.model)

    def add(self, lora: LoRARequest) -> None:
        """Serve `lora` under its name (checked first); ValueError if the name is taken."""
        if lora.lora_name in self.adapters:
            raise ValueError(f"lora_name: the LoRA adapter '{lora.lora_name}' has already been "
                             "loaded")
        self.check(lora)
        self.adapters[lora.lora_name] = lora

    def remove(self, name: str) -> LoRARequest:
        """Stop serving `name`; LoRANotFound if it is not served."""
        if name not in self.adapters:
            raise LoRANotFound(f"The lora adapter '{name}' cannot be found.")
        return self.adapters.pop(name)

    async def lookup(self, name: str) -> LoRARequest | None:
        """The adapter served as `name`, asking the resolvers (and keeping what they find) when
        runtime updates are on; None if nobody knows it."""
        if name in self.adapters:
            return self.adapters[name]
        if not self.runtime_updates:
            return None
        for resolver in lora_resolvers():
            found = await resolver.resolve_lora(self.base_model_name, name)
            if found is not None:
                self.add(found)
                return found
        return None

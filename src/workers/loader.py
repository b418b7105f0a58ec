"""Fill a model's parameters from an HF safetensors checkpoint (single file or sharded + index).

Each checkpoint tensor goes through its parameter's `weight_loader`. Names of packed projections
are rewritten with the model's `packed_modules_mapping` (e.g. `...self_attn.k_proj.weight` ->
`...self_attn.qkv_proj.weight`, shard "k"; shard None renames a module). Per-expert tensors of
a mixture-of-experts block (`...experts.{e}.gate_proj.weight`) go to the block's stacked
parameter named by the model's `expert_weights_mapping` (`...experts.w13_weight`, shard
(e, 0)). Every parameter (every shard of a packed one, every expert of a stacked one) must be
loaded exactly once, and every checkpoint tensor must land somewhere: a mismatch means the wrong
architecture or a broken checkpoint, and fails loudly here rather than as garbage tokens later.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when there is one."""
    path = Path(model_dir)
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}")
    return files


def iter_checkpoint(model_dir: str | Path, keep: Callable[[str], bool] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint (those `keep` accepts: the others are
    never read), one file open at a time."""
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if keep is None or keep(name):
                    yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: str | Path,
                 rename: Callable[[str], str | None] | None = None) -> None:
    """Copy every checkpoint tensor into `model`; raise on a missing or unexpected tensor.

    `rename` maps a checkpoint name to the model's name, or to None to skip the tensor (a
    module loading one part of a checkpoint, e.g. the MTP layers of a target)."""
    mapping: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    experts: dict[str, tuple[str, object]] = getattr(model, "expert_weights_mapping", {})
    ignored: set[str] = getattr(model, "ignored_weights", set())
    ignored_prefixes: tuple[str, ...] = getattr(model, "ignored_weight_prefixes", ())
    params = dict(model.named_parameters())
    expected = _expected_shards(params, mapping)
    loaded: dict[str, set[object]] = {name: set() for name in params}

    def wanted(name: str) -> bool:  # skipped tensors are never read from disk
        return (rename is None or rename(name) is not None) and \
            not name.startswith(ignored_prefixes)  # e.g. a target's MTP layers

    for ckpt_name, tensor in iter_checkpoint(model_dir, wanted):
        if rename is not None:
            ckpt_name = rename(ckpt_name)
            assert ckpt_name is not None
        if ckpt_name.endswith("rotary_emb.inv_freq") or ckpt_name in ignored:
            continue  # recomputed by the model / a duplicate of a tied weight
        name, shard = _target(ckpt_name, mapping, experts)
        if name not in params:
            raise KeyError(f"unexpected tensor {ckpt_name!r} in checkpoint {str(model_dir)!r}")
        if shard in loaded[name]:
            raise KeyError(f"tensor {ckpt_name!r} appears twice in the checkpoint")
        param = params[name]
        try:
            if shard is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"cannot load {ckpt_name!r}: {e}") from e
        loaded[name].add(shard)
    # `optional` parameters (FP8 KV-cache scales) may be absent from a checkpoint.
    missing = [f"{name} {sorted(map(str, expected[name] - got))}" if expected[name] != {None}
               else name for name, got in loaded.items() if got != expected[name]
               and (got or not getattr(params[name], "optional", False))]
    if missing:
        raise KeyError(f"checkpoint {str(model_dir)!r} is missing tensors for: "
                       + ", ".join(missing))


def _target(ckpt_name: str, mapping: dict[str, tuple[str, object]],
            experts: dict[str, tuple[str, object]]) -> tuple[str, object]:
    # "model.layers.0.self_attn.k_proj.weight" -> ("model.layers.0.self_attn.qkv_proj.weight", "k")
    # "model.layers.0.mlp.experts.3.up_proj.weight" -> ("model.layers.0.mlp.experts.w13_weight",
    # (3, 1)). A mapping entry with shard None is a plain rename and the scan goes on.
    parts = ckpt_name.split(".")
    for i, part in enumerate(parts):
        if (part == "experts" and len(parts) > i + 2 and parts[i + 1].isdigit()
                and parts[i + 2] in experts):
            stacked, shard = experts[parts[i + 2]]
            return ".".join([*parts[:i + 1], stacked]), (int(parts[i + 1]), shard)
        if part in mapping:
            parts[i], shard = mapping[part]
            if shard is not None:
                return ".".join(parts), shard
    return ".".join(parts), None


def _expected_shards(params: dict[str, nn.Parameter],
                     mapping: dict[str, tuple[str, object]]) -> dict[str, set[object]]:
    # A packed parameter needs every shard its mapping names, a parameter that lists its
    # `expected_shards` (stacked experts) all of those; any other parameter needs `None`.
    shards_of: dict[str, set[object]] = {}
    for packed, shard in mapping.values():
        if shard is not None:  # None: a rename, not a packed parameter
            shards_of.setdefault(packed, set()).add(shard)
    expected = {}
    for name in params:
        parts = name.split(".")
        packed = next((p for p in parts if p in shards_of), None)
        expected[name] = shards_of[packed] if packed is not None else {None}
        expected[name] = getattr(params[name], "expected_shards", expected[name])
    return expected

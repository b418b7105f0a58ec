"""Build a target / draft checkpoint pair whose draft acceptance is controlled (spec benchmark).

    target  L random decoder layers; in layers >= m the o_proj and down_proj weights are zero
            (or noise * N(0, 1) with --noise), so those layers add nothing to the residual
            stream: the output is that of the first m layers, at the compute cost of L layers
    draft   the first m layers, the same embedding, final norm and lm_head

With noise 0 the draft's greedy token is the target's (acceptance ~100%; bf16 kernels whose
results depend on the batch shape can flip near-ties) at a cost of m / L target forwards per
draft; a small --noise lowers acceptance gradually. Weights are N(0, --init-std) (norms 1),
one safetensors file per layer; the draft's files are symlinks to the target's.

    python scripts/make_spec_pair.py --preset llama-3.1-8b --draft-layers 2 --out /tmp/pair
    python scripts/make_spec_pair.py --config tiny/config.json --draft-layers 1 --out DIR \\
        --dtype float32 --device cpu --init-std 0.1

Prints the two directories as JSON ({"target": ..., "draft": ...}). Llama / Qwen2 / Qwen3
dense configs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name (within a layer) -> shape, for the Llama / Qwen2 / Qwen3 families."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    shapes = {"self_attn.q_proj.weight": (heads * d, h), "self_attn.k_proj.weight": (kv * d, h),
              "self_attn.v_proj.weight": (kv * d, h), "self_attn.o_proj.weight": (h, heads * d),
              "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
              "mlp.down_proj.weight": (h, inter), "input_layernorm.weight": (h,),
              "post_attention_layernorm.weight": (h,)}
    if arch == "Qwen2ForCausalLM" or cfg.get("attention_bias"):
        shapes.update({"self_attn.q_proj.bias": (heads * d,), "self_attn.k_proj.bias": (kv * d,),
                       "self_attn.v_proj.bias": (kv * d,)})
    if cfg.get("attention_bias") and arch != "Qwen2ForCausalLM":
        shapes["self_attn.o_proj.bias"] = (h,)
    if arch == "Qwen3ForCausalLM":
        shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    return shapes


def make_pair(cfg: dict, out: Path, draft_layers: int, noise: float = 0.0,
              init_std: float = 0.02, dtype: str = "bfloat16", device: str = "cpu",
              seed: int = 0) -> dict[str, str]:
    """Write `out`/target and `out`/draft (see the module docstring); return their paths."""
    import torch
    from safetensors.torch import save_file

    from workers.demo import build_tokenizer

    num_layers = cfg["num_hidden_layers"]
    if not 1 <= draft_layers < num_layers:
        raise ValueError(f"--draft-layers must be in [1, {num_layers}), got {draft_layers}")
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(shape: tuple[int, ...], std: float) -> torch.Tensor:
        x = torch.randn(shape, generator=gen, device=device) * std
        return x.to(torch_dtype).cpu()

    target, draft = out / "target", out / "draft"
    weight_map: dict[str, str] = {}
    files: dict[str, dict[str, torch.Tensor]] = {}
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    files["embed.safetensors"] = {"model.embed_tokens.weight": rand((vocab, h), init_std)}
    head = {"model.norm.weight": torch.ones(h, dtype=torch_dtype)}
    if not cfg.get("tie_word_embeddings"):
        head["lm_head.weight"] = rand((vocab, h), init_std)
    files["head.safetensors"] = head
    for i in range(num_layers):
        tensors = {}
        for name, shape in layer_shapes(cfg).items():
            if name.endswith(".bias"):
                tensor = torch.zeros(shape, dtype=torch_dtype)
            elif name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch_dtype)
            elif i >= draft_layers and name in ("self_attn.o_proj.weight",
                                                "mlp.down_proj.weight"):
                # A layer past m writes (almost) nothing into the residual stream.
                tensor = (rand(shape, noise) if noise > 0
                          else torch.zeros(shape, dtype=torch_dtype))
            else:
                tensor = rand(shape, init_std)
            tensors[f"model.layers.{i}.{name}"] = tensor
        files[f"layer-{i:03d}.safetensors"] = tensors
    for folder in (target, draft):
        folder.mkdir(parents=True, exist_ok=True)
        build_tokenizer(folder)
    for file, tensors in files.items():
        save_file(tensors, str(target / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    _write_config(target, cfg, num_layers, weight_map, dtype)
    draft_map = {name: file for name, file in weight_map.items()
                 if not name.startswith("model.layers.") or int(name.split(".")[2]) < draft_layers}
    for file in set(draft_map.values()):
        link = draft / file
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink((target / file).resolve(), link)
    _write_config(draft, cfg, draft_layers, draft_map, dtype)
    return {"target": str(target), "draft": str(draft)}


def _write_config(folder: Path, cfg: dict, num_layers: int, weight_map: dict[str, str],
                  dtype: str) -> None:
    config = {**cfg, "num_hidden_layers": num_layers, "dtype": dtype}
    config.pop("num_nextn_predict_layers", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a bench_throughput preset (e.g. llama-3.1-8b)")
    src.add_argument("--config", help="a config.json to take the shape from")
    ap.add_argument("--out", required=True, help="output folder (target/ and draft/ inside)")
    ap.add_argument("--draft-layers", type=int, required=True, help="m: the draft's layers")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="std of o_proj/down_proj in layers >= m (0: exactly zero)")
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cpu", help="where the random numbers are drawn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.preset:
        from bench_throughput import PRESETS

        cfg = dict(PRESETS[args.preset])
    else:
        cfg = json.loads(Path(args.config).read_text())
    paths = make_pair(cfg, Path(args.out), args.draft_layers, args.noise, args.init_std,
                      args.dtype, args.device, args.seed)
    print(json.dumps(paths))


if __name__ == "__main__":
    main()

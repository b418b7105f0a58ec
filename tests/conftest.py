"""Session fixtures shared by every test: tiny random checkpoints with the demo tokenizer."""

import os

# Triton kernels run in the interpreter unless a GPU run says otherwise; must precede any import
# of triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """arch -> directory of a tiny random fp32 checkpoint (llama, qwen2, qwen3), built once."""
    from workers.demo import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_checkpoint(root / arch, arch=arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models: dict[str, str]) -> str:
    """The tiny Qwen3 checkpoint (tied embeddings, q/k norm), the engine's default family."""
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder holding only the demo tokenizer (loads with AutoTokenizer)."""
    from workers.demo import build_tokenizer

    return build_tokenizer(Path(tmp_path_factory.mktemp("tokenizer")))


# name -> (rank, lora_alpha, use_rslora, target modules): different ranks, scalings and targets
# (full packed layers, partial qkv, MLP-only plus o_proj).
LORA_SPECS = {
    "sql": (8, 16, False, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]),
    "chat": (2, 8, False, ["q_proj", "v_proj"]),
    "math": (4, 4, True, ["o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def build_peft_adapter(model_dir: str, out_dir: Path, rank: int, alpha: float, rslora: bool,
                       targets: list[str], seed: int) -> str:
    """Save a random PEFT LoRA adapter for `model_dir` (lora_B non-zero, so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                        lora_dropout=0.0)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.2
    model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="session")
def lora_adapters(tiny_models: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> PEFT adapter directory for the tiny Llama (LORA_SPECS), built once."""
    root = tmp_path_factory.mktemp("lora-adapters")
    return {name: build_peft_adapter(tiny_models["llama"], root / name, *spec, seed=i)
            for i, (name, spec) in enumerate(LORA_SPECS.items())}

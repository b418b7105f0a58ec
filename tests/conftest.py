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

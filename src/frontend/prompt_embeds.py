"""Prompts given as embeddings (`--enable-prompt-embeds`): user tensors -> `PromptEmbeds`.

Offline users pass a tensor ({"prompt_embeds": Tensor[L, H]}); the completions API takes base64
of a `torch.save`d tensor. Either becomes raw bytes + dtype + shape (`PromptEmbeds`), so nothing
is pickled across processes; `torch.load(weights_only=True)` runs here, in the API process,
inside `check_sparse_tensor_invariants` (a crafted sparse tensor cannot write out of bounds).

This is the one frontend module that uses torch, imported lazily on the first embedding prompt:
API servers that never see one never load it. Clients must be trusted (vLLM's warning holds).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from typing import Any

from enginecore.protocol import PromptEmbeds

_DTYPES = ("float32", "bfloat16", "float16")
FLAG_OFF = "You must set `--enable-prompt-embeds` to input `prompt_embeds`."


def tensor_to_prompt_embeds(tensor: Any, hidden_size: int) -> PromptEmbeds:
    """A [L, H] (or [1, L, H]) float tensor -> PromptEmbeds; ValueError names what is wrong."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds: expected a tensor, got {type(tensor).__name__}")
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"prompt_embeds: dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    t = tensor.detach().to_dense().cpu()
    if t.dim() > 2:
        t = t.squeeze(0)
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"prompt_embeds: expected a non-empty 2-D tensor [num_tokens, "
                         f"hidden_size], got shape {list(tensor.shape)}")
    if hidden_size and t.shape[1] != hidden_size:
        raise ValueError(f"prompt_embeds: rows must have the model's hidden_size {hidden_size}, "
                         f"got {t.shape[1]}")
    data = t.contiguous().view(torch.uint8).numpy().tobytes()
    shape = list(t.shape)
    digest = hashlib.sha256(f"{dtype}{shape}".encode() + data).hexdigest()
    return PromptEmbeds(data=data, dtype=dtype, shape=shape, hash=digest)


def decode_prompt_embeds(encoded: str, hidden_size: int) -> PromptEmbeds:
    """base64 of a `torch.save`d tensor (the completions API field) -> PromptEmbeds."""
    import torch

    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("prompt_embeds: not valid base64") from None
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
            if isinstance(tensor, torch.Tensor):
                tensor = tensor.to_dense()
    except Exception as e:  # any unpickling failure is the client's input
        raise ValueError(f"prompt_embeds: cannot load a tensor: {e}") from None
    return tensor_to_prompt_embeds(tensor, hidden_size)

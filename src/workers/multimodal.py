"""`MultiModalRunner`: the worker side of multimodal inputs for a vision-language model.

- Encoder cache: the embeddings of each encoded item ([length, H], keyed by its content hash) stay
  on the device from the step that encodes them until a later step's `free_encoder_hashes`
  drops them (the engine core decides when: `enginecore/encoder_cache.py`). Each step first drops,
  then encodes the items of `ExecuteStep.encoder_inputs`, then the forward reads the rows its
  scheduled placeholder tokens need, so a chunk boundary may fall anywhere inside an item.
- M-RoPE positions: each request's prompt positions [3, P] and delta are computed once when the
  request arrives; a step's positions are gathered from them ([3, T]). Steps where all three axes
  agree (text, decode) use ordinary [T] positions, CUDA graphs included.

Dimension legend: T tokens in the step, P prompt tokens, H hidden size, L item's tokens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from enginecore.protocol import MMInput

_DTYPES = {"float32": np.float32, "float16": np.float16}


class MultiModalRunner:
    """Encoder cache, encoder runs and per-step placeholder embeddings of one worker."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cache: dict[str, torch.Tensor] = {}  # hash -> [L, H]

    def prompt_positions(self, num_prompt: int, mm_inputs: list[MMInput] | None
                         ) -> tuple[np.ndarray | None, int]:
        """(M-RoPE positions [3, P] or None for a text-only prompt, delta for later tokens)."""
        if not mm_inputs:
            return None, 0
        return self.model.mrope_positions(num_prompt,
                                          [(m.offset, m.grid_thw) for m in mm_inputs])

    def profile(self, max_tokens: int) -> None:
        """Encode the largest square image `max_tokens` allows (memory profiling's peak)."""
        side, m = max(1, math.isqrt(max_tokens)), self.model.spatial_merge_size
        row = self.model.visual.patch_embed.proj.weight[0].numel()  # C*Tp*P*P
        pixels = torch.zeros(side * side * m * m, row, device=self.device)
        self.model.encode(pixels, [[1, side * m, side * m]])

    def free(self, hashes: list[str]) -> None:
        """Drop encoder outputs no running request needs any more."""
        for key in hashes:
            self.cache.pop(key, None)

    def encode(self, items: list[MMInput]) -> None:
        """Run the vision tower over `items` (one batch per modality) into the cache."""
        for modality in ("image", "video"):
            batch = [m for m in items if m.modality == modality and m.hash not in self.cache]
            if not batch:
                continue
            pixels = torch.cat([_pixels(m) for m in batch]).to(self.device)
            embeds = self.model.encode(pixels, [m.grid_thw for m in batch])
            for m, rows in zip(batch, embeds.split([m.length for m in batch]), strict=True):
                if rows.shape[0] != m.length:
                    raise ValueError(f"{modality} {m.hash[:12]}: encoder gave {rows.shape[0]} "
                                     f"embeddings for {m.length} placeholder tokens")
                self.cache[m.hash] = rows

    def step_positions(self, spans: list[tuple[np.ndarray | None, int, int, int]]
                       ) -> np.ndarray:
        """Positions [3, T] for requests' token ranges (mrope, delta, start, end) in order."""
        parts = []
        for mrope, delta, start, end in spans:
            index = np.arange(start, end, dtype=np.int64)
            if mrope is None:
                parts.append(np.broadcast_to(index, (3, end - start)))
                continue
            out = np.empty((3, end - start), dtype=np.int64)
            inside = index < mrope.shape[1]
            out[:, inside] = mrope[:, index[inside]]
            out[:, ~inside] = index[~inside] + delta
            parts.append(out)
        return np.concatenate(parts, axis=1)

    def embeds_for(self, mm_inputs: list[MMInput], start: int, end: int, base: int
                   ) -> list[tuple[int, torch.Tensor]]:
        """(index in the step's T, rows) for the placeholders of [start, end) of one request."""
        out = []
        for m in mm_inputs:
            lo, hi = max(start, m.offset), min(end, m.offset + m.length)
            if lo >= hi:
                continue
            rows = self.cache.get(m.hash)
            if rows is None:
                raise RuntimeError(f"encoder output of {m.modality} {m.hash[:12]} is not cached "
                                   "(the engine core should have scheduled its encoding)")
            out.append((base + lo - start, rows[lo - m.offset: hi - m.offset]))
        return out

    def inputs_embeds(self, input_ids: torch.Tensor,
                      pieces: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Token embeddings [T, H] with placeholder rows replaced by encoder outputs."""
        embeds = self.model.embed_input_ids(input_ids)
        for dst, rows in pieces:
            embeds[dst: dst + rows.shape[0]] = rows.to(embeds.dtype)
        return embeds


def _pixels(m: MMInput) -> torch.Tensor:
    if m.dtype not in _DTYPES:
        raise ValueError(f"mm input dtype {m.dtype!r} is not one of {sorted(_DTYPES)}")
    array = np.frombuffer(m.data, dtype=_DTYPES[m.dtype]).reshape(m.shape)
    return torch.from_numpy(array.copy())

"""`MultiModalProcessor`: images and videos -> pixel rows, expanded placeholders, content hashes.

Runs in the API process, torch-free: the Qwen2-VL image processor's documented math is done here
with numpy and Pillow rather than by transformers (whose processors import torch):

    RGB image (H, W) --smart_resize--> (H', W') multiples of P*m within [min_pixels, max_pixels]
      (bicubic) --/255, (x - mean) / std--> [C, H', W']
      --repeat Tp times (an image is a still clip)--> [Tp, C, H', W']
      --patchify--> rows [t*h*w, C*Tp*P*P], grid (t, h, w) = (1, H'/P, W'/P)

A video is a list of frames, all resized like its first one, padded to a multiple of Tp with its
last frame, grid t = frames / Tp. Rows are ordered so each run of m*m rows is one merge window,
which is what the vision tower's patch merger expects.

Placeholders: the prompt holds one image (video) pad token per item (the chat template writes
`<|vision_start|><|image_pad|><|vision_end|>`); the k-th is expanded to t*h*w/m^2 copies, one per
embedding the encoder will produce for the k-th item. Each item is hashed (sha256 over modality,
grid and pixel bytes, or the caller's uuid): the hash keys the workers' encoder cache and enters
the prefix-cache hash of every KV block the item's placeholders overlap, so equal token ids with
different images never share KV.

Dimension legend: C channels (3), P patch size, m spatial merge size, Tp temporal patch size.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from enginecore.config import MultiModalConfig
from enginecore.protocol import MMInput

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DEFAULT_LIMIT = 999  # vLLM's default items per prompt and modality
_MAX_ASPECT = 200  # the processor refuses more extreme aspect ratios


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """(H', W'): multiples of `factor`, about the same aspect, area within the pixel bounds."""
    if max(height, width) / min(height, width) > _MAX_ASPECT:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} "
                         f"exceeds {_MAX_ASPECT}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class VisionSpec:
    """The checkpoint's preprocessing numbers and placeholder token ids."""

    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir)
        cfg = json.loads((path / "config.json").read_text())
        vcfg = cfg["vision_config"]
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        size = pre.get("size") or {}
        self.patch = int(pre.get("patch_size", vcfg.get("patch_size", 14)))
        self.merge = int(pre.get("merge_size", vcfg.get("spatial_merge_size", 2)))
        self.temporal = int(pre.get("temporal_patch_size", vcfg.get("temporal_patch_size", 2)))
        self.min_pixels = int(pre.get("min_pixels", size.get("shortest_edge", 56 * 56)))
        self.max_pixels = int(pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)))
        self.mean = np.array(pre.get("image_mean", _CLIP_MEAN), dtype=np.float32)[:, None, None]
        self.std = np.array(pre.get("image_std", _CLIP_STD), dtype=np.float32)[:, None, None]
        self.token_ids = {"image": int(cfg["image_token_id"]),
                          "video": int(cfg["video_token_id"])}

    def frames_to_rows(self, frames: list[Image.Image]) -> tuple[np.ndarray, list[int]]:
        """RGB frames (one for an image) -> (rows [t*h*w, C*Tp*P*P] fp32, grid [t, h, w])."""
        factor, p, m, tp = self.patch * self.merge, self.patch, self.merge, self.temporal
        h, w = smart_resize(frames[0].height, frames[0].width, factor, self.min_pixels,
                            self.max_pixels)
        arrays = []
        for frame in frames:
            if frame.size != (w, h):
                frame = frame.resize((w, h), Image.Resampling.BICUBIC)
            x = np.asarray(frame, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [C, H', W']
            arrays.append(((x - self.mean) / self.std).astype(np.float32))
        if len(arrays) == 1:
            arrays = arrays * tp
        arrays += [arrays[-1]] * (-len(arrays) % tp)
        x = np.stack(arrays)  # [F, C, H', W']
        c, gt, gh, gw = x.shape[1], x.shape[0] // tp, h // p, w // p
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, Tp, P, P]
        return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), [gt, gh, gw]


class MultiModalProcessor:
    """Turns a prompt's token ids plus its media into expanded ids and `MMInput`s."""

    def __init__(self, model_dir: str | Path, config: MultiModalConfig) -> None:
        self.spec = VisionSpec(model_dir)
        self.config = config

    @staticmethod
    def supports(model_dir: str | Path) -> bool:
        """True for checkpoints with a vision tower (a `vision_config` in config.json)."""
        cfg_file = Path(model_dir) / "config.json"
        return cfg_file.is_file() and "vision_config" in json.loads(cfg_file.read_text())

    def limit(self, modality: str) -> int:
        """Most items of `modality` one prompt may carry (`--limit-mm-per-prompt`)."""
        return self.config.limit_mm_per_prompt.get(modality, _DEFAULT_LIMIT)

    def process(self, token_ids: list[int], mm_data: dict[str, Any],
                uuids: dict[str, list[str | None]] | None = None
                ) -> tuple[list[int], list[MMInput]]:
        """Expand placeholders; ValueError naming `multi_modal_data` on bad or surplus media."""
        items: dict[str, list[tuple[np.ndarray, list[int], str]]] = {}
        for modality, value in mm_data.items():
            if modality not in self.spec.token_ids:
                raise ValueError(f"multi_modal_data: unsupported modality {modality!r} "
                                 "(image, video)")
            values = _as_items(modality, value)
            if len(values) > self.limit(modality):
                raise ValueError(f"multi_modal_data: {len(values)} {modality} items; at most "
                                 f"{self.limit(modality)} per prompt (--limit-mm-per-prompt)")
            ids = (uuids or {}).get(modality) or [None] * len(values)
            items[modality] = [self._one(modality, v, u) for v, u in zip(values, ids,
                                                                          strict=True)]
        return self._expand(token_ids, items)

    def _one(self, modality: str, value: Any, uuid: str | None
             ) -> tuple[np.ndarray, list[int], str]:
        frames = [value] if modality == "image" else list(value)
        if not frames:
            raise ValueError("multi_modal_data: a video needs at least one frame")
        rows, grid = self.spec.frames_to_rows([self._rgb(f) for f in frames])
        if uuid is None:
            digest = hashlib.sha256(f"{modality}:{grid}:".encode())
            digest.update(rows.data)
            uuid = digest.hexdigest()
        return rows, grid, uuid

    def _rgb(self, frame: Any) -> Image.Image:
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4):
                raise ValueError("multi_modal_data: array frames must be uint8 [H, W, 3]")
            frame = Image.fromarray(frame)
        if not isinstance(frame, Image.Image):
            raise ValueError(f"multi_modal_data: expected a PIL image or uint8 array, got "
                             f"{type(frame).__name__}")
        if frame.width * frame.height > self.config.max_image_pixels:
            raise ValueError(f"image of {frame.width}x{frame.height} pixels exceeds the "
                             f"{self.config.max_image_pixels}-pixel limit")
        if frame.mode == "RGBA":  # on white, as vLLM does
            background = Image.new("RGB", frame.size, (255, 255, 255))
            background.paste(frame, mask=frame.getchannel("A"))
            return background
        return frame.convert("RGB")

    def _expand(self, token_ids: list[int], items: dict[str, list[tuple[np.ndarray, list[int],
                                                                         str]]]
                ) -> tuple[list[int], list[MMInput]]:
        pad_of = {tid: modality for modality, tid in self.spec.token_ids.items()}
        found = {modality: 0 for modality in self.spec.token_ids}
        for t in token_ids:
            if t in pad_of:
                found[pad_of[t]] += 1
        for modality, count in found.items():
            given = len(items.get(modality, ()))
            if count != given:
                raise ValueError(f"multi_modal_data: {given} {modality} item(s) but the prompt "
                                 f"has {count} {modality} placeholder(s)")
        out: list[int] = []
        mm_inputs: list[MMInput] = []
        seen = {modality: 0 for modality in self.spec.token_ids}
        merge2 = self.spec.merge ** 2
        for t in token_ids:
            modality = pad_of.get(t)
            if modality is None:
                out.append(t)
                continue
            rows, grid, key = items[modality][seen[modality]]
            seen[modality] += 1
            length = rows.shape[0] // merge2
            mm_inputs.append(MMInput(modality=modality, hash=key, offset=len(out), length=length,
                                     grid_thw=grid, data=rows.tobytes(), dtype="float32",
                                     shape=list(rows.shape)))
            out.extend([t] * length)
        return out, mm_inputs


def _as_items(modality: str, value: Any) -> list[Any]:
    # image: one image or a list; video: one frame list / [F, H, W, 3] array, or a list of them.
    if modality == "image":
        return list(value) if isinstance(value, list | tuple) else [value]
    if isinstance(value, np.ndarray):
        return [list(value)] if value.ndim == 4 else [[value]]
    if isinstance(value, list | tuple) and value and (
            isinstance(value[0], list | tuple)
            or (isinstance(value[0], np.ndarray) and value[0].ndim == 4)):
        return [list(v) for v in value]
    return [list(value)]

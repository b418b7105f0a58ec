"""`MediaConnector`: fetch and decode the images and videos of chat content parts.

Runs in the API process. Accepted `url`s:
    data:<mime>;base64,<data>   decoded in memory
    http:// or https://         fetched with aiohttp: a time limit per item (`media_fetch_timeout`,
                                `video_fetch_timeout`) and a byte limit (`max_media_bytes`) that
                                stops reading as soon as it is passed
    file://<path>               only under `--allowed-local-media-path` (after resolving links)
Images are decoded with Pillow; the pixel count is checked (`max_image_pixels`) from the header
before any pixel is decoded, so a decompression bomb costs nothing. Videos: Pillow decodes
multi-frame images (animated GIF, WebP or PNG; multi-page TIFF) into frames, uniformly sampled
down to `_MAX_VIDEO_FRAMES`; real video containers (mp4, webm, ...) need a decoder this engine
does not ship and are refused with a message saying so. Offline, `multi_modal_data={"video":
frames}` takes frames directly.

Every failure is a `ValueError` whose message names the content part, answered with HTTP 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
from PIL import Image, ImageSequence, UnidentifiedImageError

from enginecore.config import MultiModalConfig
from enginecore.protocol import MMInput
from frontend import openai as api
from frontend.multimodal import MultiModalProcessor

_MAX_VIDEO_FRAMES = 32
_CHUNK = 64 * 1024


class MediaRef(NamedTuple):
    """One image or video of a chat request, before it is fetched."""

    modality: str  # "image" | "video"
    url: str
    uuid: str | None
    where: str  # the content part, for error messages: "messages[0].content[1].image_url"


def media_parts(i: int, parts: list[api.ContentPart], media: list[MediaRef]
                ) -> list[dict[str, Any]]:
    """Message i's content parts as the chat template sees them; media are queued in `media`."""
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        if isinstance(part, api.TextPart):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, api.ImagePart):
            out.append({"type": "image"})
            media.append(MediaRef("image", part.image_url.url, part.uuid, where + ".image_url"))
        elif isinstance(part, api.VideoPart):
            out.append({"type": "video"})
            media.append(MediaRef("video", part.video_url.url, part.uuid, where + ".video_url"))
        else:
            raise ValueError(f"{where}: audio inputs are not supported by this model")
    return out


class MediaConnector:
    """Loads media URLs into PIL images (videos: lists of frames) within the configured limits."""

    def __init__(self, config: MultiModalConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def load_prompt_media(self, processor: MultiModalProcessor | None, ids: list[int],
                                media: list[MediaRef]) -> tuple[list[int], list[MMInput]]:
        """Check the limits, fetch every item concurrently, expand the prompt's placeholders."""
        assert processor is not None, "media parts reach here only for multimodal models"
        for modality in ("image", "video"):
            count = sum(1 for m in media if m.modality == modality)
            if count > processor.limit(modality):
                raise ValueError(f"messages: {count} {modality} items; at most "
                                 f"{processor.limit(modality)} per prompt "
                                 "(--limit-mm-per-prompt)")
        loaded = await asyncio.gather(*(
            self.load_image(m.url, m.where) if m.modality == "image"
            else self.load_video(m.url, m.where) for m in media))
        data: dict[str, list[Any]] = {}
        uuids: dict[str, list[str | None]] = {}
        for ref, item in zip(media, loaded, strict=True):
            data.setdefault(ref.modality, []).append(item)
            uuids.setdefault(ref.modality, []).append(ref.uuid)
        # Resizing and hashing are CPU work: keep the event loop serving other requests.
        return await asyncio.to_thread(processor.process, ids, data, uuids)

    async def load_image(self, url: str, where: str) -> Image.Image:
        """One image; `where` (e.g. "messages[0].content[1].image_url") prefixes errors."""
        data = await self._read(url, where, self.config.media_fetch_timeout)
        return self._decode(data, where)[0]

    async def load_video(self, url: str, where: str) -> list[Image.Image]:
        """The frames of a multi-frame image (GIF / WebP / PNG / TIFF), at most 32, uniformly."""
        if url.startswith("data:video/"):
            raise ValueError(f"{where}: {url[5:url.find(';')]} videos cannot be decoded here (no "
                             "video decoder); send the frames as an animated GIF, WebP or PNG")
        data = await self._read(url, where, self.config.video_fetch_timeout)
        frames = self._decode(data, where, video=True)
        if len(frames) > _MAX_VIDEO_FRAMES:
            step = len(frames) / _MAX_VIDEO_FRAMES
            frames = [frames[int(i * step)] for i in range(_MAX_VIDEO_FRAMES)]
        return frames

    async def close(self) -> None:
        """Close the HTTP session (if one was opened)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ bytes

    async def _read(self, url: str, where: str, timeout: float) -> bytes:
        if url.startswith("data:"):
            return self._read_data_url(url, where)
        if url.startswith(("http://", "https://")):
            try:
                return await asyncio.wait_for(self._fetch(url, where), timeout)
            except TimeoutError:
                raise ValueError(f"{where}: fetching {url!r} took longer than {timeout:g} s") \
                    from None
            except aiohttp.ClientError as e:
                raise ValueError(f"{where}: cannot fetch {url!r}: {e}") from None
        if url.startswith("file://"):
            return self._read_file(url[len("file://"):], where)
        raise ValueError(f"{where}: unsupported URL {url[:40]!r} (use http(s)://, data: or "
                         "file:// with --allowed-local-media-path)")

    def _read_data_url(self, url: str, where: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{where}: a data URL must look like data:<mime>;base64,<data>")
        if len(payload) * 3 // 4 > self.config.max_media_bytes:
            raise self._too_large(where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: invalid base64 data") from None

    async def _fetch(self, url: str, where: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(url) as resp:
            if resp.status != 200:
                raise ValueError(f"{where}: fetching {url!r} answered HTTP {resp.status}")
            if (resp.content_length or 0) > self.config.max_media_bytes:
                raise self._too_large(where)
            out = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK):
                out += chunk
                if len(out) > self.config.max_media_bytes:
                    raise self._too_large(where)
            return bytes(out)

    def _read_file(self, path: str, where: str) -> bytes:
        root = self.config.allowed_local_media_path
        if not root:
            raise ValueError(f"{where}: file:// URLs need the server started with "
                             "--allowed-local-media-path")
        target = Path(path).resolve()
        if not target.is_relative_to(Path(root).resolve()):
            raise ValueError(f"{where}: {path!r} is outside --allowed-local-media-path")
        if not target.is_file():
            raise ValueError(f"{where}: no such file {path!r}")
        if target.stat().st_size > self.config.max_media_bytes:
            raise self._too_large(where)
        return target.read_bytes()

    def _too_large(self, where: str) -> ValueError:
        return ValueError(f"{where}: media larger than {self.config.max_media_bytes} bytes "
                          "(max_media_bytes)")

    # ------------------------------------------------------------ decoding

    def _decode(self, data: bytes, where: str, video: bool = False) -> list[Image.Image]:
        try:
            img = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") \
                from None
        width, height = img.size
        if width * height > self.config.max_image_pixels:
            raise ValueError(f"{where}: image of {width}x{height} pixels exceeds the "
                             f"{self.config.max_image_pixels}-pixel limit (max_image_pixels)")
        try:
            if not video:
                img.load()
                return [img]
            return [frame.copy() for frame in ImageSequence.Iterator(img)]
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt pixel data
            raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") \
                from None

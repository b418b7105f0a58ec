"""Images and videos through the real HTTP server (tiny Qwen2-VL): data / http / file URLs, the
prefix cache across requests with the same image, and every bad-media case answered 400."""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from e2e_server import http
from PIL import Image

from workers.demo_vl import build_tiny_vl_checkpoint

CHAT = "/v1/chat/completions"


def png(seed: int, size: int = 56, noise: bool = True) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if noise else \
        np.full((size, size, 3), seed % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def gif(num_frames: int) -> bytes:
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
              for _ in range(num_frames)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def chat(*parts: dict) -> dict:
    content = [*parts, {"type": "text", "text": "what is this"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0}


def img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


class _Media(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            time.sleep(3)
        body = png(7) if self.path != "/missing.png" else b""
        self.send_response(404 if self.path == "/missing.png" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def media_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("media")
    (root / "cat.png").write_bytes(png(3))
    return root


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory, media_dir):
    model = build_tiny_vl_checkpoint(tmp_path_factory.mktemp("tiny-vl"))
    return server_factory([model, "--limit-mm-per-prompt", '{"image": 2, "video": 1}',
                           "--allowed-local-media-path", str(media_dir),
                           "--max-media-bytes", "60000", "--max-image-pixels", "40000",
                           "--media-fetch-timeout", "1", "--block-size", "4"])


def test_images_answer_and_hit_the_prefix_cache(server) -> None:
    body = chat(img(data_url(png(1))))
    status, first = http("POST", server.url + CHAT, body)
    assert status == 200, first
    assert first["usage"]["prompt_tokens"] > 4  # 4 placeholder tokens for a 56x56 image
    status, second = http("POST", server.url + CHAT, body)
    assert status == 200
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    # Another image, same tokens: the blocks holding the placeholders are not shared.
    status, third = http("POST", server.url + CHAT, chat(img(data_url(png(2)))))
    assert status == 200
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] < \
        second["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_http_file_and_video_urls(server, media_url, media_dir) -> None:
    for part in (img(media_url + "/cat.png"), img(f"file://{media_dir}/cat.png"),
                 {"type": "video_url", "video_url": {"url": data_url(gif(4), "image/gif")}}):
        status, out = http("POST", server.url + CHAT, chat(part))
        assert status == 200, (part["type"], out)


BAD = [
    ("corrupt-bytes", [img(data_url(b"\x89PNG\r\n\x1a\nnot really a png"))],
     "cannot decode the image"),
    ("bad-base64", [img("data:image/png;base64,@@@")], "invalid base64"),
    ("too-large", [img(data_url(png(1, size=200)))], "larger than 60000 bytes"),
    ("too-many-pixels", [img(data_url(png(1, size=300, noise=False)))],
     "exceeds the 40000-pixel limit"),
    ("too-many-images", [img(data_url(png(i))) for i in range(3)], "at most 2 per prompt"),
    ("unsupported-scheme", [img("ftp://example.com/a.png")], "unsupported URL"),
    ("file-outside-root", [img("file:///etc/hostname")], "outside --allowed-local-media-path"),
    ("mp4-video", [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
     "no video decoder"),
    ("audio", [{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}}],
     "audio inputs are not supported"),
]


@pytest.mark.parametrize("name,parts,message", BAD, ids=[b[0] for b in BAD])
def test_bad_media_is_a_400(server, name: str, parts: list[dict], message: str) -> None:
    status, out = http("POST", server.url + CHAT, chat(*parts))
    assert status == 400, out
    assert message in out["error"]["message"], out


def test_fetch_errors_are_400_and_server_survives(server, media_url) -> None:
    status, out = http("POST", server.url + CHAT, chat(img(media_url + "/slow.png")))
    assert status == 400 and "longer than 1 s" in out["error"]["message"], out
    status, out = http("POST", server.url + CHAT, chat(img(media_url + "/missing.png")))
    assert status == 400 and "HTTP 404" in out["error"]["message"], out
    assert http("GET", server.url + "/health")[0] == 200

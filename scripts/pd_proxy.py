"""Disaggregated-prefill proxy: prefill on a producer instance, decode on a consumer instance.

    python -m frontend serve MODEL --port 8100 --kv-transfer-config \\
        '{"kv_role": "kv_producer", "kv_connector_extra_config": {"shm_path": "/dev/shm/kv"}}'
    python -m frontend serve MODEL --port 8200 --kv-transfer-config \\
        '{"kv_role": "kv_consumer", "kv_connector_extra_config": {"shm_path": "/dev/shm/kv"}}'
    python scripts/pd_proxy.py --port 8000 --prefill http://127.0.0.1:8100 \\
        --decode http://127.0.0.1:8200

With NIXL (any hosts), the instances instead run, e.g.
    --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both",
                           "side_channel_host": "10.0.0.1", "side_channel_port": 5600}'

Each `/v1/completions` or `/v1/chat/completions` request is first sent to a prefill instance
with `max_tokens=1` (not streamed) and `kv_transfer_params: {"do_remote_decode": true}`: that
computes the prompt; the shared-memory connector saves its full blocks to the store, the NIXL
one holds them and answers with `kv_transfer_params` saying where they are. Then the original
request goes to a decode instance, with those `kv_transfer_params` when the prefill answer has
them; its connector loads the blocks instead of computing them; its answer (streamed or not) is
the proxy's answer. Several `--prefill` / `--decode` URLs are used round-robin. Other GET routes
(`/v1/models`, `/health`) go to a decode instance. A prefill error is returned as is.
"""

from __future__ import annotations

import argparse
import itertools

import aiohttp
from aiohttp import web

_HOP_HEADERS = ("Authorization",)


def prefill_body(body: dict) -> dict:
    """The request as the prefill instance gets it: one token, one choice, not streamed."""
    out = {**body, "max_tokens": 1, "stream": False, "n": 1,
           "kv_transfer_params": {"do_remote_decode": True}}
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    for key in ("stream_options", "min_tokens", "best_of"):
        out.pop(key, None)
    return out


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str]):
        self.prefill = itertools.cycle(prefill)
        self.decode = itertools.cycle(decode)
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.add_routes([web.post("/v1/completions", self.generate),
                             web.post("/v1/chat/completions", self.generate),
                             web.get("/{tail:.*}", self.passthrough)])
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def _stop(self, app: web.Application) -> None:
        assert self.session is not None
        await self.session.close()

    @staticmethod
    def _headers(request: web.Request) -> dict[str, str]:
        return {k: v for k in _HOP_HEADERS if (v := request.headers.get(k)) is not None}

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Prefill on P, then relay D's answer (streamed as it comes)."""
        assert self.session is not None
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        headers = self._headers(request)
        async with self.session.post(next(self.prefill) + request.path,
                                     json=prefill_body(body), headers=headers) as pre:
            if pre.status != 200:
                return web.Response(status=pre.status, body=await pre.read(),
                                    content_type=pre.content_type)
            params = (await pre.json()).get("kv_transfer_params")
        if params is not None:  # NixlConnector: where D reads the prompt's KV
            body = {**body, "kv_transfer_params": params}
        async with self.session.post(next(self.decode) + request.path, json=body,
                                     headers=headers) as dec:
            return await self._relay(request, dec)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        async with self.session.get(next(self.decode) + request.path_qs,
                                    headers=self._headers(request)) as resp:
            return await self._relay(request, resp)

    @staticmethod
    async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": upstream.headers.get("Content-Type", "application/json")})
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill", nargs="+", required=True, help="producer base URLs")
    ap.add_argument("--decode", nargs="+", required=True, help="consumer base URLs")
    args = ap.parse_args()
    web.run_app(Proxy(args.prefill, args.decode).app, host=args.host, port=args.port,
                access_log=None)


if __name__ == "__main__":
    main()

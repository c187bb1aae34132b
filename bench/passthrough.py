"""The floor: a minimal aiohttp pass-through proxy (no auth, limits, usage or logging).

``python -m bench.passthrough --port P --upstream http://127.0.0.1:B`` forwards every POST
(path, body and end-to-end headers) to the upstream with one shared ClientSession and
relays the answer: as a whole, or chunk by chunk when it is an event stream.  It runs on
uvloop, the fastest event loop there is for asyncio, so it is the floor any Python aiohttp
proxy is measured against (the proxy itself runs on asyncio's default loop).  It prints
its loop's type at start (the bench checks it is uvloop's).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

CLIENT = web.AppKey("client", aiohttp.ClientSession)
HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length"})


def create_app(upstream: str) -> web.Application:
    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with request.app[CLIENT].post(
            upstream + request.path_qs, data=body, headers=headers
        ) as resp:
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            if resp.content_type != "text/event-stream":
                return web.Response(status=resp.status, body=await resp.read(), headers=out)
            stream = web.StreamResponse(status=resp.status, headers=out)
            await stream.prepare(request)
            async for chunk in resp.content.iter_any():
                await stream.write(chunk)
            await stream.write_eof()
            return stream

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            auto_decompress=False,
        )
        print(f"event loop: {type(asyncio.get_running_loop()).__module__}", flush=True)
        yield
        await app[CLIENT].close()

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_post("/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8081")
    args = parser.parse_args()
    web.run_app(
        create_app(args.upstream.rstrip("/")),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda *_: None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()

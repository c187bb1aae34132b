"""A model adapter built with ``aidial-sdk`` (what DIAL's adapters are written with), run by
the per-request key tests as a process of its own: ``python -m tests.dial_adapter PORT``.

It serves ``/openai/deployments/{name}/chat/completions`` for every name in
:data:`DEPLOYMENTS` and answers with one JSON object as the message content: what it got
(the ``Api-Key``, the ``Authorization``, the ``X-UPSTREAM-*`` headers) and, when the last
user message is a JSON object asking for them, what its calls back into the proxy answered,
made with its per-request key as DIAL's adapters make them:

``{"base": "http://proxy", "info": true, "inner": "model", "authorization": "Bearer jwt"}``

It reports usage through the SDK (``response.set_usage``): 3 prompt + 4 completion tokens.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import aiohttp
import uvicorn
from aidial_sdk import DIALApp
from aidial_sdk.chat_completion import ChatCompletion, Request, Response

DEPLOYMENTS = ("adapter", "agent", "inner", "closed", "forwarding")
PROMPT_TOKENS, COMPLETION_TOKENS = 3, 4


async def _call_back(api_key: str, asks: dict[str, Any]) -> dict[str, Any]:
    base = asks["base"]
    headers = {"Api-Key": api_key}
    if "authorization" in asks:
        headers["Authorization"] = asks["authorization"]
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        if asks.get("info"):
            async with session.get(f"{base}/v1/user/info", headers=headers) as resp:
                out["info"] = {"status": resp.status, "body": await resp.json()}
        if "inner" in asks:
            url = f"{base}/openai/deployments/{asks['inner']}/chat/completions"
            body = {"messages": [{"role": "user", "content": "inner call"}]}
            async with session.post(url, json=body, headers=headers) as resp:
                out["inner"] = {"status": resp.status, "body": await resp.json()}
    return out


class Recorder(ChatCompletion):
    async def chat_completion(self, request: Request, response: Response) -> None:
        seen: dict[str, Any] = {
            "deployment": request.deployment_id,
            "api_key": request.api_key,
            "authorization": request.bearer_token,
            "upstream_endpoint": request.headers.get("X-UPSTREAM-ENDPOINT"),
            "upstream_key": request.headers.get("X-UPSTREAM-KEY"),
            "upstream_extra_data": request.headers.get("X-UPSTREAM-EXTRA-DATA"),
        }
        content = request.messages[-1].content
        try:
            asks = json.loads(content) if isinstance(content, str) else None
        except ValueError:
            asks = None
        if isinstance(asks, dict) and "base" in asks:
            seen["calls"] = await _call_back(request.api_key, asks)
        with response.create_single_choice() as choice:
            choice.append_content(json.dumps(seen))
        response.set_usage(PROMPT_TOKENS, COMPLETION_TOKENS)


def create_app() -> DIALApp:
    app = DIALApp()
    for name in DEPLOYMENTS:
        app.add_chat_completion(name, Recorder())
    return app


if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

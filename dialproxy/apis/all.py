"""Every API the proxy serves (one module each), in the order their routes are added."""

from __future__ import annotations

from dialproxy.apis import Api
from dialproxy.apis.anthropic import COUNT_TOKENS, MESSAGES
from dialproxy.apis.openai import CHAT, COMPLETIONS, EMBEDDINGS
from dialproxy.apis.responses import RESPONSES

APIS: tuple[Api, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS)

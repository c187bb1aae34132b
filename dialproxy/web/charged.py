"""The background responses whose usage has been charged: once, whether the stream that
created one brought its usage or a follow-up first saw it done (``web.finish.settle``,
``web.responses``)."""

from __future__ import annotations

from collections import OrderedDict

import structlog

from dialproxy.apis import responses
from dialproxy.perrequest import PerRequestKeys, RedisCalls

log = structlog.get_logger("dialproxy.responses")

# A background response's usage is charged once: the ids charged are remembered this long.
CHARGED_TTL = 30 * 24 * 3600
CHARGED_PREFIX = "dp:resp:charged:"


class Charged:
    """The background responses whose usage has been charged (this instance's memory, and
    with Redis every instance's: ``SET NX``)."""

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def first(self, response_id: str, redis: RedisCalls | None) -> bool:
        """Whether this is the first time ``response_id``'s usage is to be charged."""
        if response_id in self._seen:
            return False
        self._seen[response_id] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        if redis is None:
            return True
        key = CHARGED_PREFIX + responses.digest(response_id)
        try:
            done = await redis.call(lambda: redis.client.set(key, "1", nx=True, ex=CHARGED_TTL))
        except Exception as e:  # Redis down: charged here (a charge twice beats none)
            log.warning("charge_mark_failed", error=type(e).__name__)
            return True
        return bool(done)


def responses_redis(keys: PerRequestKeys | None) -> RedisCalls | None:
    """Where the marks are shared between instances: the Redis of the shared keys' store
    (``keys``: its per-request keys; None: not in Redis, each instance remembers its own)."""
    return keys.redis if keys is not None else None

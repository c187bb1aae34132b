"""What one proxied request did: filled as it goes down the request path (the handler, the
upstream's attempts, the relay), read at its end by the usage record, the usage ledger, the
log line, the metrics and the traces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dialproxy.counting.limiter import Held

if TYPE_CHECKING:
    import aiohttp

    from dialproxy.apis import AnswerIds
    from dialproxy.config.model import Model
    from dialproxy.counting.limiter import Admission, Scope
    from dialproxy.sharedkeys.model import SharedKey
    from dialproxy.wire.relay import Relay
    from dialproxy.wire.usage import Usage


@dataclass(slots=True)
class Outcome:
    """What one request did, for the log line and the usage record."""

    status: int = 0
    attempts: int = 0
    upstream: str | None = None
    usage: Usage | None = None
    ttfb_ms: float | None = None
    error: str | None = None
    model: Model | None = None
    scopes: tuple[Scope, ...] = ()
    records: bool = False  # whether a scope counts usage
    shared: SharedKey | None = None  # the shared key that called, if one did
    request_bytes: int = 0  # the body sent upstream (what a usage estimate goes by)
    # The usage is an estimate (a stream cut before its usage, a client gone before the
    # answer): charged whatever the status.
    estimated: bool = False
    # An abandoned stream's upstream and reader, still to be drained for the usage.
    leftover: tuple[aiohttp.ClientResponse, Relay] | None = None
    per_request_key: str | None = None  # the key sent to an adapter: ended with the request
    ids: AnswerIds | None = None  # the API's ids rewritten in the answer (Responses)
    reserved: tuple[int, int] = (0, 0)  # tokens and nano-USD held at admission, till settled
    admitted: float | None = None  # when (its calendar periods: the ones it is settled in)
    slot: str = ""  # the request's concurrency slots' member (freed when it is settled)
    held: Held = Held.SHARED  # where its admission holds what it took: settled there
    shared_reserved: int = 0  # tokens held in the shared key's utilized, till settled
    # the serving upstream's capacity, its hold, and where it is held
    capacity: tuple[Admission, int, Held] | None = None
    # The API's name (the usage ledger's rows and the metrics are per API); observed
    # (dialproxy.metrics, dialproxy.tracing): what refused the request, when the served
    # attempt was sent, whether it holds a reservation, its spans.
    api: str = ""
    refusal: Exception | None = None
    sent: float = 0.0
    holding: bool = False
    span: Any = None
    attempt_span: Any = None

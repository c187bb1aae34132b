"""The OpenAI Responses API, as DIAL serves it (``responsesEndpoint``, ``interfaces.
openaiResponses``).

Route: ``POST /openai/v1/responses`` (the deployment in the body's ``model``) and the
follow-ups ``GET``/``DELETE /openai/v1/responses/{id}``, ``POST .../{id}/cancel``
(:mod:`dialproxy.web.responses`).  Body rule: ``responsesDefaults`` and ``overrideName``.
Usage: ``input_tokens``/``output_tokens``/``total_tokens`` of the response (in a stream, of
the ``response.completed``, ``.incomplete`` or ``.failed`` event), cached and reasoning
token details kept for the log line.  Errors: DIAL's shape (the openai SDK's).

Ids: the upstream's response id is rewritten, in the answer and in every stream event, to
one of the proxy's own, ``resp_dial_<...>``, that holds what a follow-up needs to reach the
upstream that made the response: the deployment, the upstream (its ``id``, else its place
in the list), the project that made it, whether it runs in the background, and the
upstream's id.  Nothing is stored, so a follow-up works on any instance, after a restart
and with Redis down; a key of another project gets a 404 for it (so does anything else).
The id is not a secret and not signed: it names nothing a caller could not name itself
with ``X-UPSTREAM-ID`` and the upstream's own id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from dialproxy.apis import Api, rewritten, with_defaults
from dialproxy.apis.openai import DIAL_ERRORS, FORWARDED_HEADERS
from dialproxy.errors import BadRequest, NotFound
from dialproxy.logs import cut
from dialproxy.wire import sse
from dialproxy.wire.usage import Usage, UsageRule, counts

if TYPE_CHECKING:
    from dialproxy.config.model import Model, Route, Serving

PREFIX = "resp_dial_"
_MAX_ID = 2048  # an id longer than this is not one of ours
_MAX_UPSTREAM_ID = 512  # an upstream id longer than this is not rewritten (nor followed up)


def body_rule(body: dict[str, Any], raw: bytes, model: Model) -> tuple[bytes | None, bool]:
    """``responsesDefaults`` and ``overrideName``; a ``previous_response_id`` of ours made
    the upstream's again (the request goes to that upstream: :meth:`ResponseIds.route`)."""
    updates = with_defaults(body, model.responses_defaults, model.override_name)
    previous = body.get("previous_response_id")
    if type(previous) is str and (ref := parse(previous)) is not None:
        updates["previous_response_id"] = ref.upstream_id
    return (rewritten(body, raw, updates) if updates else None), False


_COMPACT_ID = b'"response":{"id":"'  # (how OpenAI writes a stream event's response)


def _usage(answer: Any, so_far: Usage | None) -> Usage | None:
    """The usage of a response object, or of a stream event that carries one."""
    if type(answer) is not dict:
        return None
    response = answer.get("response")
    if type(response) is dict:  # a stream event
        answer = response
    obj = answer.get("usage")
    usage = counts(obj, "input_tokens", "output_tokens", "total_tokens")
    if usage is None:
        return None
    assert type(obj) is dict
    details = {}
    for group, name in (
        ("input_tokens_details", "cached_tokens"),
        ("output_tokens_details", "reasoning_tokens"),
    ):
        part = obj.get(group)
        if type(part) is dict and type(value := part.get(name)) is int and value > 0:
            details[name] = value
    return usage._replace(details=details) if details else usage


USAGE = UsageRule(_usage)


class ResponseRef(NamedTuple):
    """What one of our response ids says."""

    deployment: str
    upstream: str  # the upstream's `id`, else "#<index>" in the model's list ("": the endpoint)
    project: str  # a digest of the project that made it
    background: bool
    upstream_id: str  # the upstream's own response id


def digest(response_id: str) -> str:
    """A short name of one of our ids (for a storage key)."""
    return hashlib.sha256(response_id.encode()).hexdigest()[:32]


def project_tag(project: str) -> str:
    return hashlib.sha256(project.encode()).hexdigest()[:16]


def upstream_tag(route: Route, serving: Serving) -> str:
    """How an id names the upstream that made a response."""
    if route.upstream.id is not None:
        return route.upstream.id
    if route.name == "endpoint":
        return ""
    return "#" + route.name.removeprefix("upstreams[").removesuffix("]")


def find_route(serving: Serving, tag: str) -> Route | None:
    """The route an id's upstream tag names (None: the config has it no more)."""
    if tag == "":
        found = [r for r in serving.routes if r.name == "endpoint"]
    elif tag.startswith("#"):
        found = [r for r in serving.routes if r.name == f"upstreams[{tag[1:]}]"]
    else:
        return serving.by_id.get(tag)
    return found[0] if found else None


def mint(ref: ResponseRef) -> str:
    packed = orjson.dumps(list(ref))
    return PREFIX + base64.urlsafe_b64encode(packed).rstrip(b"=").decode()


def parse(response_id: str) -> ResponseRef | None:
    """The parts of one of our ids (None: not one of ours)."""
    if not response_id.startswith(PREFIX) or len(response_id) > _MAX_ID:
        return None
    text = response_id[len(PREFIX) :]
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        return None
    if (
        type(parts) is not list
        or len(parts) != 5
        or not all(type(parts[i]) is str for i in (0, 1, 2, 4))
        or type(parts[3]) is not bool
        or not parts[4]
    ):
        return None
    return ResponseRef(*parts)


@dataclass(slots=True)
class ResponseIds:
    """Rewrites the upstream's response id to ours in one answer (an upstream id not known
    yet is learnt from the answer: a created response's first event, or its body)."""

    deployment: str
    upstream: str
    project: str
    background: bool
    upstream_id: bytes = b""  # as it appears in the JSON (and in an error's message)
    ours: bytes = b""
    previous: ResponseRef | None = None  # the response a new one follows (its upstream's)

    @classmethod
    def of(cls, ref: ResponseRef, ours: str) -> ResponseIds:
        """For a follow-up: both ids known."""
        ids = cls(ref.deployment, ref.upstream, ref.project, ref.background)
        ids.upstream_id = _bare(ref.upstream_id)
        ids.ours = ours.encode()
        return ids

    def served_by(self, route: Route, serving: Serving) -> None:
        self.upstream = upstream_tag(route, serving)

    @property
    def charged_once(self) -> str | None:
        return self.ours.decode() if self.background and self.ours else None

    def route(self, serving: Serving) -> Route | None:
        """The one upstream a request that follows a response may go to: the one that made
        it (None: any; 404 when the config has it no more)."""
        if self.previous is None:
            return None
        found = find_route(serving, self.previous.upstream)
        if found is None:
            raise NotFound("The previous response's upstream is no longer configured")
        return found

    def _learn(self, upstream_id: Any) -> None:
        # (a shorter one may be a word in the text; a longer one would make ours too long)
        if type(upstream_id) is str and 8 <= len(upstream_id) <= _MAX_UPSTREAM_ID:
            ref = ResponseRef(
                self.deployment, self.upstream, self.project, self.background, upstream_id
            )
            self.upstream_id = _bare(upstream_id)
            self.ours = mint(ref).encode()

    def body(self, data: bytes, answer: Any, learn: bool = True) -> bytes:
        """A whole answer (``answer``: decoded, or None when it was not); ``learn``: an id
        not known yet is the answer's (a response made), else nothing is rewritten."""
        if not self.upstream_id and learn:
            if answer is None:
                try:
                    answer = orjson.loads(data)
                except orjson.JSONDecodeError:
                    return data
            if type(answer) is dict:
                self._learn(answer.get("id"))
        return data.replace(self.upstream_id, self.ours) if self.upstream_id else data

    def events(self, data: bytes) -> bytes:
        """Complete stream events."""
        if not self.upstream_id:
            self._learn_from_events(data)
            if not self.upstream_id:
                return data
        return data.replace(self.upstream_id, self.ours)

    def _learn_from_events(self, data: bytes) -> None:
        """The id of the first event with a response in it (``response.created``): read
        where compact JSON writes it first, else from the decoded event."""
        index = data.find(_COMPACT_ID)
        if index >= 0:
            begin = index + len(_COMPACT_ID)
            end = data.find(b'"', begin)
            if end > begin and b"\\" not in data[begin:end]:  # (no escape: the id as it is)
                self._learn(data[begin:end].decode("utf-8", "replace"))
                if self.upstream_id:
                    return
        index = data.find(b'"response"')
        while index >= 0:
            _, stop, event = sse.decoded_event_around(data, index)
            if type(event) is dict and type(response := event.get("response")) is dict:
                self._learn(response.get("id"))
                return
            index = data.find(b'"response"', stop)


def _bare(upstream_id: str) -> bytes:
    """An id as JSON writes it inside a string (replaced wherever it appears)."""
    return orjson.dumps(upstream_id)[1:-1]


def ids_for(body: dict[str, Any], deployment: str, project: str) -> ResponseIds:
    """The ids of a response being created (the upstream's tag is set once one answers).
    A ``previous_response_id`` of ours must be the project's (404) and the deployment's
    (400); another is the upstream's business."""
    tag = project_tag(project)
    ids = ResponseIds(deployment, "", tag, body.get("background") is True)
    previous = body.get("previous_response_id")
    if type(previous) is str and (ref := parse(previous)) is not None:
        if ref.project != tag:
            raise NotFound(f"Previous response with id {previous[:64]!r} not found")
        if ref.deployment != deployment:
            raise BadRequest(
                f"The previous response was made by another deployment ({cut(ref.deployment)})"
            )
        ids.previous = ref
    return ids


RESPONSES = Api(
    name="responses",
    interface="openaiResponses",
    paths=("/openai/v1/responses",),
    body=body_rule,
    usage=USAGE,
    errors=DIAL_ERRORS,
    forwarded_headers=FORWARDED_HEADERS,
    ids=ids_for,
    completion_fields=("max_output_tokens",),
)

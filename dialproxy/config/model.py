"""The config snapshot: frozen value objects, with every index the request path needs.

A snapshot is built once per (re)load by :func:`dialproxy.config.loader.build_snapshot` and
never changes afterwards; a request takes the current one and lives on it to the end.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal, Protocol

from dialproxy.config.schedule import DEFAULT_SCHEDULE, Calendar, Schedule
from dialproxy.errors import Problem as Problem
from dialproxy.errors import Severity as Severity
from dialproxy.text import fingerprint, key_digest
from dialproxy.wire.headers import adapter_headers, direct_key_header

DEPLOYMENT_ID_HEADER = "X-DIAL-DEPLOYMENT-ID"
NANO = 1_000_000_000  # nano-USD in a dollar: cost counters are integers
# The most one request may cost, in nano-USD ($1,000,000): what any price times any count
# comes to stays inside a 64-bit counter and a double's exact integers (Redis's scripts).
MAX_COST_NANO = 10**15

# Token windows and request windows, with their lengths in seconds.  A month is 30 days.
TOKEN_WINDOWS: tuple[tuple[str, int], ...] = (
    ("minute", 60),
    ("day", 86_400),
    ("week", 604_800),
    ("month", 2_592_000),
)
REQUEST_WINDOWS: tuple[tuple[str, int], ...] = (
    ("minute", 60),
    ("hour", 3_600),
    ("day", 86_400),
)
COST_WINDOWS = TOKEN_WINDOWS
# The limit of a window that is counted but not limited (every window of a limited scope is
# counted, so that its use is known).
UNLIMITED = 2**62
# What DIAL answers as the ``total`` of a window with no limit (Java's Long.MAX_VALUE).
LONG_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Window:
    """One counted window: its name (``minute``, ``hour``...), length and limit
    (:data:`UNLIMITED`: counted, not limited).  A day, week or month window has its
    ``calendar``: it resets on the schedule's boundaries (DIAL's ``rateLimitSchedule``),
    ``seconds`` then being its nominal length; the others slide."""

    name: str
    seconds: int
    limit: int
    calendar: Calendar | None = field(default=None, compare=False, repr=False)
    # ``str(limit)``, for the x-ratelimit-limit-* headers of every request
    text: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", str(self.limit))

    @property
    def limited(self) -> bool:
        return self.limit < UNLIMITED


def windows(
    lengths: tuple[tuple[str, int], ...],
    limits: tuple[int | None, ...],
    schedule: Schedule | None = DEFAULT_SCHEDULE,
    every: bool = False,
) -> tuple[Window, ...]:
    """The windows of ``limits`` (None: unlimited; one per entry of ``lengths``): the
    limited ones, or (``every``) all of them; on ``schedule``'s calendar where it has one."""
    calendars = schedule.calendars if schedule is not None else {}
    return tuple(
        Window(name, seconds, UNLIMITED if value is None else value, calendars.get(name))
        for (name, seconds), value in zip(lengths, limits, strict=True)
        if every or value is not None
    )


@dataclass(frozen=True, slots=True)
class Limit:
    """A role's (or a key's) limit for one model; ``None`` means unlimited."""

    minute: int | None = None
    day: int | None = None
    week: int | None = None
    month: int | None = None
    request_minute: int | None = None
    request_hour: int | None = None
    request_day: int | None = None
    concurrent: int | None = None  # requests in flight at once (`concurrentRequests`)

    def token_windows(
        self, schedule: Schedule | None = DEFAULT_SCHEDULE, every: bool = True
    ) -> tuple[Window, ...]:
        """Its token windows: all of them (``every``: DIAL counts every window of a limited
        scope, so its use is known), or only the limited ones."""
        values = (self.minute, self.day, self.week, self.month)
        return windows(TOKEN_WINDOWS, values, schedule, every)

    def request_windows(
        self, schedule: Schedule | None = DEFAULT_SCHEDULE, every: bool = True
    ) -> tuple[Window, ...]:
        values = (self.request_minute, self.request_hour, self.request_day)
        return windows(REQUEST_WINDOWS, values, schedule, every)

    @property
    def limits_anything(self) -> bool:
        """Whether any field is set (an empty entry limits nothing and counts nothing)."""
        return any(
            value is not None
            for value in (
                self.minute,
                self.day,
                self.week,
                self.month,
                self.request_minute,
                self.request_hour,
                self.request_day,
                self.concurrent,
            )
        )

    @property
    def denies(self) -> bool:
        return any(
            value is not None and value <= 0
            for value in (
                self.minute,
                self.day,
                self.week,
                self.month,
                self.request_minute,
                self.request_hour,
                self.request_day,
                self.concurrent,
            )
        )


@dataclass(frozen=True, slots=True)
class Pricing:
    unit: str
    prompt: Decimal
    completion: Decimal
    # The prices in nano-USD per token when whole numbers (as prices per token usually
    # are): the cost is then integer arithmetic, no Decimal on the request path.
    _nano: tuple[int, int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prompt, completion = self.prompt * NANO, self.completion * NANO
        whole = prompt == int(prompt) and completion == int(completion)
        object.__setattr__(self, "_nano", (int(prompt), int(completion)) if whole else None)

    def cost_nano_usd(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Cost in billionths of a dollar (counters are integers)."""
        if self.unit != "token":
            return 0
        if self._nano is not None:
            nano = self._nano[0] * prompt_tokens + self._nano[1] * completion_tokens
            return nano if nano < MAX_COST_NANO else MAX_COST_NANO
        cost = self.prompt * prompt_tokens + self.completion * completion_tokens
        return min(int(cost * NANO), MAX_COST_NANO)


@dataclass(frozen=True, slots=True)
class Upstream:
    endpoint: str
    key: str | None = None
    extra_data: Any = None
    weight: int = 1
    tier: int = 0
    auth: Literal["bearer", "api-key", "x-api-key"] = "bearer"
    id: str | None = None  # what a client's X-UPSTREAM-ID names
    responses_endpoint: str | None = None  # its OpenAI Responses API URL
    # Its own capacity per minute (`limits`): tokens, requests (None: not limited).
    capacity: tuple[int | None, int | None] = (None, None)
    # Names the upstream in logs and in the balancer's state (hashed once, not per request).
    key_fingerprint: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_fingerprint", fingerprint(self.key) if self.key else None)

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Upstream:
        """An upstream as the config writes it (checked by the loader)."""
        return cls(
            endpoint=raw["endpoint"],
            key=raw.get("key"),
            extra_data=raw.get("extraData"),
            weight=int(raw.get("weight", 1)),
            tier=int(raw.get("tier", 0)),
            auth=raw.get("auth", "bearer"),
            id=raw.get("id"),
            responses_endpoint=raw.get("responsesEndpoint"),
            capacity=_capacity(raw.get("limits")),
        )


def _capacity(raw: Any) -> tuple[int | None, int | None]:
    """An upstream's ``limits`` (tokens and requests per minute), as checked by the schema."""
    if not isinstance(raw, Mapping):
        return None, None
    tokens, requests = raw.get("minute"), raw.get("requestMinute")
    return (
        int(tokens) if tokens is not None else None,
        int(requests) if requests is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Route:
    """One place a model's requests go, with what every request to it carries."""

    upstream: Upstream
    url: str  # where the request is POSTed
    headers: Mapping[str, str] = field(repr=False)  # the upstream's key, or DIAL's X-UPSTREAM-*
    name: str = "endpoint"  # in logs: "upstreams[<index>]" or "endpoint", never a URL or key
    append_path: bool = False  # an `interfaces` base URL: the request's own path goes after it


# The interface types of DIAL's `interfaces` map, in the order listings report them, and the
# one each proxied API belongs to.
INTERFACE_TYPES = (
    "openaiChatCompletions",
    "openaiEmbeddings",
    "openaiResponses",
    "anthropicMessages",
)
API_INTERFACES = {
    "chat/completions": "openaiChatCompletions",
    "completions": "openaiChatCompletions",
    "embeddings": "openaiEmbeddings",
    "responses": "openaiResponses",
    "messages": "anthropicMessages",
    "messages/count_tokens": "anthropicMessages",
}
# The APIs a model's legacy `endpoint` serves (verbatim); `responsesEndpoint` serves
# "responses"; the Anthropic Messages API is served by `interfaces` (or directly) only.
ENDPOINT_APIS = frozenset({"chat/completions", "completions", "embeddings"})
ANTHROPIC_APIS = frozenset({"messages", "messages/count_tokens"})


@dataclass(frozen=True, slots=True)
class Interface:
    """One entry of a model's ``interfaces``: where it is served, and its headers."""

    base_url: str | None  # None: not served by dialproxy (no base URL, or a translator)
    default_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Serving:
    """How a model serves one API (chat/completions, completions, embeddings): its routes,
    the default headers its requests get, and its upstreams by ``id``."""

    routes: tuple[Route, ...]
    default_headers: tuple[tuple[str, str], ...] = ()  # (lowercased name, value)
    by_id: Mapping[str, Route] = field(default_factory=dict)


def _upstream_headers(upstream: Upstream, direct: bool, api: str) -> dict[str, str]:
    """A direct upstream: its key (where its ``auth`` says).  Through the model's endpoint
    (DIAL's adapter shape): the upstream in ``X-UPSTREAM-ENDPOINT`` (for the Responses API
    its ``responsesEndpoint``), ``-KEY`` and ``-EXTRA-DATA``."""
    if direct:
        return dict([direct_key_header(upstream.auth, upstream.key)]) if upstream.key else {}
    endpoint = upstream.endpoint
    if api == "responses" and upstream.responses_endpoint is not None:
        endpoint = upstream.responses_endpoint
    return adapter_headers(endpoint, upstream.key, upstream.extra_data)


def _route_variant(api: str, direct: bool) -> str:
    """What makes one API's routes differ from another's to the same URL: a direct model's
    upstream URL and key header; an adapter's ``X-UPSTREAM-ENDPOINT`` (Responses)."""
    if direct:
        return (
            api
            if api in ("responses", "messages/count_tokens")
            else ("messages" if api in ANTHROPIC_APIS else "")
        )
    return "responses" if api == "responses" else ""


def _direct_url(upstream: Upstream, api: str) -> str | None:
    """Where a direct model sends ``api`` to ``upstream`` (None: it does not serve it): the
    Responses API to its ``responsesEndpoint``; the Messages API to an ``x-api-key``
    upstream's ``endpoint`` (token counts to its ``/count_tokens``); the others to the
    ``endpoint`` of any other upstream."""
    if api == "responses":
        return upstream.responses_endpoint
    anthropic = upstream.auth == "x-api-key"
    if api in ANTHROPIC_APIS:
        if not anthropic:
            return None
        return (
            upstream.endpoint.rstrip("/") + "/count_tokens"
            if api != "messages"
            else upstream.endpoint
        )
    return None if anthropic else upstream.endpoint


# The APIs an application serves: DIAL calls an application for chat completions only.
APPLICATION_APIS = frozenset({"chat/completions"})


@dataclass(frozen=True, slots=True)
class Model:
    """A deployment dialproxy serves: a model of ``models``, or an application of
    ``applications`` (``kind``), which the request path serves the same way: an
    application is a model with an ``endpoint`` (or ``interfaces``) and no upstreams."""

    name: str
    type: str  # chat | completion | embedding
    endpoint: str | None
    upstreams: tuple[Upstream, ...]
    display_name: str | None = None
    display_version: str | None = None
    icon_url: str | None = None
    description: str | None = None
    user_roles: frozenset[str] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    override_name: str | None = None
    forward_auth_token: bool = False
    token_limits: Mapping[str, int] = field(default_factory=dict)
    pricing: Pricing | None = None
    features: Mapping[str, Any] = field(default_factory=dict)
    tokenizer_model: str | None = None
    max_retry_attempts: int = 5
    input_attachment_types: tuple[str, ...] = ()
    max_input_attachments: int | None = None
    description_keywords: tuple[str, ...] = ()
    interfaces: Mapping[str, Interface] = field(default_factory=dict)
    default_headers: Mapping[str, str] = field(default_factory=dict)
    responses_endpoint: str | None = None
    responses_defaults: Mapping[str, Any] = field(default_factory=dict)
    kind: Literal["model", "application"] = "model"
    reference: str | None = None  # an application's `reference`, listed (default: its name)
    # Where requests can go: the weighted upstreams, or the endpoint alone.
    routes: tuple[Route, ...] = field(init=False, repr=False, compare=False)
    # How each proxied API is served; an API that is absent is not served (503).
    serving: Mapping[str, Serving] = field(init=False, repr=False, compare=False)
    # No `endpoint`, `responsesEndpoint` or `interfaces`: our extension, straight to each
    # upstream's URL.
    direct: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (an application without `endpoint` or `interfaces` is not direct: it serves nothing)
        direct = (
            self.endpoint is None
            and self.responses_endpoint is None
            and not self.interfaces
            and self.kind == "model"
        )
        by_url: dict[tuple[str, bool, str], tuple[Route, ...]] = {}

        def routes_to(url: str, append_path: bool, api: str) -> tuple[Route, ...]:
            variant = _route_variant(api, direct)  # what differs in the routes between APIs
            found = by_url.get((url, append_path, variant))
            if found is None:
                found = self._routes(url, append_path, direct, api)
                by_url[(url, append_path, variant)] = found
            return found

        serving: dict[str, Serving] = {}
        for api, kind in API_INTERFACES.items():
            if self.kind == "application" and api not in APPLICATION_APIS:
                continue
            interface = self.interfaces.get(kind)
            legacy = self.endpoint if api in ENDPOINT_APIS else None
            if api == "responses":
                legacy = self.responses_endpoint
            if interface is not None and interface.base_url is not None:
                routes = routes_to(interface.base_url, True, api)
            elif legacy is not None:
                routes = routes_to(legacy, False, api)
            elif direct:
                routes = routes_to("", False, api)
            else:
                continue  # the strict `interfaces` map: this API is not served
            if direct and not any(_direct_url(u, api) is not None for u in self.upstreams):
                continue  # no upstream of a direct model serves this API
            headers = {name.lower(): value for name, value in self.default_headers.items()}
            if interface is not None:  # laid over the model's (names are case-insensitive)
                headers.update((n.lower(), v) for n, v in interface.default_headers.items())
            serving[api] = Serving(
                routes,
                tuple(headers.items()),
                MappingProxyType({r.upstream.id: r for r in routes if r.upstream.id is not None}),
            )
        all_routes: dict[int, Route] = {}
        for s in serving.values():
            for r in s.routes:
                all_routes.setdefault(id(r), r)
        object.__setattr__(self, "routes", tuple(all_routes.values()))
        object.__setattr__(self, "serving", MappingProxyType(serving))
        object.__setattr__(self, "direct", direct)

    def _routes(self, url: str, append_path: bool, direct: bool, api: str) -> tuple[Route, ...]:
        """The routes to one URL (a direct model: to each upstream's own for ``api``).  An
        adapter or application is told the deployment in ``X-DIAL-DEPLOYMENT-ID``, as DIAL
        Core tells it (the client's never passes): aidial-sdk's ``/openai/v1/...`` routes,
        which serve every deployment, pick it by that header."""
        deployment = {} if direct else {DEPLOYMENT_ID_HEADER: self.name}
        if self.upstreams:
            found = []
            for i, u in enumerate(self.upstreams):
                target = _direct_url(u, api) if direct else url
                if u.weight > 0 and target is not None:
                    headers = _upstream_headers(u, direct=direct, api=api) | deployment
                    found.append(Route(u, target, headers, f"upstreams[{i}]", append_path))
            return tuple(found)
        if direct:
            return ()
        return (Route(Upstream(endpoint=url), url, deployment, "endpoint", append_path),)

    def interface_types(self) -> list[str]:
        """The interface types listings report: the declared ones, and a legacy ``endpoint``
        as the one its ``type`` says (``responsesEndpoint`` as ``openaiResponses``)."""
        declared = set(self.interfaces)
        if self.endpoint is not None or (self.direct and "chat/completions" in self.serving):
            kind = "openaiEmbeddings" if self.type == "embedding" else "openaiChatCompletions"
            declared.add(kind)
        if self.responses_endpoint is not None or (self.direct and "responses" in self.serving):
            declared.add("openaiResponses")
        if self.direct and "messages" in self.serving:
            declared.add("anthropicMessages")
        return [kind for kind in INTERFACE_TYPES if kind in declared]

    def admits(self, roles: frozenset[str]) -> bool:
        """DIAL: absent ``userRoles`` = everyone, ``[]`` = nobody, else a role in common."""
        return self.user_roles is None or not self.user_roles.isdisjoint(roles)

    def application_listing(self) -> dict[str, Any]:
        """This application as DIAL lists it (its ApplicationData)."""
        data: dict[str, Any] = {
            "id": self.name,
            "application": self.name,
            "display_name": self.display_name,
            "display_version": self.display_version,
            "icon_url": self.icon_url,
            "description": self.description,
            "reference": self.reference or self.name,
            "owner": "organization-owner",
            "object": "application",
            "status": "succeeded",
            "created_at": 1672534800,
            "updated_at": 1672534800,
            "features": listed_features(self.features),
            "input_attachment_types": list(self.input_attachment_types) or None,
            "max_input_attachments": self.max_input_attachments,
            "defaults": dict(self.defaults) or None,
            "description_keywords": list(self.description_keywords) or None,
        }
        return {k: v for k, v in data.items() if v is not None}

    def listing(self, object_name: str) -> dict[str, Any]:
        """The entry of this model in ``/openai/models`` or ``/openai/deployments``."""
        entry: dict[str, Any] = {
            "id": self.name,
            "model": self.name,
            "object": object_name,
            "owner": "organization-owner",
            "status": "succeeded",
            "created_at": 1672534800,
            "updated_at": 1672534800,
            "lifecycle_status": "generally-available",
            "scale_settings": {"scale_type": "standard"},
            "display_name": self.display_name,
            "display_version": self.display_version,
            "icon_url": self.icon_url,
            "description": self.description,
            "reference": self.name,
            "capabilities": {
                "chat_completion": self.type == "chat",
                "completion": self.type == "completion",
                "embeddings": self.type == "embedding",
                "fine_tune": False,
                "inference": True,
                "scale_types": ["standard"],
            },
            "features": listed_features(self.features),
            "interfaces": self.interface_types(),
            "input_attachment_types": list(self.input_attachment_types),
            "max_input_attachments": self.max_input_attachments,
            "description_keywords": list(self.description_keywords),
        }
        if self.token_limits:
            entry["limits"] = {_snake(k): v for k, v in self.token_limits.items()}
        if self.pricing is not None:
            entry["pricing"] = {
                "unit": self.pricing.unit,
                "prompt": str(self.pricing.prompt),
                "completion": str(self.pricing.completion),
            }
        if self.tokenizer_model:
            entry["tokenizer_model"] = self.tokenizer_model
        return {k: v for k, v in entry.items() if v is not None}


# DIAL's listing of a deployment's ``features`` (FeaturesData): whether each feature
# endpoint is set (never its URL), and the ``*Supported`` flags with DIAL's defaults.
_ENDPOINT_FEATURES = (
    ("rate", "rateEndpoint"),
    ("tokenize", "tokenizeEndpoint"),
    ("truncate_prompt", "truncatePromptEndpoint"),
    ("configuration", "configurationEndpoint"),
)
_FLAG_FEATURES = (
    ("system_prompt", "systemPromptSupported", True),
    ("tools", "toolsSupported", False),
    ("seed", "seedSupported", False),
    ("url_attachments", "urlAttachmentsSupported", False),
    ("folder_attachments", "folderAttachmentsSupported", False),
    ("allow_resume", "allowResume", True),
    ("accessible_by_per_request_key", "accessibleByPerRequestKey", True),
)


def listed_features(features: Mapping[str, Any] | None) -> dict[str, bool]:
    """A config's ``features`` as DIAL lists them: booleans only.  A feature endpoint's URL
    is the operator's (it may name an internal host or carry a token): it is not shown."""
    features = features if isinstance(features, Mapping) else {}
    listed = {name: features.get(url) is not None for name, url in _ENDPOINT_FEATURES}
    for name, flag, default in _FLAG_FEATURES:
        value = features.get(flag)
        listed[name] = value if isinstance(value, bool) else default
    return listed


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


@dataclass(frozen=True, slots=True)
class DialRoute:
    """One entry of the config's ``routes``, ready to match and serve (built by
    :func:`dialproxy.config.routes.build_routes`)."""

    name: str
    patterns: tuple[re.Pattern[str], ...]  # empty: every path
    methods: frozenset[str]  # empty: every method
    user_roles: frozenset[str] | None
    rewrite_path: bool
    response: tuple[int, bytes] | None  # the canned answer: status, body
    order: int
    model: Model  # the upstreams, as the balancer and the limits see them

    def matches_path(self, path: str) -> bool:
        return not self.patterns or any(p.fullmatch(path) for p in self.patterns)

    def admits(self, roles: frozenset[str]) -> bool:
        """DIAL: absent ``userRoles`` = everyone, ``[]`` = nobody, else a role in common."""
        return self.user_roles is None or not self.user_roles.isdisjoint(roles)


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    limits: Mapping[str, Limit] = field(default_factory=dict)
    cost_limit: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a set of roles may do with one model, resolved once by DIAL's rules."""

    model: Model
    limit: Limit | None  # None: unlimited
    denied: bool  # a resolved field <= 0: 403 Access denied
    token_windows: tuple[Window, ...]
    request_windows: tuple[Window, ...]
    concurrency: int | None = None  # requests in flight at once (None: no cap)


@dataclass(frozen=True, slots=True)
class Access:
    """Everything a caller with one set of roles may see and call, precomputed."""

    roles: frozenset[str]
    grants: Mapping[str, Grant]  # only the models these roles may call
    cost_windows: tuple[Window, ...]  # nano-USD limits across the project's models


class Validity(Protocol):
    """What a key's state follows from: a :class:`Key`, or a config file's entry as the
    ``keys`` CLI and the admin API read it."""

    @property
    def disabled(self) -> bool: ...
    @property
    def not_before(self) -> datetime | None: ...
    @property
    def expires_at(self) -> datetime | None: ...


def key_state(key: Validity, now: datetime) -> str:
    """``active``, ``expired``, ``disabled`` or ``not yet valid``: the one rule."""
    if key.disabled:
        return "disabled"
    if key.not_before is not None and now < key.not_before:
        return "not yet valid"
    if key.expires_at is not None and now >= key.expires_at:
        return "expired"
    return "active"


@dataclass(frozen=True, slots=True)
class Key:
    """An API key entry.  ``digest`` is the SHA-256 of the secret; the secret is not kept."""

    digest: str
    fingerprint: str
    project: str
    roles: tuple[str, ...]
    access: Access
    secured: bool = False
    name: str | None = None
    description: str | None = None
    not_before: datetime | None = None
    expires_at: datetime | None = None
    disabled: bool = False
    allowed_ip_ranges: tuple[str, ...] | None = None
    key_limits: Mapping[str, Limit] = field(default_factory=dict)
    models: frozenset[str] | None = None
    can_share: bool = False
    # `allowed_ip_ranges` parsed once (a request's address is checked against these).
    allowed_networks: tuple[IPNetwork, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks = None
        if self.allowed_ip_ranges is not None:
            networks = tuple(_network(r) for r in self.allowed_ip_ranges)
        object.__setattr__(self, "allowed_networks", networks)

    state = key_state  # (the rule itself, as a method: no call in between)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NO_ADDRESS = ipaddress.IPv6Network("::/128")  # (::: no client has it)


def _network(text: str) -> IPNetwork:
    """One ``allowedIpAddressRanges`` entry (checked by the loader; one that is not a
    range admits no client, as before)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return _NO_ADDRESS


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One loaded config: immutable, with its indexes."""

    models: Mapping[str, Model]
    roles: Mapping[str, Role]
    keys: Mapping[str, Key]  # by digest
    retriable_codes: frozenset[int]
    digest: str
    files: tuple[str, ...]
    warnings: tuple[Problem, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # Where the day, week and month windows start (`rateLimitSchedule`).
    schedule: Schedule = DEFAULT_SCHEDULE
    # The config's `routes`, compiled and in `order` (dialproxy.config.routes).
    dial_routes: tuple[DialRoute, ...] = field(default=(), repr=False)

    def key_for_secret(self, secret: str) -> Key | None:
        return self.keys.get(key_digest(secret))

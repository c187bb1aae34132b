"""Process settings: where to listen, which config files, which counter storage, timeouts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dialproxy.wire.sse import MAX_EVENT

MAX_BODY = 16 * 1024 * 1024
MAX_RESPONSE = 64 * 1024 * 1024  # a non-streamed upstream answer, decoded (over it: 502)
STORAGE_FAILURE_POLICIES = ("allow", "deny", "local")
STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix")
METRICS_AUTH = ("none", "key")  # GET /metrics: open, or any key of the config
MAX_WORKERS = 256


# The numeric settings a DIALPROXY_* variable (and a flag) may set: bytes are ints, seconds
# floats.
NUMBERS: dict[str, type[int] | type[float]] = {
    "port": int,
    "metrics_port": int,
    "workers": int,
    "max_response": int,
    "max_event": int,
    "shutdown_timeout": float,
    "header_timeout": float,
    "body_timeout": float,
    "stream_drain": float,
    "slot_lease": float,
    "ledger_flush": float,
    "ledger_retention": int,
}
LOOPS = ("uvloop", "asyncio")
_BOOLEANS = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
_UNITS = {int: "a number of bytes", float: "a number of seconds"}
_WHAT = {
    "port": "a port number",
    "metrics_port": "a port number",
    "workers": "a number of processes",
    "ledger_retention": "a number of days",
}
LEDGER_MODES = ("on", "off")


@dataclass(frozen=True, slots=True)
class Settings:
    config_paths: tuple[str, ...] = ("aidial.config.json",)
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # serving processes on the port (SO_REUSEPORT when over 1)
    storage: str = "memory://"
    storage_failure: str = "local"
    loop: str = "uvloop"  # the event loop: uvloop or asyncio (see LOOPS)
    allow_empty_config: bool = False
    state: str | None = None  # the shared keys' SQLite file (memory counters only)
    watch: bool = True
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    shutdown_timeout: float = 30.0  # SIGTERM's grace for requests in flight (seconds)
    max_body: int = MAX_BODY
    max_response: int = MAX_RESPONSE
    max_event: int = MAX_EVENT  # the most one upstream stream event may hold
    stream_drain: float = 5.0  # how long a stream the client left is still read for usage
    # A connection must send a request's complete headers within this time of opening, or
    # of the previous answer (an idle keep-alive connection is closed after it too).
    header_timeout: float = 10.0
    # A request body that receives no byte for this long is answered 408.
    body_timeout: float = 30.0
    # With Redis: how long a concurrency slot outlives its instance (renewed every third).
    slot_lease: float = 60.0
    # The usage ledger (dialproxy.ledger): on or off; seconds between its writes (the most
    # a crash loses); days of hours kept.
    ledger: str = "on"
    ledger_flush: float = 5.0
    ledger_retention: int = 400
    # GET /metrics (Prometheus): served unless off; on its own port when one is given (else
    # the main port's /metrics); a `key` label per config key when asked (its cardinality);
    # "key": only for a request carrying a key of the config (see METRICS_AUTH).
    metrics: bool = True
    metrics_port: int | None = None
    metrics_key_label: bool = False
    metrics_auth: str = "none"
    # The admin API (dialproxy.web.admin): a key with this role may do everything, one with
    # the viewer role read only.
    admin_role: str = "admin"
    viewer_role: str = "viewer"
    # Of several config files, the one the admin API writes keys to (None: the one file that
    # holds a `keys` section).
    keys_file: str | None = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the setting at fault."""
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, not {self.port}")
        for name in ("max_response", "max_event"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name.replace('_', ' ')} must be at least 1 byte, not {getattr(self, name)}"
                )
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ValueError(f"metrics port must be 1-65535, not {self.metrics_port}")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(
                "metrics port must differ from the port (without --metrics-port, /metrics "
                "is served on the port)"
            )
        if self.metrics_auth not in METRICS_AUTH:
            raise ValueError(
                f"metrics auth must be one of {', '.join(METRICS_AUTH)}, not {self.metrics_auth!r}"
            )
        for name in ("admin_role", "viewer_role"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name.replace('_', ' ')} must not be empty")
        if self.admin_role == self.viewer_role:
            raise ValueError(
                f"admin role and viewer role must differ, not both {self.admin_role!r}"
            )
        if self.keys_file is not None:
            configs = [Path(p).resolve() for p in self.config_paths]
            if Path(self.keys_file).resolve() not in configs:
                raise ValueError(
                    f"keys file must be one of the config files, not {self.keys_file!r}"
                )
        if not 1 <= self.slot_lease <= 3600:  # (NaN fails too)
            raise ValueError(f"slot lease must be 1 to 3600 seconds, not {self.slot_lease}")
        if not 0 <= self.stream_drain <= 3600:  # (NaN fails too)
            raise ValueError(f"stream drain must be 0 to 3600 seconds, not {self.stream_drain}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not 0 < value <= 86400:  # (nan fails too)
                raise ValueError(
                    f"{name.replace('_', ' ')} must be over 0 and at most 86400 seconds, "
                    f"not {value}"
                )
        if self.ledger not in LEDGER_MODES:
            raise ValueError(f"ledger must be on or off, not {self.ledger!r}")
        if not 0.05 <= self.ledger_flush <= 3600:  # (NaN fails too)
            raise ValueError(f"ledger flush must be 0.05 to 3600 seconds, not {self.ledger_flush}")
        if not 1 <= self.ledger_retention <= 100_000:
            raise ValueError(
                f"ledger retention must be 1 to 100000 days, not {self.ledger_retention}"
            )
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, not {self.loop!r}")
        if self.storage_failure not in STORAGE_FAILURE_POLICIES:
            raise ValueError(
                f"storage failure policy must be one of {', '.join(STORAGE_FAILURE_POLICIES)}, "
                f"not {self.storage_failure!r}"
            )
        if not 0 <= self.shutdown_timeout < float("inf"):  # (NaN fails too)
            raise ValueError(
                f"shutdown timeout must be a number of seconds >= 0, not {self.shutdown_timeout}"
            )
        scheme = self.storage.split("://", 1)[0].lower() if "://" in self.storage else ""
        if scheme.removeprefix("async+") not in STORAGE_SCHEMES:
            raise ValueError(
                "storage must be memory://, redis://HOST:PORT/DB, rediss://... or "
                f"redis+unix://..., not {scheme + '://' if scheme else 'that value'}"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1-{MAX_WORKERS}, not {self.workers}")
        if self.workers > 1 and scheme == "memory":
            raise ValueError(
                f"{self.workers} workers need shared counters: with memory:// storage each "
                f"process would keep its own and every limit would be {self.workers} times "
                "looser; use --storage redis://HOST:PORT/DB (or DIALPROXY_STORAGE), or one worker"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Defaults overridden by ``DIALPROXY_*`` variables (flags override these)."""
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        if env.get("DIALPROXY_CONFIG"):
            kwargs["config_paths"] = tuple(
                p.strip() for p in env["DIALPROXY_CONFIG"].split(",") if p.strip()
            )
        if env.get("DIALPROXY_HOST"):
            kwargs["host"] = env["DIALPROXY_HOST"]
        for name, kind in NUMBERS.items():
            variable = "DIALPROXY_" + name.upper()
            if env.get(variable):
                try:
                    kwargs[name] = kind(env[variable])
                except ValueError:
                    what = _WHAT.get(name) or _UNITS[kind]
                    raise ValueError(f"{variable} must be {what}") from None
        if env.get("DIALPROXY_STORAGE"):
            kwargs["storage"] = env["DIALPROXY_STORAGE"]
        if env.get("DIALPROXY_STATE"):
            kwargs["state"] = env["DIALPROXY_STATE"]
        if env.get("DIALPROXY_LOOP"):
            kwargs["loop"] = env["DIALPROXY_LOOP"]
        if env.get("DIALPROXY_LEDGER"):
            kwargs["ledger"] = env["DIALPROXY_LEDGER"]
        if env.get("DIALPROXY_STORAGE_FAILURE"):
            kwargs["storage_failure"] = env["DIALPROXY_STORAGE_FAILURE"]
        for name in ("metrics", "metrics_key_label"):
            variable = "DIALPROXY_" + name.upper()
            if env.get(variable):
                value = env[variable].strip().lower()
                if value not in _BOOLEANS:
                    raise ValueError(f"{variable} must be on or off (true/false, 1/0)")
                kwargs[name] = _BOOLEANS[value]
        for name in ("admin_role", "viewer_role"):
            if env.get("DIALPROXY_" + name.upper()):
                kwargs[name] = env["DIALPROXY_" + name.upper()]
        if env.get("DIALPROXY_KEYS_FILE"):
            kwargs["keys_file"] = env["DIALPROXY_KEYS_FILE"]
        if env.get("DIALPROXY_METRICS_AUTH"):
            kwargs["metrics_auth"] = env["DIALPROXY_METRICS_AUTH"]
        return cls(**kwargs)  # type: ignore[arg-type]

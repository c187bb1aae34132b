"""Process settings: where to listen, which config files, which counter storage, timeouts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    config_paths: tuple[str, ...] = ("aidial.config.json",)
    host: str = "127.0.0.1"
    port: int = 8080
    storage: str = "memory://"
    storage_failure: str = "local"
    allow_empty_config: bool = False
    state: str | None = None  # the shared keys' SQLite file (memory counters only)
    watch: bool = True
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    max_body: int = MAX_BODY
    extra: Mapping[str, str] = field(default_factory=dict)

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
        if env.get("DIALPROXY_PORT"):
            kwargs["port"] = int(env["DIALPROXY_PORT"])
        if env.get("DIALPROXY_STORAGE"):
            kwargs["storage"] = env["DIALPROXY_STORAGE"]
        if env.get("DIALPROXY_STATE"):
            kwargs["state"] = env["DIALPROXY_STATE"]
        if env.get("DIALPROXY_STORAGE_FAILURE"):
            kwargs["storage_failure"] = env["DIALPROXY_STORAGE_FAILURE"]
        return cls(**kwargs)  # type: ignore[arg-type]

"""Config samples shared by the config tests."""

from __future__ import annotations

from typing import Any

# A key secret of 128 bits (hex): long enough not to be warned about.
SECRET = "cf1e2d3c4b5a69788796a5b4c3d2e1f0"

# The variables the shipped example configs reference.
EXAMPLE_ENV = {
    name: f"dummy-{name.lower()}"
    for name in (
        "OPENAI_API_KEY",
        "AZURE_OPENAI_KEY_EAST",
        "AZURE_OPENAI_KEY_WEST",
        "UPSTREAM_KEY_1",
        "UPSTREAM_KEY_2",
        "UPSTREAM_KEY_3",
        "UPSTREAM_KEY_4",
    )
}


def base_config() -> dict[str, Any]:
    """A small valid config that the invalid ones are derived from."""
    return {
        "models": {
            "m": {
                "type": "chat",
                "endpoint": "http://localhost:7001/openai/deployments/m/chat/completions",
                "upstreams": [{"endpoint": "http://localhost:7001", "key": "${UPSTREAM_KEY}"}],
                "pricing": {"unit": "token", "prompt": "0.5", "completion": "1.25"},
            }
        },
        "keys": {SECRET: {"project": "p", "role": "r"}},
        "roles": {"r": {"limits": {"m": {"minute": "100000", "day": 1000000}}}},
    }

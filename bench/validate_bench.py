"""``python -m bench.validate_bench``: how long loading a big config takes.

Generates a config of ``--keys`` keys (10,000) and ``--models`` models (200) with several
roles that limit them (and roles that models admit), then times

- ``build_snapshot`` in this process (bytes to snapshot: parse, ${VAR}, merge, schema,
  cross-checks, every key's access resolved): the median of ``--runs`` runs;
- ``dialproxy validate FILE`` end to end, as CI runs it (a new Python process: imports
  included): the median of ``--runs`` runs.

Prints the figures; exit 0 (it is a measurement, not a test), 1 if the config is invalid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dialproxy.config.loader import build_snapshot
from dialproxy.config.parse import Source

ROLES = [f"team-{i}" for i in range(12)]
UPSTREAM_ENV = {"BENCH_UPSTREAM_KEY": "bench-upstream-key-not-a-secret"}


def generate(keys: int, models: int, seed: int = 7) -> dict[str, Any]:
    """A config shaped like a big deployment: tiers of upstreams, role limits, key options."""
    rnd = random.Random(seed)
    model_names = [f"model-{i:03d}" for i in range(models)]
    config: dict[str, Any] = {
        "models": {
            name: {
                "type": "embedding" if i % 10 == 0 else "chat",
                "displayName": f"Model {i}",
                "upstreams": [
                    {
                        "endpoint": f"https://region-{t}.example.com/v1/chat/completions",
                        "key": "${BENCH_UPSTREAM_KEY}",
                        "tier": t,
                    }
                    for t in range(2)
                ],
                "pricing": {"unit": "token", "prompt": "0.0000015", "completion": "0.000002"},
                "limits": {"maxTotalTokens": 128000},
                **({"userRoles": rnd.sample(ROLES, 4)} if i % 3 == 0 else {}),
            }
            for i, name in enumerate(model_names)
        },
        "roles": {
            "default": {"limits": {m: {"minute": "10000", "day": "100000"} for m in model_names}},
            **{
                role: {
                    "limits": {
                        m: {
                            "minute": str(rnd.randrange(10_000, 1_000_000)),
                            "day": str(rnd.randrange(1_000_000, 100_000_000)),
                            "requestHour": str(rnd.randrange(100, 10_000)),
                        }
                        for m in rnd.sample(model_names, models // 2)
                    },
                    "costLimit": {"day": "50", "month": "1000"},
                }
                for role in ROLES
            },
        },
        "keys": {},
    }
    for k in range(keys):
        secret = hashlib.sha256(f"bench-key-{seed}-{k}".encode()).hexdigest()
        name = f"sha256:{secret}" if k % 2 else secret[:40]
        entry: dict[str, Any] = {"project": f"project-{k % 2000}", "name": f"key {k}"}
        roles = rnd.sample(ROLES, rnd.choice((1, 1, 2, 3)))
        if len(roles) == 1:
            entry["role"] = roles[0]
        else:
            entry["roles"] = roles
        if k % 5 == 0:
            entry["expiresAt"] = "2030-01-01T00:00:00Z"
        if k % 7 == 0:
            entry["allowedIpAddressRanges"] = ["10.0.0.0/8"]
        config["keys"][name] = entry
    return config


def median_of(runs: int, fn: Any) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validate_bench", description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    config = generate(args.keys, args.models)
    data = json.dumps(config, indent=2).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "aidial.config.json"
        path.write_bytes(data)
        source = Source(str(path), data)
        snapshot = build_snapshot([source], UPSTREAM_ENV)  # also warms the schema up
        if snapshot.warnings:
            print(f"unexpected warnings: {snapshot.warnings[:3]}", file=sys.stderr)
        build, build_runs = median_of(args.runs, lambda: build_snapshot([source], UPSTREAM_ENV))

        env = {**os.environ, **UPSTREAM_ENV}
        command = [sys.executable, "-m", "dialproxy", "validate", str(path)]

        def validate() -> None:
            result = subprocess.run(command, env=env, capture_output=True, check=False)
            if result.returncode != 0:
                raise SystemExit(f"validate failed: {result.stdout!r} {result.stderr!r}")

        cli, cli_runs = median_of(args.runs, validate)
        startup, _ = median_of(
            args.runs,
            lambda: subprocess.run(
                [sys.executable, "-c", "import dialproxy.cli"], check=True, env=env
            ),
        )

    role_sets = len({id(k.access) for k in snapshot.keys.values()})
    print(
        f"config: {len(snapshot.keys):,} keys, {len(snapshot.models)} models, "
        f"{len(snapshot.roles)} roles ({role_sets} distinct role sets), {len(data) / 1e6:.1f} MB"
    )
    print(
        f"machine: {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        f"build_snapshot:             median {build:.3f} s  (runs: "
        f"{', '.join(f'{t:.3f}' for t in build_runs)})"
    )
    print(
        f"dialproxy validate (CLI):   median {cli:.3f} s  (runs: "
        f"{', '.join(f'{t:.3f}' for t in cli_runs)})"
    )
    print(f"  of which Python start + imports: {startup:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

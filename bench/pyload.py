"""The fallback load generator when ``wrk`` is absent: keep-alive aiohttp clients in a loop.

``python -m bench.pyload --url U --connections N --seconds S --body JSON --headers JSON``
prints the same ``BENCH_RESULT`` line as the bench's wrk script.  A Python client spends
far more CPU per request than wrk, so on a small machine it lowers every throughput figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def _run(
    url: str, connections: int, seconds: float, body: bytes, headers: dict[str, str]
) -> None:
    latencies: list[float] = []
    errors = {"status": 0, "read": 0}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            errors["status"] += 1
                except aiohttp.ClientError:
                    errors["read"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(int(len(latencies) * p / 100), len(latencies) - 1)] * 1e6

    print(
        f"BENCH_RESULT {len(latencies)} {int(elapsed * 1e6)} {errors['status']} 0 "
        f"{errors['read']} 0 0 {pct(50):.1f} {pct(99):.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload")
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--body", required=True)
    parser.add_argument("--headers", default="{}")
    args = parser.parse_args()
    headers: dict[str, str] = json.loads(args.headers)
    asyncio.run(_run(args.url, args.connections, args.seconds, args.body.encode(), headers))


if __name__ == "__main__":
    main()

"""`dialproxy serve` / `make run` as processes: start-up, a first request, shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai

from dialproxy.server import GC_YOUNG_THRESHOLD, tune_gc
from dialproxy.settings import Settings
from tests.conftest import assert_json_lines_without_secrets, new_key

ROOT = Path(__file__).resolve().parents[1]
DEMO_KEY = "dp-demo-key-change-me"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(int(timeout / 0.05)):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the server did not come up")


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dialproxy", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode()


async def test_shipped_config_serves_a_first_request(tmp_path: Path) -> None:
    """What `make run` does: the shipped config, the demo backend, the demo key."""
    port, demo_port = free_port(), free_port()
    config = (ROOT / "aidial.config.json").read_text().replace("8081", str(demo_port))
    (tmp_path / "aidial.config.json").write_text(config)
    (tmp_path / "schemas").symlink_to(ROOT / "schemas")
    proc = spawn(
        "run-demo",
        "--config",
        str(tmp_path / "aidial.config.json"),
        "--port",
        str(port),
        "--demo-port",
        str(demo_port),
        "--no-watch",
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, proc)
        client = openai.AsyncOpenAI(base_url=base + "/openai/v1", api_key=DEMO_KEY, max_retries=0)
        async with client:
            reply = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "Hello, proxy"}]
            )
            stream = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "Hello"}], stream=True
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            app_reply = await client.chat.completions.create(  # the demo's application
                model="echo-app", messages=[{"role": "user", "content": "Hello, app"}]
            )
        assert reply.choices[0].message.content == "Echo: Hello, proxy"
        assert "".join(parts) == "Echo: Hello"
        assert app_reply.choices[0].message.content == "Echo: Hello, app"
    finally:
        code, err = stop(proc)
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line: JSON
    assert [entry["status"] for entry in lines if entry.get("event") == "request"] == [200] * 3
    assert [entry["event"] for entry in lines][:2] == ["demo_backend_serving", "serving"]
    assert lines[-1]["event"] == "stopping"
    assert DEMO_KEY not in err


async def test_invalid_config_at_start_reports_and_exits(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"m": {"type": "chat", "bogus": 1}}}))
    proc = spawn("serve", "--config", str(bad), "--port", str(free_port()))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f'{bad}: $.models.m: error: unknown field "bogus" in a model' in err.decode()


async def test_settings_from_environment_and_graceful_stop(tmp_path: Path) -> None:
    """DIALPROXY_* variables configure it; SIGTERM lets a streaming request finish."""
    demo_port, port = free_port(), free_port()
    key = new_key()
    models = {
        "models": {
            "echo": {
                "type": "chat",
                "upstreams": [{"endpoint": f"http://127.0.0.1:{demo_port}/v1/chat/completions"}],
            }
        }
    }
    keys = {"keys": {key: {"project": "p", "role": "default"}}}
    (tmp_path / "models.json").write_text(json.dumps(models))
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dialproxy.demo_backend",
            "--port",
            str(demo_port),
            "--chunk-delay",
            "0.05",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc = spawn(
        "serve",
        "--no-watch",
        env={
            "DIALPROXY_CONFIG": f"{tmp_path / 'models.json'},{tmp_path / 'keys.json'}",
            "DIALPROXY_HOST": "127.0.0.1",
            "DIALPROXY_PORT": str(port),
        },
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, proc)
        async with aiohttp.ClientSession() as s:
            words = " ".join(f"w{i}" for i in range(20))  # a stream of about 1 s
            resp = await s.post(
                base + "/openai/deployments/echo/chat/completions",
                json={"messages": [{"role": "user", "content": words}], "stream": True},
                headers={"Api-Key": key},
            )
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            proc.send_signal(signal.SIGTERM)  # while the stream is in flight
            rest = await resp.read()
        assert first.startswith(b"data: ")
        assert rest.endswith(b"data: [DONE]\n\n")
        _, err = proc.communicate(timeout=30)  # it stops by itself once the stream is done
        assert proc.returncode == 0, err.decode()
        assert_json_lines_without_secrets(err.decode())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        backend.terminate()
        backend.wait()


def test_bad_settings_are_a_usage_error_not_a_traceback() -> None:
    for args, env, says in (
        (["--storage", "mongodb://db"], {}, "storage must be memory://"),
        (["--storage-failure", "allow", "--port", "70000"], {}, "port must be 1-65535"),
        ([], {"DIALPROXY_STORAGE_FAILURE": "maybe"}, "storage failure policy must be one of"),
        ([], {"DIALPROXY_PORT": "eighty"}, "DIALPROXY_PORT must be a port number"),
        ([], {"DIALPROXY_MAX_EVENT": "big"}, "DIALPROXY_MAX_EVENT must be a number of bytes"),
        (["--max-event", "0"], {}, "max event must be at least 1 byte"),
        (["--stream-drain", "nan"], {}, "stream drain must be 0 to 3600 seconds"),
        ([], {"DIALPROXY_STREAM_DRAIN": "-1"}, "stream drain must be 0 to 3600 seconds"),
        ([], {"DIALPROXY_LOOP": "twisted"}, "loop must be one of uvloop, asyncio"),
        (["--slot-lease", "0"], {}, "slot lease must be 1 to 3600 seconds"),
        (["--admin-role", "ops", "--viewer-role", "ops"], {}, "admin role and viewer role"),
        ([], {"DIALPROXY_VIEWER_ROLE": " "}, "viewer role must not be empty"),
    ):
        proc = spawn("serve", *args, env=env)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, err
        assert says in err.decode() and "Traceback" not in err.decode()


def test_serving_tunes_the_garbage_collector() -> None:
    """What start-up allocated leaves the collector's reach; young collections run ~14x
    less often (the process's own settings are put back after the test)."""
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 10_000  # the modules, the test session's objects
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_stream_settings_come_from_the_environment() -> None:
    env = {"DIALPROXY_MAX_EVENT": "1000", "DIALPROXY_STREAM_DRAIN": "2.5"}
    settings = Settings.from_env(env)
    assert (settings.max_event, settings.stream_drain) == (1000, 2.5)
    settings = Settings.from_env({"DIALPROXY_ADMIN_ROLE": "root", "DIALPROXY_VIEWER_ROLE": "ro"})
    assert (settings.admin_role, settings.viewer_role) == ("root", "ro")

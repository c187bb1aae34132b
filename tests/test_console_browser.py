"""The console (/console) in a real browser: Debian's chromium driven by Playwright, against
the real proxy process (`dialproxy run-demo`: the proxy and the demo model backend) with a
config of an admin key, a viewer key and a plain key, and the usage ledger flushed every
0.2 s.  A screenshot of each page is saved by every run, to build/screenshots/;
`make screenshots` saves them to docs/screenshots/, which the README shows.

The browser is /usr/bin/chromium (`make browser` installs Debian's package; `make test`
depends on it); Playwright's own browsers are never downloaded.  A missing browser or
Playwright package fails these tests with a message: they are never skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import SECRETS, assert_json_lines_without_secrets, new_key
from tests.test_serve import free_port

try:
    from playwright.async_api import Browser, Download, Page, ViewportSize, async_playwright, expect
except ImportError:  # (failed with a message by the browser fixture, never skipped)
    async_playwright = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
# Where each page's screenshot goes: build/screenshots/ (ignored by git), or the README's
# docs/screenshots/ with `make screenshots` (a test run leaves the work tree as it was).
SCREENSHOTS = Path(os.environ.get("DIALPROXY_SCREENSHOTS") or ROOT / "build" / "screenshots")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP: ViewportSize = {"width": 1280, "height": 860}
PHONE: ViewportSize = {"width": 375, "height": 812}
WAIT = 15_000  # ms: how long a locator waits for what the page shows (not a speed check)


@dataclass
class Server:
    url: str
    config: Path
    admin: str
    viewer: str
    plain: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real proxy and demo backend, as processes, on fresh ports."""
    tmp = tmp_path_factory.mktemp("console")
    port, demo_port = free_port(), free_port()
    admin, viewer, plain = new_key(), new_key(), new_key()
    limits = {"minute": "100000", "day": "1000000", "requestMinute": "600"}
    config = {
        "models": {
            "echo": {
                "type": "chat",
                "displayName": "Echo (the demo backend)",
                "upstreams": [
                    {
                        "id": "demo",
                        "endpoint": f"http://127.0.0.1:{demo_port}/v1/chat/completions",
                        "key": "demo-backend-needs-no-key",
                        "limits": {"minute": 1_000_000},
                    }
                ],
                "pricing": {"unit": "token", "prompt": "0.000001", "completion": "0.000002"},
            }
        },
        "roles": {"default": {"limits": {"echo": limits}}, "admin": {}, "viewer": {}},
        "keys": {
            "sha256:" + _digest(admin): {
                "project": "ops",
                "roles": ["admin", "default"],
                "name": "ops admin",
            },
            "sha256:" + _digest(viewer): {
                "project": "ops",
                "roles": ["viewer", "default"],
                "name": "ops viewer",
            },
            "sha256:" + _digest(plain): {
                "project": "team-a",
                "roles": ["default"],
                "name": "team A app",
                "canShare": True,
            },
        },
    }
    path = tmp / "aidial.config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    log = tmp / "proxy.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dialproxy",
                "run-demo",
                "--config",
                str(path),
                "--port",
                str(port),
                "--demo-port",
                str(demo_port),
                "--state",
                str(tmp / "state.sqlite"),
                "--ledger-flush",
                "0.2",
                "--no-watch",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("the proxy did not come up")
        yield Server(url, path, admin, viewer, plain)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert_json_lines_without_secrets(log.read_text())  # (the browser's secrets too)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        pytest.fail(
            "The Python package playwright is missing: `make install` installs the test "
            "extra (it drives Debian's chromium; `playwright install` is never needed)"
        )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: `make browser` installs Debian's chromium "
            "(apt-get install -y chromium)"
        )
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def open_console(browser: Browser, server: Server, key: str, **context: Any) -> Page:
    """A new tab signed in with ``key`` (typed into the login form, as a person does)."""
    ctx = await browser.new_context(viewport=context.pop("viewport", LAPTOP), **context)
    ctx.set_default_timeout(WAIT)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    # (Chromium logs each answer of 400 or more as "Failed to load resource": the forced
    # calls' 403s are expected; a CSP refusal or a script error is not)
    page.errors = errors  # type: ignore[attr-defined]
    response = await page.goto(server.url + "/console")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("button", name="Log out")).to_be_visible()
    return page


async def download_text(download: Download) -> bytes:
    """The bytes the browser saved."""
    path = await download.path()
    return await asyncio.to_thread(path.read_bytes)


def page_errors(page: Page) -> list[str]:
    """What the page's scripts threw or logged as errors (a refused API call the page
    makes on purpose, such as a 403, logs nothing)."""
    errors: list[str] = page.errors  # type: ignore[attr-defined]
    return [e for e in errors if not e.startswith("Failed to load resource")]


async def shot(page: Page, name: str) -> None:
    await asyncio.to_thread(SCREENSHOTS.mkdir, parents=True, exist_ok=True)
    await page.evaluate(  # (no passing notice in the pictures)
        "(t => { t.style.transition = 'none'; t.classList.remove('show'); })"
        "(document.getElementById('toast'))"
    )
    await page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


async def assert_fits_a_phone(page: Page, what: str = "html") -> None:
    """Nothing of ``what`` (the page, or a dialog) is wider than the phone's screen: no
    sideways scrolling (its tables scroll in their cards)."""
    width, right = await page.locator(what).evaluate(
        "e => [e.scrollWidth, Math.ceil(e.getBoundingClientRect().right)]"
    )
    assert width <= PHONE["width"] and right <= PHONE["width"], (what, width, right)


async def chat(server: Server, key: str, text: str) -> str:
    client = openai.AsyncOpenAI(base_url=server.url + "/openai/v1", api_key=key, max_retries=0)
    async with client:
        reply = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": text}]
        )
    return reply.choices[0].message.content or ""


async def status_with(server: Server, key: str) -> int:
    """The proxy's status for a chat completion with ``key``."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.url + "/openai/deployments/echo/chat/completions",
            headers={"Api-Key": key},
            json={"messages": [{"role": "user", "content": "hi"}]},
        ) as r,
    ):
        return r.status


async def fetch_status(page: Page, path: str, method: str = "GET", etag: str = "") -> int:
    """The status of a call the page's own origin makes with the tab's key (forced: no
    control of the page makes it)."""
    status: int = await page.evaluate(
        """async ([path, method, etag]) => {
            const headers = {"Api-Key": sessionStorage.getItem("dialproxy.apiKey"),
                             "Content-Type": "application/json"};
            if (etag) headers["If-Match"] = etag;
            const body = method === "GET" ? undefined
                : JSON.stringify({project: "x", roles: ["default"]});
            return (await fetch(path, {method, headers, body})).status;
        }""",
        [path, method, etag],
    )
    return status


def key_row(page: Page, fingerprint: str) -> Any:
    return page.locator("tbody tr", has=page.locator(f"code:text-is('{fingerprint}')"))


@pytest.mark.timeout(300)
async def test_admin_creates_uses_rotates_and_revokes_a_key(
    server: Server, browser: Browser
) -> None:
    page = await open_console(browser, server, server.admin, color_scheme="light")
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    await expect(page.get_by_text("ops admin · ops · admin")).to_be_visible()

    # Create: the secret is shown once, in a dialog with a Copy button and a warning.
    await page.get_by_role("link", name="Keys").click()
    await page.get_by_role("button", name="New key").click()
    dialog = page.get_by_role("dialog", name="New key")
    await dialog.get_by_label("Project").fill("web-team")
    await dialog.get_by_label("Roles").fill("no-such-role")  # (refused: the API says why)
    await dialog.get_by_role("button", name="Create key").click()
    await expect(dialog.get_by_role("alert")).to_contain_text("no-such-role")
    await dialog.get_by_label("Roles").fill("default")
    await dialog.get_by_label("Name").fill("browser test key")
    await dialog.get_by_label("Models").fill(" , ")  # (no name in it: every model, as hinted)
    await dialog.get_by_role("button", name="Create key").click()
    shown = page.get_by_role("dialog", name="Key created")
    await expect(shown.get_by_text("Copy this key now.")).to_be_visible()
    secret = await shown.locator("code").inner_text()
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await shown.get_by_role("button", name="Copy").click()
    await expect(shown.get_by_role("button", name="Copied")).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    SECRETS.append(secret)
    fingerprint = _digest(secret)[:8]
    assert secret.startswith("dpk_") and f"Fingerprint {fingerprint}" in await shown.inner_text()
    await shot(page, "console-key-created.png")
    await shown.get_by_role("button", name="Done").click()
    await expect(key_row(page, fingerprint)).to_contain_text("browser test key")
    await expect(page.get_by_role("button", name="New key")).to_be_focused()  # (given back)
    # The config holds its sha256: form only; the browser kept nothing of it.
    assert "sha256:" + _digest(secret) in server.config.read_text()
    assert (
        "models" not in json.loads(server.config.read_text())["keys"]["sha256:" + _digest(secret)]
    )
    assert secret not in server.config.read_text()
    stored = await page.evaluate(
        "JSON.stringify(sessionStorage) + JSON.stringify(localStorage) + document.cookie"
    )
    assert secret not in stored and server.admin in stored
    await page.reload()
    await expect(key_row(page, fingerprint)).to_contain_text("browser test key")
    assert secret not in await page.content()
    # Search and filters
    await page.get_by_label("Search").fill("browser test")
    await expect(page.locator("tbody tr")).to_have_count(1)
    await page.get_by_label("State").select_option("disabled")
    await expect(page.get_by_text("No key matches these filters.")).to_be_visible()
    await page.get_by_label("State").select_option("")
    await page.get_by_label("Search").fill("")
    await page.get_by_label("Role").select_option("viewer")
    await expect(page.locator("tbody tr")).to_have_count(1)
    await expect(page.locator("tbody tr")).to_contain_text("ops viewer")
    await page.get_by_label("Role").select_option("")
    await expect(page.locator("tbody tr")).to_have_count(4)

    # The key works through the proxy, and its usage appears on the page.
    assert await chat(server, secret, "hello from the console test") == (
        "Echo: hello from the console test"
    )
    await page.get_by_role("link", name="Usage").click()
    await page.get_by_label("By").select_option("key")
    row = page.locator("tbody tr", has=page.locator(f"code:text-is('{fingerprint}')"))
    for _ in range(50):  # (the ledger is written every 0.2 s: show again until it is)
        await page.get_by_role("button", name="Show").click()
        await expect(page.get_by_role("heading", name="Usage")).to_be_visible()
        if await row.count():
            break
        await page.wait_for_timeout(200)
    await expect(row).to_contain_text("browser test key")
    cells = await row.locator("td").all_inner_texts()
    assert cells[2] == "1"  # requests
    tokens = int(cells[6])
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Export CSV").click()
    download = await download_info.value
    csv_text = (await download_text(download)).decode()
    assert csv_text.startswith("day,key,requests,errors,prompt_tokens")
    assert f",{fingerprint},1,0," in csv_text
    await shot(page, "console-usage.png")

    # Edit (after a confirmation): the config file and the list say the new name.
    await page.get_by_role("link", name="Keys").click()
    await key_row(page, fingerprint).get_by_role("button", name="Edit").click()
    edit = page.get_by_role("dialog", name=f"Edit key {fingerprint}")
    await edit.get_by_label("Name").fill("browser key, renamed")
    await edit.get_by_label("Models").fill("echo")
    await edit.get_by_label("Own limits (JSON)").fill('{"echo": {"day": "5000"}}')
    await edit.get_by_label("May create shared keys").check()
    await edit.get_by_role("button", name="Save").click()
    confirm_edit = page.get_by_role("dialog", name="Save these changes?")
    await expect(confirm_edit).to_contain_text(
        f"Key {fingerprint}: name, models, limits, canShare will be written"
    )
    await confirm_edit.get_by_role("button", name="Save changes").click()
    await expect(key_row(page, fingerprint)).to_contain_text("browser key, renamed")
    entry = json.loads(server.config.read_text())["keys"]["sha256:" + _digest(secret)]
    assert entry["name"] == "browser key, renamed" and entry["models"] == ["echo"]
    assert entry["limits"] == {"echo": {"day": "5000"}} and entry["canShare"] is True

    await expect(key_row(page, fingerprint)).to_contain_text(f"1 request, {tokens} tokens")

    # Its windows: Escape closes the dialog and focus goes back to the button that opened it.
    details = key_row(page, fingerprint).get_by_role("button", name="Details")
    await details.click()
    windows = page.get_by_role("dialog")
    await expect(windows.get_by_text("tokens per minute (project)")).to_be_visible()
    await expect(windows.get_by_text("tokens per day (key)")).to_be_visible()  # its own
    await expect(windows).to_contain_text("No shared keys.")  # (it may share now)
    await page.keyboard.press("Escape")
    await expect(windows).to_have_count(0)
    await expect(details).to_be_focused()

    # Rotate (after a confirmation): a new secret; the old one works for the overlap.
    await key_row(page, fingerprint).get_by_role("button", name="Rotate").click()
    confirm = page.get_by_role("dialog", name=f"Rotate key {fingerprint}?")
    await expect(confirm.get_by_label("Overlap")).to_have_value("7d")
    await confirm.get_by_role("button", name="Rotate key").click()
    rotated = page.get_by_role("dialog", name="Key rotated: its new secret")
    new_secret = await rotated.locator("code").inner_text()
    SECRETS.append(new_secret)
    await rotated.get_by_role("button", name="Done").click()
    new_fingerprint = _digest(new_secret)[:8]
    await expect(key_row(page, new_fingerprint)).to_contain_text("web-team")
    assert await status_with(server, new_secret) == 200
    assert await status_with(server, secret) == 200

    # Revoke the old one (after a confirmation): the proxy refuses it from now on.
    await key_row(page, fingerprint).get_by_role("button", name="Revoke").click()
    await page.get_by_role("dialog").get_by_role("button", name="Revoke key").click()
    await expect(key_row(page, fingerprint)).to_contain_text("disabled")
    assert await status_with(server, secret) == 401
    assert await status_with(server, new_secret) == 200
    await shot(page, "console-keys.png")

    # Models: upstream state, pricing and the expected-cost calculator.
    await page.get_by_role("link", name="Models").click()
    await expect(page.get_by_role("region", name="echo")).to_contain_text("ok")
    await page.get_by_label("Prompt tokens").fill("1000")
    await page.get_by_label("Completion tokens").fill("500")
    await expect(page.locator("#cost-out")).to_have_text("$0.002000")
    await shot(page, "console-models.png")

    await page.get_by_role("link", name="Overview").click()
    await expect(page.get_by_role("img", name="Requests per hour")).to_be_visible()
    await expect(page.get_by_role("region", name="Top projects (24 h)")).to_contain_text("web-team")
    await page.get_by_role("button", name="Reload config").click()
    await (
        page.get_by_role("dialog", name="Reload the config?")
        .get_by_role("button", name="Reload")
        .click()
    )
    await expect(page.get_by_role("status")).to_have_text(
        "The files hold the config served: nothing to reload"
    )
    await shot(page, "console-overview-light.png")
    await page.emulate_media(color_scheme="dark")  # (prefers-color-scheme)
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(15, 18, 22)"
    await shot(page, "console-overview-dark.png")
    await page.get_by_role("button", name="Switch to the light theme").click()
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(245, 246, 248)"
    await page.get_by_role("button", name="Switch to the dark theme").click()

    # A phone's width: nothing wider than the screen (tables scroll in their cards).
    await page.set_viewport_size(PHONE)
    for name in ("Overview", "Models", "Usage", "Keys"):
        await page.get_by_role("link", name=name).click()
        await expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible()
        await expect(page.locator("tbody tr").first).to_be_visible()  # (its data shown)
        await assert_fits_a_phone(page)
    await shot(page, "console-keys-phone.png")
    await page.get_by_role("button", name="New key").click()
    await expect(page.get_by_role("dialog", name="New key")).to_be_visible()
    await assert_fits_a_phone(page, "dialog")
    await assert_fits_a_phone(page)
    await page.keyboard.press("Escape")
    await expect(page.get_by_role("dialog")).to_have_count(0)

    # Log out: the tab forgets the key.
    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_label("API key")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
    assert page_errors(page) == []


async def test_viewer_sees_every_page_but_cannot_write(server: Server, browser: Browser) -> None:
    page = await open_console(browser, server, server.viewer)
    for name in ("Overview", "Keys", "Models", "Usage"):
        await page.get_by_role("link", name=name).click()
        await expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible()
        for control in ("New key", "Edit", "Rotate", "Revoke", "Reload"):
            await expect(page.get_by_role("button", name=control)).to_have_count(0)
    await page.get_by_role("link", name="Keys").click()
    await expect(page.get_by_text("Read only: a viewer sees the keys")).to_be_visible()
    await expect(page.get_by_role("button", name="Details").first).to_be_visible()
    # Forced: the API refuses the viewer's writes anyway.
    async with (
        aiohttp.ClientSession() as s,
        s.get(server.url + "/v1/admin/keys", headers={"Api-Key": server.viewer}) as r,
    ):
        tag = r.headers["ETag"]
    assert await fetch_status(page, "/v1/admin/keys", "POST", tag) == 403
    assert await fetch_status(page, "/v1/admin/keys/abcdef12", "DELETE", tag) == 403
    assert await fetch_status(page, "/v1/console/overview") == 200
    assert page_errors(page) == []


async def test_plain_key_sees_only_its_own_key(server: Server, browser: Browser) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.url + "/openai/deployments/echo/chat/completions",
            headers={"Api-Key": server.plain},
            json={"messages": [{"role": "user", "content": "from the key itself"}]},
        ) as r,
    ):
        assert r.status == 200
        used = (await r.json())["usage"]
    page = await open_console(browser, server, server.plain)
    await expect(page.get_by_role("heading", name="My key")).to_be_visible()
    # Its usage: the request it made (the ledger is written every 0.2 s: shown again until
    # it is there).
    usage = page.get_by_role("region", name="Usage (last 30 days, this key)")
    for _ in range(50):
        await expect(usage).to_be_visible()
        if await usage.locator("tbody tr", has_text="echo").count():
            break
        await page.wait_for_timeout(200)
        await page.reload()
    tokens = f"{used['total_tokens']:,}"
    cost = used["prompt_tokens"] * 0.000001 + used["completion_tokens"] * 0.000002
    await expect(usage.locator("p")).to_have_text(f"1 request, {tokens} tokens, ${cost:.6f}")
    cells = await usage.locator("tbody tr").all_inner_texts()
    assert cells == [f"echo\t1\t{tokens}\t${cost:.6f}"]
    links = await page.locator("#nav a").all_inner_texts()
    assert links == ["My key"]
    await page.goto(server.url + "/console#/keys")  # (another page's address: its own view)
    await expect(page.get_by_role("heading", name="My key")).to_be_visible()
    await expect(page.get_by_role("heading", name="Keys", exact=True)).to_have_count(0)
    assert await fetch_status(page, "/v1/console/overview") == 403
    assert await fetch_status(page, "/v1/admin/keys") == 403
    assert await fetch_status(page, "/v1/console/usage") == 403

    # Its shared keys: create (the secret shown once), top up, delete.
    await page.get_by_role("button", name="New shared key").click()
    dialog = page.get_by_role("dialog", name="New shared key")
    await dialog.get_by_label("Name").fill("intern")
    await dialog.get_by_label("Token cap").fill("5000")
    await dialog.get_by_role("button", name="Create shared key").click()
    shown = page.get_by_role("dialog", name="Shared key created")
    shared_secret = await shown.locator("code").inner_text()
    SECRETS.append(shared_secret)
    await shown.get_by_role("button", name="Done").click()
    assert await chat(server, shared_secret, "from a shared key") == "Echo: from a shared key"
    await page.get_by_role("button", name="Top up intern").click()
    top_up = page.get_by_role("dialog", name="Top up intern")
    await top_up.get_by_label("Tokens to add").fill("1000")
    await top_up.get_by_role("button", name="Top up").click()
    row = page.locator("tbody tr", has_text="intern")
    await expect(row).to_contain_text("6,000")
    await expect(page.get_by_text("echo · tokens per minute (project)")).to_be_visible()
    await shot(page, "console-my-key.png")
    await page.set_viewport_size(PHONE)
    await assert_fits_a_phone(page)
    await page.set_viewport_size(LAPTOP)
    await page.get_by_role("button", name="Delete intern").click()
    await page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    await expect(page.get_by_text("No shared keys yet.")).to_be_visible()
    assert await status_with(server, shared_secret) == 401
    assert page_errors(page) == []


async def test_console_data_endpoints_refuse_and_answer(server: Server) -> None:
    """What the page reads, as plain HTTP: who may, what bad input gets, the CSV export."""
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + "/v1/console/overview") as r:
            assert r.status == 401
        for path in ("/v1/console/overview", "/v1/console/models", "/v1/console/usage"):
            async with s.get(server.url + path, headers={"Api-Key": server.plain}) as r:
                assert r.status == 403, path
                assert (await r.json())["error"]["message"] == "Admin access denied"
        admin = {"Api-Key": server.admin}
        async with s.get(server.url + "/v1/console/usage?by=week", headers=admin) as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "'by' must be project, key or model"
        async with s.get(server.url + "/v1/console/usage?from=yesterday", headers=admin) as r:
            assert r.status == 400
            assert "'from'" in (await r.json())["error"]["message"]
        async with s.get(server.url + "/v1/console/keys/00000000", headers=admin) as r:
            assert r.status == 404
        async with s.get(server.url + "/v1/console/me", headers={"Api-Key": server.plain}) as r:
            me = await r.json()
        assert me["level"] == "key" and me["project"] == "team-a" and me["canShare"] is True
        async with s.get(server.url + "/v1/console/usage?format=csv", headers=admin) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            assert (await r.text()).startswith("day,project,requests,errors,")
            assert r.headers["Content-Disposition"].startswith('attachment; filename="')
        async with s.get(server.url + "/console/app.js") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
            assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
        for missing in ("/console/nope.js", "/console/..%2Fapp.py"):
            async with s.get(server.url + missing) as r:
                assert r.status == 404, missing


async def test_a_wrong_key_is_refused_and_not_kept(server: Server, browser: Browser) -> None:
    ctx = await browser.new_context(viewport=LAPTOP)
    ctx.set_default_timeout(WAIT)
    page = await ctx.new_page()
    await page.goto(server.url + "/console")
    await page.get_by_label("API key").fill("dp-not-a-key-of-this-proxy")
    await page.keyboard.press("Enter")  # (the form submits from the keyboard)
    await expect(page.get_by_role("alert")).to_have_text(
        "This key is not accepted (unknown, revoked or expired)."
    )
    assert await page.evaluate("sessionStorage.length") == 0
    await expect(page.get_by_role("button", name="Log out")).to_be_hidden()

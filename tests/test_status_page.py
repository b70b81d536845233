"""The live status page (GET /) in a real headless Chromium, against a real supervisor with its HTTP server: the
numbers it shows are the deployment's, data is shown as text and never as markup, and a refused token or a server
that went away is said so while the last numbers stay on screen, marked stale.

Needs Debian's chromium (/usr/bin/chromium) and Playwright for Python (in the test extra; its own browser download
is not used). Without them the tests are skipped, saying which is missing; .ci/run installs both.

The screenshot the README shows is taken here: CARDQ_UPDATE_SCREENSHOT=1 writes it to docs/status-page.png
(otherwise it goes to the test's temp folder only, like everything else a test writes).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest

import cardq
from cardq.running import http_address

from conftest import wait_for
from supervision import Deployment, with_suppressed

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATIC = Path(cardq.__file__).parent / "web" / "static"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
VIEWPORT = {"width": 1200, "height": 900}
WAIT_MS = 60_000  # for the page to show a number: generous, on a shared 2-core machine

@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                   "(pip install -e '.[test]')")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def site(tmp_path: Path):
    # One worker taking one job at a time: while it holds a long job, the jobs submitted after it stay queued.
    d = Deployment(tmp_path, workers={"count": 1, "prefetch": 1, "job_timeout_s": 900.0},
                   http={"enabled": True, "listen": "127.0.0.1:0"})
    try:
        yield d
    finally:
        d.close()


def start(d: Deployment) -> str:
    d.start()
    return wait_for(lambda: http_address(d.loaded.run_dir), 60, what="the HTTP server's address")


def cell(page, table: str, key: str, col: str):
    return page.locator(f'#{table} tr[data-key="{key}"] td[data-col="{col}"]')


def finished_earlier(d: Deployment, now: float) -> tuple[int, int, int]:
    """Jobs that finished over the last 50 minutes, every other minute, through the store with their times (as a
    worker would have stamped them): (done, dead, minutes with a dead job)."""
    from cardq.store import jobs
    from cardq.store.submit import NewJob, submit

    done = dead = dead_minutes = 0
    for minutes_ago in range(50, 0, -2):
        t = now - minutes_ago * 60
        n = 1 + minutes_ago % 5
        submit(d.db, [NewJob(b"{}")] * n, user_id="dave", plan="enterprise", max_attempts=1,
               configured=d.loaded.limit_values(), now=t)
        for k, job in enumerate(jobs.claim(d.db, "earlier", k=n, lease_s=60, now=t)):
            if k == 3:
                jobs.fail(d.db, job.id, job.token, "upstream 503", permanent=True, backoff=jobs.Backoff(1, 1), now=t)
                dead, dead_minutes = dead + 1, dead_minutes + 1
            else:
                jobs.complete(d.db, job.id, job.token, None, now=t)
                done += 1
    return done, dead, dead_minutes


def clear_of_the_hour_turning() -> None:
    """The page shows this hour's paths: start at least 90 s before the hour turns, so it cannot turn meanwhile."""
    wait_for(lambda: 3600 - time.time() % 3600 > 90, 100, interval=1.0, what="the next hour")


def test_the_page_and_its_files_are_served_and_its_script_writes_no_markup(tmp_path):
    """In process, no browser: GET / with a policy that runs only the page's own script, the script and style with
    their types, nothing else from the folder; and the script sets no HTML from data anywhere."""
    import asyncio

    import httpx

    from cardq import logs
    from cardq.web.server import build

    names = ["page.js", "page.css", "index.html", "..%2Fapp.py", ".hidden.js", "nope.js"]

    async def ask(app) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cardq.test") as c:
            return [await c.get("/")] + [await c.get(f"/static/{name}") for name in names]

    cardq.init(tmp_path / "config.toml")
    with cardq.connect(tmp_path / "config.toml", name="test") as q:
        app = build(q, log=logs.get())
        try:
            page, js, css, *others = asyncio.run(ask(app))
        finally:
            app.state.web.close()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="static/page.js"' in page.text and 'href="static/page.css"' in page.text
    for got, kind in ((js, "text/javascript"), (css, "text/css")):
        assert got.status_code == 200 and got.headers["content-type"].startswith(kind)
        assert got.headers["x-content-type-options"] == "nosniff"
    assert [r.status_code for r in others] == [404] * 4, dict(zip(names[2:], others, strict=True))
    script = (STATIC / "page.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(", script)


@pytest.mark.slow
@pytest.mark.timeout(300)  # up to 90 s waiting for a new hour, then a deployment and a browser
def test_the_page_shows_the_deployments_numbers_as_text_and_says_when_they_are_stale(site, browser, tmp_path):
    from playwright.sync_api import expect

    d = site
    clear_of_the_hour_turning()
    done_before, dead_before, dead_minutes = finished_earlier(d, time.time())
    url = start(d)
    with cardq.connect(d.config_path, name="test") as q:
        token = q.create_token("read", "status page test").token
        done = q.submit([{"n": i} for i in range(4)], user="carol", plan="enterprise").ids
        wait_for(lambda: d.statuses(done) == {"done": 4}, 60, what="carol's 4 jobs done")
        [held] = q.submit([{"sleep": 600}], user="bob", plan="enterprise").ids
        wait_for(lambda: d.statuses([held]) == {"processing": 1}, 60, what="the worker holding bob's job")
        q.submit([{"n": i} for i in range(3)], user="alice", plan="enterprise")
        q.set_limit("daily.basic", 42)
        q.record_events([{"path": "/v1/cards", "status": 200 if i else 503, "response_ms": 10.0 * (i + 1),
                          "request_id": f"r{i}"} for i in range(7)]
                        + [{"path": "/healthz", "status": 200, "response_ms": 1.0, "request_id": "h"}])

        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{url}/#token={token}")
        expect(cell(page, "jobs-table", "queued", "jobs")).to_have_text("3", timeout=WAIT_MS)
        expect(page.locator("body")).to_have_attribute("data-state", "fresh")
        assert "token" not in page.url  # taken from the fragment, then removed from the address bar
        assert page.evaluate("localStorage.getItem('cardq.read_token')") == token
        expect(cell(page, "jobs-table", "done", "jobs")).to_have_text(str(4 + done_before))
        expect(cell(page, "jobs-table", "dead", "jobs")).to_have_text(str(dead_before))
        expect(cell(page, "jobs-table", "processing", "jobs")).to_have_text("1")
        expect(cell(page, "users-table", "alice", "queued")).to_have_text("3")
        expect(cell(page, "users-table", "bob", "processing")).to_have_text("1")
        expect(cell(page, "workers-table", "worker-1", "job")).to_have_text(str(held), timeout=WAIT_MS)
        expect(cell(page, "limits-table", "daily.basic", "value")).to_have_text("42")
        expect(cell(page, "limits-table", "daily.basic", "source")).to_have_text("override")
        expect(cell(page, "limits-table", "daily.free", "source")).to_have_text("default")
        expect(cell(page, "paths-table", "/v1/cards", "requests")).to_have_text("7", timeout=WAIT_MS)
        expect(cell(page, "paths-table", "/v1/cards", "5xx")).to_have_text("1")
        expect(cell(page, "paths-table", "/healthz", "requests")).to_have_text("1")
        expect(page.locator("#throughput-total")).to_have_text(
            f"last hour: {4 + done_before} done, {dead_before} dead, 0 cancelled")
        expect(page.locator("#chart rect.dead")).to_have_count(dead_minutes)  # one bar a minute, dead on top
        expect(page.locator('#config-list dd[data-key="version"]')).to_have_text("1")
        expect(page.locator('#config-list dd[data-key="file"]')).to_have_text(str(d.config_path))
        expect(page.locator('#config-list dd[data-key="last reload"]')).to_have_text(
            "none since the supervisor started")
        expect(page.locator("#supervisor-line")).to_have_text(re.compile(r"^supervisor: pid \d+, up .+, workers 1$"))
        shot = tmp_path / "status-page.png"
        page.screenshot(path=str(shot))
        assert struct.unpack(">II", shot.read_bytes()[16:24]) == (VIEWPORT["width"], VIEWPORT["height"])
        if os.environ.get("CARDQ_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, SCREENSHOT)

        # Data is text: a user name and a path made of markup show as what they are, and nothing of theirs runs.
        user = "<img/src=x/onerror=document.body.dataset.pwned=1>"
        path = "/<script>document.body.dataset.pwned=1</script>"
        q.submit([{"n": 0}], user=user, plan="enterprise")
        q.record_events([{"path": path, "status": 200, "response_ms": 5.0, "request_id": "x"}])
        expect(cell(page, "users-table", user, "user")).to_have_text(user, timeout=WAIT_MS)
        expect(cell(page, "paths-table", path, "path")).to_have_text(path, timeout=WAIT_MS)
        assert page.evaluate("document.querySelectorAll('main img, main script').length") == 0
        assert page.evaluate("document.body.dataset.pwned") is None

    # The server goes away: the page says so, keeps the last numbers and marks them stale.
    with_suppressed(os.killpg, d.procs[0].pid, signal.SIGKILL)
    d.procs[0].wait(30)
    expect(page.locator("body")).to_have_attribute("data-state", "stale", timeout=WAIT_MS)
    expect(page.locator("#banner")).to_contain_text("Cannot reach the server since")
    expect(page.locator("#banner")).to_contain_text("(stale)")
    expect(page.locator("#main")).to_have_class(re.compile(r"\bstale\b"))
    expect(cell(page, "jobs-table", "queued", "jobs")).to_have_text("4")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_refused_token_asks_for_another_and_a_failed_reload_is_shown(site, browser):
    from playwright.sync_api import expect

    url = start(site)
    with cardq.connect(site.config_path, name="test") as q:
        token = q.create_token("read").token
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(f"{url}/#token=cq_not-a-token")
    expect(page.locator("#banner")).to_contain_text("The server refused the token (401)", timeout=WAIT_MS)
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    expect(cell(page, "jobs-table", "queued", "jobs")).to_have_text("0", timeout=WAIT_MS)
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#banner")).to_be_hidden()
    page.reload()  # kept in localStorage: no form the second time
    expect(page.locator("body")).to_have_attribute("data-state", "fresh", timeout=WAIT_MS)
    expect(page.locator("#login")).to_be_hidden()

    site.write_config(workers={"count": "many"})  # a reload of this is refused: the old config is kept
    os.kill(site.procs[0].pid, signal.SIGHUP)
    expect(page.locator("#config-error")).to_contain_text("LAST RELOAD FAILED (old config kept):", timeout=WAIT_MS)
    expect(page.locator("#config-error")).to_contain_text('workers.count = "many"')
    expect(page.locator('#config-list dd[data-key="last reload"]')).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d "))
    expect(page.locator('#config-list dd[data-key="version"]')).to_have_text("1")

    page.click("#forget")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("localStorage.getItem('cardq.read_token')") is None

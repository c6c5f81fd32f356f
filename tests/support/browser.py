"""ComfyUI's real frontend in headless Chromium, driven by Playwright over the DevTools protocol.

Chromium is the system's (Debian's `chromium` package; Playwright's own browser download is not
used). `why_no_browser()` says in one line why the browser tests cannot run here, or None.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.server import free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PAGE_READY = "() => !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)"


def chromium_path() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -r requirements-test.txt); the browser tests are SKIPPED"
    if chromium_path() is None:
        return ("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run does it as root); "
                "the browser tests are SKIPPED")
    return None


@dataclass
class Browser:
    """A headless Chromium process and the Playwright connection to it."""
    process: subprocess.Popen
    playwright: Any
    cdp: Any
    profile: Path

    def new_page(self, width: int = 1600, height: int = 1000) -> Any:
        context = self.cdp.contexts[0] if self.cdp.contexts else self.cdp.new_context()
        page = context.new_page()
        page.set_viewport_size({"width": width, "height": height})
        return page

    def stop(self) -> None:
        try:
            self.cdp.close()
        finally:
            self.playwright.stop()
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)


def start_browser(timeout: float = 60.0) -> Browser:
    """Start headless Chromium with a DevTools port on 127.0.0.1 and attach Playwright to it."""
    from playwright.sync_api import sync_playwright
    port = free_port()
    profile = Path(tempfile.mkdtemp(prefix="instantid-chromium-"))
    process = subprocess.Popen(
        [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--remote-debugging-address=127.0.0.1",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "--window-size=1600,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint + "/json/version", timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"Chromium did not open its DevTools port within {timeout:.0f} s "
                                   f"(exit code {process.poll()})")
            time.sleep(0.2)
    playwright = sync_playwright().start()
    try:
        cdp = playwright.chromium.connect_over_cdp(endpoint, timeout=timeout * 1000)
    except Exception:
        playwright.stop()
        process.kill()
        raise
    return Browser(process, playwright, cdp, profile)


def skip_first_run_dialogs(base: Path) -> None:
    """User settings that keep the frontend's first-run template browser closed (it is not an error)."""
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))


def open_comfyui(browser: Browser, url: str, timeout: float = 90.0) -> Any:
    """A page with ComfyUI's frontend loaded and its graph ready; console errors are collected in
    page.console_errors."""
    page = browser.new_page()
    page.console_errors = []
    page.console_lines = []
    page.on("console", lambda message: page.console_lines.append(message.text))
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    page.goto(url, timeout=timeout * 1000)
    page.wait_for_function(PAGE_READY, timeout=timeout * 1000)
    return page


# JavaScript run in the page. Each takes one argument and returns JSON-able data.

LOAD_WORKFLOW = """async (workflow) => {
  await window.app.loadGraphData(workflow);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  return window.app.graph.nodes.map((node) => ({
    id: node.id, type: node.type, title: node.title,
    pos: [node.pos[0], node.pos[1]], size: [node.size[0], node.size[1]],
    collapsed: !!node.flags?.collapsed,
    widgets: (node.widgets ?? []).filter((w) => w.serialize !== false).map((w) => ({name: w.name, value: w.value})),
  }));
}"""

VISIBLE_DIALOGS = """() => [...document.querySelectorAll('.p-dialog, [role="dialog"], .p-toast-message-error')]
  .filter((element) => element.offsetParent !== null || element.getClientRects().length > 0)
  .map((element) => element.innerText.slice(0, 500))"""

TITLE_HEIGHT = "() => window.LiteGraph.NODE_TITLE_HEIGHT"

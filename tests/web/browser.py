"""Helpers for the Playwright browser tests: Debian's Chromium, console-error capture, screenshots.

Never runs ``playwright install``: the tests drive ``/usr/bin/chromium`` (Debian's package). Without it
the browser tests skip with a visible reason, unless ``SANDKEEP_REQUIRE_BROWSER=1`` (CI), which turns the
skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
LAPTOP = {"width": 1366, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path(candidates: list[str | None] | None = None) -> str:
    """The Chromium executable, or skip (fail under SANDKEEP_REQUIRE_BROWSER=1) with the reason."""
    if candidates is None:
        candidates = [os.environ.get("SANDKEEP_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    reason = ("browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium); "
              "set SANDKEEP_CHROMIUM to use another binary")
    if os.environ.get("SANDKEEP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SANDKEEP_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@contextmanager
def launched_browser() -> Iterator[Any]:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - playwright is a dev dependency
        if os.environ.get("SANDKEEP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"playwright is not installed: {exc}")
        pytest.skip(f"playwright is not installed: {exc}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ConsoleLog:
    """Console errors, warnings and uncaught page errors seen by a page.

    The ``open_page`` fixture (tests/web/conftest.py) attaches one to every page it opens and fails the
    test when any problem was seen that the test did not announce beforehand with :meth:`allow`.
    """

    problems: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        def on_console(msg: Any) -> None:
            if msg.type in ("error", "warning"):
                self.problems.append(f"console.{msg.type}: {msg.text} @ {page.url}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.problems.append(f"pageerror: {exc} @ {page.url}"))

    def allow(self, pattern: str) -> None:
        """Expect console problems matching ``pattern`` (e.g. the browser's note about a 403 page)."""
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(a.search(p) for a in self.allowed)]

    def assert_clean(self) -> None:
        problems = self.unexpected()
        assert not problems, "browser console problems:\n" + "\n".join(problems)


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in_with_token(page: Any, base_url: str, token: str) -> None:
    """Use the sign-in form like a person: paste the token, press Enter."""
    page.goto(f"{base_url}/login")
    page.fill("input[name=token]", token)
    page.press("input[name=token]", "Enter")
    page.wait_for_url(lambda url: "/login" not in url)

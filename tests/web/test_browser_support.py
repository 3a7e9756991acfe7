"""The browser tests skip visibly without Chromium, and fail instead when CI requires the browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.web.browser import chromium_path


def test_missing_chromium_skips_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDKEEP_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        chromium_path(["/nonexistent/chromium", None])


def test_missing_chromium_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDKEEP_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="SANDKEEP_REQUIRE_BROWSER=1"):
        chromium_path(["/nonexistent/chromium"])


def test_found_chromium_is_returned(tmp_path: Path) -> None:
    fake = tmp_path / "chromium"
    fake.write_text("")
    assert chromium_path([None, str(fake)]) == str(fake)

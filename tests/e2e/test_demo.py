"""`sandkeep demo` end to end: it must recover the crashed instance with its data and exit 0."""

from __future__ import annotations

import subprocess
import sys


def test_demo_recovers_and_exits_zero() -> None:
    out = subprocess.run([sys.executable, "-m", "sandkeep", "demo", "--timeout", "120"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "RESULT: the data survived the crash" in text
    assert "instance.unexpected_stop_recovery_started" in text
    assert "instance.unexpected_stop_recovery_succeeded" in text
    assert "(recovered): intact" in text
    assert "detection latency" in text and "time to running" in text
    assert "removed the data dir" in text

from __future__ import annotations

import io
import json
import logging

from sandkeep.logs import configure_logging, get_logger


def test_structlog_and_stdlib_records_are_json_lines() -> None:
    out = io.StringIO()
    configure_logging("info", stream=out)
    get_logger("sandkeep.test", instance_id="ins_1").info("instance.started", region="lcl-a")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == "instance.started"
    assert lines[0]["instance_id"] == "ins_1" and lines[0]["region"] == "lcl-a"
    assert lines[0]["level"] == "info" and lines[0]["timestamp"].endswith("Z")
    assert lines[1]["event"] == "Started server process [42]"
    assert lines[1]["logger"] == "uvicorn.error"
    assert len(lines) == 2  # alembic chatter is kept below warning


def test_debug_is_filtered_at_info() -> None:
    out = io.StringIO()
    configure_logging("info", stream=out)
    get_logger().debug("hidden")
    assert out.getvalue() == ""

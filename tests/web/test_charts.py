"""The SVG charts' arithmetic: bucketing events in time and recovery durations in bins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sandkeep.store.records import EventRecord
from sandkeep.web import charts

NOW = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)


def ev(name: str, minutes_ago: float, duration_ms: int | None = None) -> EventRecord:
    return EventRecord(event=name, instance_id="ins_1", at=NOW - timedelta(minutes=minutes_ago),
                       duration_ms=duration_ms)


def test_buckets_cover_the_window_and_count_each_series() -> None:
    events = [ev(charts.STARTED, 5), ev(charts.STARTED, 6), ev(charts.SUCCEEDED, 4), ev(charts.FAILED, 65),
              ev(charts.STARTED, 60 * 25), ev("instance.started", 1)]
    buckets = charts.recovery_buckets(events, NOW, "24h")
    assert len(buckets) == 24
    assert buckets[0].start < NOW - timedelta(hours=23) and buckets[-1].start <= NOW
    assert buckets[-1].start + timedelta(hours=1) > NOW
    assert buckets[-1].counts == {"started": 2, "succeeded": 1, "failed": 0}
    assert buckets[-2].counts == {"started": 0, "succeeded": 0, "failed": 1}
    assert sum(b.counts["started"] for b in buckets) == 2  # the 25 h old one is outside the window


def test_unknown_window_falls_back_to_default() -> None:
    assert len(charts.recovery_buckets([], NOW, "forever")) == 24
    assert len(charts.recovery_buckets([], NOW, "1h")) == 12


def test_duration_bins() -> None:
    events = [ev(charts.SUCCEEDED, 1, 1000), ev(charts.SUCCEEDED, 1, 5000), ev(charts.FAILED, 1, 700_000),
              ev(charts.SUCCEEDED, 1, None), ev(charts.STARTED, 1, 3000)]
    bins = dict(charts.duration_bins(events))
    assert bins["< 5 s"] == 1 and bins["5-10 s"] == 1 and bins["> 10 min"] == 1
    assert sum(bins.values()) == 3


def test_svg_is_well_formed_and_escaped() -> None:
    import xml.etree.ElementTree as ET

    svg = charts.recovery_chart_svg(charts.recovery_buckets([ev(charts.STARTED, 1)], NOW, "1h"), "1h")
    root = ET.fromstring(str(svg))
    assert root.tag.endswith("svg")
    assert root.get("data-started") == "1"
    hist = charts.duration_histogram_svg(charts.duration_bins([ev(charts.SUCCEEDED, 1, 2000)]))
    assert ET.fromstring(str(hist)).get("data-total") == "1"
    assert "&gt; 10 min" in str(hist)


def test_empty_charts_say_so_instead_of_drawing_blank_axes() -> None:
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/2000/svg}"
    chart = ET.fromstring(str(charts.recovery_chart_svg(charts.recovery_buckets([], NOW, "7d"), "7d")))
    notes = [t for t in chart.iter(f"{ns}text") if t.get("data-testid") == "chart-empty"]
    assert [n.text for n in notes] == ["No recoveries in the last 7d"]
    assert chart.find(f"{ns}desc").text == "No recoveries in the last 7d."  # type: ignore[union-attr]
    hist = ET.fromstring(str(charts.duration_histogram_svg(charts.duration_bins([]))))
    notes = [t for t in hist.iter(f"{ns}text") if t.get("data-testid") == "chart-empty"]
    assert [n.text for n in notes] == ["No finished recoveries yet"]
    assert hist.find(f"{ns}title") is not None and hist.find(f"{ns}desc") is not None
    # with data, no empty note
    full = charts.recovery_chart_svg(charts.recovery_buckets([ev(charts.STARTED, 1)], NOW, "7d"), "7d")
    assert "chart-empty" not in str(full)
    assert "chart-empty" not in str(charts.duration_histogram_svg(charts.duration_bins([ev(charts.FAILED, 1, 9)])))


def test_axis_labels_are_split_into_short_lines() -> None:
    hist = str(charts.duration_histogram_svg(charts.duration_bins([])))
    assert '<tspan x="' in hist and ">10-30</tspan>" in hist and ">min</tspan>" in hist
    week = str(charts.recovery_chart_svg(charts.recovery_buckets([], NOW, "7d"), "7d"))
    assert any(f">{day:02d} Feb</tspan>" in week for day in range(22, 29))

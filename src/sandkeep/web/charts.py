"""Server-side SVG charts for the fleet page: recoveries over time and a histogram of their durations.

Both are computed from the event rows (SPEC §9) and rendered as plain, self-contained SVG markup (no
script, no inline styles — colours come from CSS classes in app.css so the page's CSP stays strict).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape

from markupsafe import Markup

from sandkeep.store.records import EventRecord

STARTED = "instance.unexpected_stop_recovery_started"
SUCCEEDED = "instance.unexpected_stop_recovery_succeeded"
FAILED = "instance.unexpected_stop_recovery_failed"
RECOVERY_EVENTS = (STARTED, SUCCEEDED, FAILED)
SERIES = (("started", STARTED), ("succeeded", SUCCEEDED), ("failed", FAILED))

AUTO = "auto"
# window name -> (total span, bucket width); the automatic window's width fits the data (bucket_width)
WINDOWS: dict[str, tuple[timedelta, timedelta | None]] = {
    AUTO: (timedelta(hours=24), None),
    "1h": (timedelta(hours=1), timedelta(minutes=5)),
    "24h": (timedelta(hours=24), timedelta(hours=1)),
    "7d": (timedelta(days=7), timedelta(hours=6)),
}
DEFAULT_WINDOW = AUTO
WINDOW_LABELS = {AUTO: "24h, fit to the data", "1h": "1h", "24h": "24h", "7d": "7d"}
#: bucket widths the automatic window picks from: the narrowest that keeps at most MAX_BUCKETS buckets
NICE_WIDTHS: tuple[timedelta, ...] = tuple(timedelta(minutes=m) for m in (1, 2, 5, 10, 15, 30, 60, 120, 180, 360,
                                                                           720, 1440))
MAX_BUCKETS = 24
MIN_SPAN = timedelta(minutes=10)

# histogram bins: (upper bound in seconds, label); the last bin is open-ended
DURATION_BINS: tuple[tuple[float, str], ...] = (
    (5, "< 5 s"), (10, "5-10 s"), (30, "10-30 s"), (60, "30-60 s"), (120, "1-2 min"), (300, "2-5 min"),
    (600, "5-10 min"), (float("inf"), "> 10 min"),
)


@dataclass(frozen=True)
class Bucket:
    start: datetime
    counts: dict[str, int]
    width: timedelta = timedelta(hours=1)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def bucket_width(span: timedelta) -> timedelta:
    """The narrowest of :data:`NICE_WIDTHS` that splits ``span`` into at most :data:`MAX_BUCKETS` buckets."""
    for width in NICE_WIDTHS:
        if span / width <= MAX_BUCKETS:
            return width
    return NICE_WIDTHS[-1]


def recovery_buckets(events: Iterable[EventRecord], now: datetime, window: str = DEFAULT_WINDOW) -> list[Bucket]:
    """Counts of recoveries started / succeeded / failed per time bucket, oldest bucket first.

    A fixed window (1h, 24h, 7d) has fixed buckets; the automatic one covers the last 24 h but its buckets fit
    the data: from the oldest recovery event in it to now, in the narrowest nice width that keeps at most 24
    buckets (so three recoveries in the last ten minutes are not one hourly bar)."""
    span, width = WINDOWS.get(window, WINDOWS[DEFAULT_WINDOW])
    now = _aware(now)
    by_event = {event: name for name, event in SERIES}
    hits = [(by_event[ev.event], _aware(ev.at)) for ev in events if ev.event in by_event]
    earliest = min((at for _, at in hits if now - span <= at <= now), default=None)
    if width is None:
        width = bucket_width(max(now - earliest, MIN_SPAN) if earliest is not None else span)
    # align bucket edges to multiples of the width so the chart does not jitter between refreshes
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    end = epoch + ((now - epoch) // width + 1) * width
    n = int(span / width)
    if WINDOWS.get(window, WINDOWS[DEFAULT_WINDOW])[1] is None and earliest is not None:  # fit to the data
        n = max(1, math.ceil((end - earliest) / width), math.ceil(MIN_SPAN / width))
    start = end - n * width
    buckets = [Bucket(start=start + i * width, counts={name: 0 for name, _ in SERIES}, width=width)
               for i in range(n)]
    for name, at in hits:
        if start <= at < end:
            buckets[int((at - start) / width)].counts[name] += 1
    return buckets


def duration_bins(events: Iterable[EventRecord]) -> list[tuple[str, int]]:
    """How many finished recoveries (succeeded or failed) fall in each duration bin."""
    counts = [0] * len(DURATION_BINS)
    for ev in events:
        if ev.event not in (SUCCEEDED, FAILED) or ev.duration_ms is None or ev.duration_ms < 0:
            continue
        seconds = ev.duration_ms / 1000
        for i, (upper, _) in enumerate(DURATION_BINS):
            if seconds < upper:
                counts[i] += 1
                break
    return [(label, counts[i]) for i, (_, label) in enumerate(DURATION_BINS)]


def _nice_max(value: int) -> int:
    """The smallest "round" axis maximum >= value that splits into four whole-number ticks."""
    for step in (1, 2, 3, 5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500, 5000):
        if value <= step * 4:
            return step * 4
    return value + (-value % 4)


def _bucket_label(start: datetime, width: timedelta) -> str:
    if width < timedelta(hours=6):
        return start.strftime("%H:%M")
    return start.strftime("%d %b %H:%M")


def _bucket_lines(start: datetime, width: timedelta) -> list[str]:
    """The axis label of a bucket, in at most two short lines (readable when the chart is phone-sized)."""
    if width < timedelta(hours=6):
        return [start.strftime("%H:%M")]
    return [start.strftime("%d %b"), start.strftime("%H:%M")]


def _width_text(width: timedelta) -> str:
    minutes = int(width.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 1440:
        return f"{minutes // 60} h"
    return f"{minutes // 1440} d"


def _bin_lines(label: str) -> list[str]:
    """``"10-30 s"`` -> ``["10-30", "s"]``: the range above its unit, so eight bins fit a phone's width."""
    head, _, unit = label.rpartition(" ")
    return [head, unit] if head else [label]


def _axis_text(x: float, y: float, lines: list[str]) -> str:
    spans = "".join(f'<tspan x="{x:.1f}" dy="{0 if i == 0 else 1.15}em">{escape(line)}</tspan>'
                    for i, line in enumerate(lines))
    return f'<text class="axis" x="{x:.1f}" y="{y:.1f}" text-anchor="middle">{spans}</text>'


def _empty_note(x: float, y: float, text: str) -> str:
    return (f'<text class="empty-note" x="{x:.1f}" y="{y:.1f}" text-anchor="middle" '
            f'data-testid="chart-empty">{escape(text)}</text>')


W = 640
LEFT, RIGHT, TOP = 40, 10, 26
PLOT_H = 184  # both charts: the plot area spans y = TOP .. TOP + PLOT_H
CHART_H = 282  # recovery chart: plot, two-line time labels, legend
HIST_H = 262  # histogram: plot, two-line bin labels
LEGEND_STEP = 200


def _grid(top: int, plot_h: float) -> list[str]:
    out = []
    for i in range(5):  # grid lines and y labels
        value = top * i // 4
        y = TOP + plot_h - plot_h * i / 4
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value}</text>')
    return out


def recovery_chart_svg(buckets: list[Bucket], window: str = DEFAULT_WINDOW) -> Markup:
    width = buckets[0].width if buckets else timedelta(hours=1)
    window = WINDOW_LABELS.get(window, window).split(",")[0]
    totals = {name: sum(b.counts[name] for b in buckets) for name, _ in SERIES}
    top = _nice_max(max((max(b.counts.values()) for b in buckets), default=0))
    plot_w, plot_h = W - LEFT - RIGHT, PLOT_H
    slot = plot_w / max(1, len(buckets))
    bar = max(1.0, (slot - 2) / len(SERIES))
    empty = not any(totals.values())
    if empty:
        summary = f"No recoveries in the last {window}."
    else:
        summary = (f"Recoveries in the last {window}: {totals['started']} started, {totals['succeeded']} "
                   f"succeeded, {totals['failed']} failed. Times are UTC.")
    out = [f'<svg class="chart" viewBox="0 0 {W} {CHART_H}" role="img" aria-labelledby="rc-title rc-desc" '
           f'xmlns="http://www.w3.org/2000/svg" data-started="{totals["started"]}" '
           f'data-succeeded="{totals["succeeded"]}" data-failed="{totals["failed"]}">',
           f'<title id="rc-title">Recoveries over time ({escape(window)})</title>',
           f'<desc id="rc-desc">{escape(summary)}</desc>', *_grid(top, plot_h)]
    label_every = max(1, len(buckets) // 6)
    for i, b in enumerate(buckets):
        x0 = LEFT + i * slot + 1
        for j, (name, _) in enumerate(SERIES):
            count = b.counts[name]
            if count:
                h = plot_h * count / top
                out.append(f'<rect class="bar c-{name}" x="{x0 + j * bar:.1f}" y="{TOP + plot_h - h:.1f}" '
                           f'width="{bar:.1f}" height="{h:.1f}"><title>{count} {name} from '
                           f'{escape(_bucket_label(b.start, width))} UTC</title></rect>')
        if i % label_every == 0:
            out.append(_axis_text(x0 + slot / 2, TOP + plot_h + 24, _bucket_lines(b.start, width)))
    out.append(f'<text class="axis axis-unit" x="{W - RIGHT}" y="{TOP - 8}" text-anchor="end" '
               f'data-testid="time-zone">time (UTC), {escape(_width_text(width))} per bar</text>')
    if empty:
        out.append(_empty_note(LEFT + plot_w / 2, TOP + plot_h / 2, f"No recoveries in the last {window}"))
    lx = LEFT
    for name, _ in SERIES:
        out.append(f'<rect class="c-{name}" x="{lx}" y="{CHART_H - 18}" width="12" height="12"/>')
        out.append(f'<text class="legend" x="{lx + 17}" y="{CHART_H - 7}">{name} ({totals[name]})</text>')
        lx += LEGEND_STEP
    out.append("</svg>")
    return Markup("".join(out))


def duration_histogram_svg(bins: list[tuple[str, int]]) -> Markup:
    top = _nice_max(max((c for _, c in bins), default=0))
    total = sum(c for _, c in bins)
    plot_w, plot_h = W - LEFT - RIGHT, PLOT_H
    slot = plot_w / max(1, len(bins))
    if total:
        summary = f"{total} finished recoveries by duration: " + ", ".join(f"{label}: {c}" for label, c in bins)
    else:
        summary = "No finished recoveries recorded yet."
    out = [f'<svg class="chart" viewBox="0 0 {W} {HIST_H}" role="img" aria-labelledby="rh-title rh-desc" '
           f'xmlns="http://www.w3.org/2000/svg" data-total="{total}">',
           '<title id="rh-title">Recovery durations</title>',
           f'<desc id="rh-desc">{escape(summary)}</desc>', *_grid(top, plot_h)]
    for i, (label, count) in enumerate(bins):
        x0 = LEFT + i * slot + 4
        if count:
            h = plot_h * count / top
            out.append(f'<rect class="bar c-duration" x="{x0:.1f}" y="{TOP + plot_h - h:.1f}" '
                       f'width="{slot - 8:.1f}" height="{h:.1f}"><title>{count} took {escape(label)}</title></rect>')
            out.append(f'<text class="axis" x="{x0 + (slot - 8) / 2:.1f}" y="{TOP + plot_h - h - 4:.1f}" '
                       f'text-anchor="middle">{count}</text>')
        out.append(_axis_text(x0 + (slot - 8) / 2, TOP + plot_h + 24, _bin_lines(label)))
    if not total:
        out.append(_empty_note(LEFT + plot_w / 2, TOP + plot_h / 2, "No finished recoveries yet"))
    out.append("</svg>")
    return Markup("".join(out))

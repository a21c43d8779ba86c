"""Prometheus metrics, written by hand (text exposition format 0.0.4) so the server needs no extra package.

Three kinds, each thread-safe (model work runs in worker threads) and with a fixed, small label set so
series cannot grow without bound: ``Counter``, ``Gauge`` and ``Histogram``. ``Metrics`` holds the server's
series and renders them for ``GET /metrics``.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class _Scalar(_Metric):
    """One float per label set (counters and gauges)."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]
        return self._header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Counter(_Scalar):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._add(amount, labels)


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._add(-amount, labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        # per label set: [count per bucket (non-cumulative, + one for +Inf)], sum, count
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[i] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._series.items())
        lines = self._header()
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts):
                running += n
                le = 'le="' + _num(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return lines


LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """The server's metric families. Label values are route templates and error codes (bounded sets)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "cosyvoice2_requests_total", "HTTP and WebSocket requests handled", ("route", "status")
        )
        self.errors = Counter("cosyvoice2_errors_total", "Requests that ended in an error", ("route", "code"))
        self.rejected = Counter(
            "cosyvoice2_rejected_total", "Requests refused because the slots and the wait queue were full"
        )
        self.first_packet = Histogram(
            "cosyvoice2_first_packet_seconds",
            "Time from request (or first text piece) to the first audio bytes",
            LATENCY_BUCKETS,
            ("route",),
        )
        self.rtf = Histogram(
            "cosyvoice2_rtf", "Real-time factor (compute seconds per audio second)", RTF_BUCKETS, ("route",)
        )
        self.audio_seconds = Counter(
            "cosyvoice2_audio_seconds_total", "Seconds of audio synthesised", ("route",)
        )
        self.active = Gauge("cosyvoice2_active_requests", "Synthesis requests holding a slot now")
        self.queued = Gauge("cosyvoice2_queued_requests", "Requests waiting for a synthesis slot now")
        self.max_queue = Gauge("cosyvoice2_max_queued_requests", "Configured length of the wait queue")
        self.queue_wait = Histogram(
            "cosyvoice2_queue_wait_seconds", "Time queued requests waited for a slot", LATENCY_BUCKETS
        )
        self.active_streams = Gauge(
            "cosyvoice2_active_streams", "Audio streams being sent now (HTTP streaming and WebSocket)"
        )
        self.max_active = Gauge("cosyvoice2_max_active_requests", "Configured number of synthesis slots")
        self.voices = Gauge("cosyvoice2_saved_voices", "Voices in the voice library")
        self.voice_cache = Counter(
            "cosyvoice2_voice_cache_total", "Voice library lookups by cache result", ("result",)
        )

    def families(self) -> list[_Metric]:
        return [
            self.requests,
            self.errors,
            self.rejected,
            self.first_packet,
            self.rtf,
            self.audio_seconds,
            self.active,
            self.queued,
            self.queue_wait,
            self.active_streams,
            self.max_active,
            self.max_queue,
            self.voices,
            self.voice_cache,
        ]

    def render(self) -> str:
        lines: list[str] = []
        for family in self.families():
            lines.extend(family.render())
        return "\n".join(lines) + "\n"

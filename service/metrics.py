"""Prometheus text exposition (format 0.0.4), hand-written: a few gauges and histograms.

Job counts and durations are read from SQL at scrape time, so they are right whichever
process (API thread or Celery worker on another machine) ran the jobs. Render latency is
measured by the API process that serves the renders.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence

RENDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


def _fmt(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
           for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class Histogram:
    """A thread-safe cumulative histogram with optional label sets."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            d = self._data.setdefault(key, [[0] * (len(self.buckets) + 1), 0.0])
            d[0][bisect.bisect_left(self.buckets, value)] += 1
            d[1] += value

    def expose(self) -> list[str]:
        with self._lock:
            data = {k: ([*v[0]], v[1]) for k, v in self._data.items()}
        return histogram_lines(self.name, self.help, self.buckets, data)


def histogram_lines(name: str, help: str, buckets: Sequence[float],
                    data: dict[tuple, tuple[list[int], float]]) -> list[str]:
    """Exposition lines of a histogram: per label set, counts per bucket (+ overflow)."""
    out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
    for key, (counts, total) in sorted(data.items()):
        labels = dict(key)
        acc = 0
        for le, n in zip([*buckets, math.inf], counts, strict=True):
            acc += n
            le_s = "+Inf" if math.isinf(le) else repr(float(le))  # as the official clients
            out.append(f"{name}_bucket{_labels({**labels, 'le': le_s})} {acc}")
        out.append(f"{name}_sum{_labels(labels)} {_fmt(total)}")
        out.append(f"{name}_count{_labels(labels)} {acc}")
    return out


def bucketed(values: Iterable[tuple[str, float]], buckets: Sequence[float], label: str
             ) -> dict[tuple, tuple[list[int], float]]:
    """Histogram data from (label value, observation) pairs."""
    data: dict[tuple, tuple[list[int], float]] = {}
    for lv, v in values:
        counts, total = data.get(((label, lv),), ([0] * (len(buckets) + 1), 0.0))
        counts[bisect.bisect_left(buckets, v)] += 1
        data[((label, lv),)] = (counts, total + v)
    return data


def gauge_lines(name: str, help: str, samples: dict[tuple, float]) -> list[str]:
    out = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    for key, v in sorted(samples.items()):
        out.append(f"{name}{_labels(dict(key))} {_fmt(v)}")
    return out


def counter_lines(name: str, help: str, samples: dict[tuple, float]) -> list[str]:
    out = [f"# HELP {name} {help}", f"# TYPE {name} counter"]
    for key, v in sorted(samples.items()):
        out.append(f"{name}_total{_labels(dict(key))} {_fmt(v)}")
    return out

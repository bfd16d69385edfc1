"""Prometheus text-format metrics: requests, tokens and latency histograms per model (base or adapter).

No client library: the exposition format is a few lines of text (``# HELP``, ``# TYPE``, samples).
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (model, status) -> n
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)  # (model, prompt|completion)
        self.latency: dict[str, list[int]] = {}  # model -> bucket counts
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.rejected = 0

    def observe(self, model: str, status: str, prompt_tokens: int, completion_tokens: int, latency_s: float) -> None:
        with self._lock:
            self.requests[(model, status)] += 1
            self.tokens[(model, "prompt")] += prompt_tokens
            self.tokens[(model, "completion")] += completion_tokens
            counts = self.latency.setdefault(model, [0] * len(BUCKETS))
            for i, b in enumerate(BUCKETS):
                if latency_s <= b:
                    counts[i] += 1
            self.latency_sum[model] += latency_s
            self.latency_count[model] += 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    # duplicates: alike within on purpose (one Prometheus metric family after another).
    def render(self, gauges: dict[str, tuple[str, float]] | None = None) -> str:
        """The exposition text; ``gauges``: name -> (help, value)."""
        with self._lock:
            out = [
                "# HELP finetrace_requests_total Requests answered, by model and status.",
                "# TYPE finetrace_requests_total counter",
            ]
            out += [
                f'finetrace_requests_total{{model="{_esc(m)}",status="{s}"}} {n}'
                for (m, s), n in sorted(self.requests.items())
            ]
            out += [
                "# HELP finetrace_tokens_total Tokens processed, by model and kind (prompt, completion).",
                "# TYPE finetrace_tokens_total counter",
            ]
            out += [
                f'finetrace_tokens_total{{model="{_esc(m)}",kind="{k}"}} {n}'
                for (m, k), n in sorted(self.tokens.items())
            ]
            out += [
                "# HELP finetrace_request_latency_seconds Request latency, by model.",
                "# TYPE finetrace_request_latency_seconds histogram",
            ]
            for m, counts in sorted(self.latency.items()):
                for b, c in zip(BUCKETS, counts):
                    out.append(f'finetrace_request_latency_seconds_bucket{{model="{_esc(m)}",le="{b}"}} {c}')
                out.append(
                    f'finetrace_request_latency_seconds_bucket{{model="{_esc(m)}",le="+Inf"}} {self.latency_count[m]}'
                )
                out.append(f'finetrace_request_latency_seconds_sum{{model="{_esc(m)}"}} {self.latency_sum[m]:.6f}')
                out.append(f'finetrace_request_latency_seconds_count{{model="{_esc(m)}"}} {self.latency_count[m]}')
            out += [
                "# HELP finetrace_rejected_total Requests refused because the queue was full (429).",
                "# TYPE finetrace_rejected_total counter",
                f"finetrace_rejected_total {self.rejected}",
            ]
        for name, (help_, value) in sorted((gauges or {}).items()):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(out) + "\n"

"""`/metrics` in Prometheus' text format: requests, tokens, queue, time to first token, tokens per second.

Counters only grow; the gauges are read from the engine when scraped. Time to first
token is a histogram (cumulative buckets, sum, count) as Prometheus expects.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW_S = 30.0  # tokens/s is measured over the last 30 seconds


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for the tokens/s gauge

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, prompt_tokens: int, completion_tokens: int, time_to_first_token: float | None) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += completion_tokens
            self._recent.append((time.monotonic(), completion_tokens))
            if time_to_first_token is not None:
                self.ttft_sum += time_to_first_token
                self.ttft_count += 1
                for i, bound in enumerate(TTFT_BUCKETS):
                    if time_to_first_token <= bound:
                        self.ttft_buckets[i] += 1

    def tokens_per_second(self) -> float:
        with self._lock:
            cutoff = time.monotonic() - RATE_WINDOW_S
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self, queued: int, active: int) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            lines = ["# HELP gtransformer_requests_total HTTP requests by endpoint and status.",
                     "# TYPE gtransformer_requests_total counter"]
            lines += [f'gtransformer_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP gtransformer_prompt_tokens_total Prompt tokens of finished requests.",
                      "# TYPE gtransformer_prompt_tokens_total counter",
                      f"gtransformer_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP gtransformer_generated_tokens_total Tokens generated.",
                      "# TYPE gtransformer_generated_tokens_total counter",
                      f"gtransformer_generated_tokens_total {self.generated_tokens}",
                      "# HELP gtransformer_queue_length Requests waiting for a decoding slot.",
                      "# TYPE gtransformer_queue_length gauge",
                      f"gtransformer_queue_length {queued}",
                      "# HELP gtransformer_active_requests Requests being decoded.",
                      "# TYPE gtransformer_active_requests gauge",
                      f"gtransformer_active_requests {active}",
                      "# HELP gtransformer_tokens_per_second Generated tokens per second over the last 30 s.",
                      "# TYPE gtransformer_tokens_per_second gauge",
                      f"gtransformer_tokens_per_second {rate:.3f}",
                      "# HELP gtransformer_time_to_first_token_seconds From request to its first token.",
                      "# TYPE gtransformer_time_to_first_token_seconds histogram"]
            lines += [f'gtransformer_time_to_first_token_seconds_bucket{{le="{bound}"}} {count}'
                      for bound, count in zip(TTFT_BUCKETS, self.ttft_buckets)]
            lines += [f'gtransformer_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
                      f"gtransformer_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"gtransformer_time_to_first_token_seconds_count {self.ttft_count}"]
        return "\n".join(lines) + "\n"

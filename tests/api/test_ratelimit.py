"""The per-client token bucket on a clock of the test's own: per key, refilled at the rate, bounded memory."""

from __future__ import annotations

import pytest

from services.api.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_key_has_its_own_bucket() -> None:
    limiter = RateLimiter(per_minute=3, clock=Clock())
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(20.0)  # one token a 20 s
    assert [limiter.take("b") for _ in range(3)] == [0.0, 0.0, 0.0], "b paid for a's requests"
    assert limiter.take("b") > 0


def test_tokens_come_back_at_the_rate_up_to_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock)  # a token every 10 s, at most 2 saved
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(10.0)]
    clock.now += 4.0
    assert limiter.take("a") == pytest.approx(6.0)  # a refused take spends nothing: still 0.4 token
    clock.now += 6.0
    assert limiter.take("a") == 0.0  # one token back after 10 s ...
    assert limiter.take("a") == pytest.approx(10.0)  # ... and only one
    clock.now += 3600.0
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(10.0)]  # an hour saves 2, the burst


def test_the_default_burst_is_the_rate_a_minute_and_at_least_one() -> None:
    assert RateLimiter(per_minute=30).burst == 30.0
    assert RateLimiter(per_minute=30).max_keys == 10_000  # the memory bound: ~1 MB of buckets
    assert RateLimiter(per_minute=0.5).burst == 1.0
    limiter = RateLimiter(per_minute=0, clock=Clock())
    assert limiter.take("a") == 0.0  # the burst's one token ...
    assert limiter.take("a") == float("inf")  # ... and never another


def test_at_max_keys_the_least_recently_seen_key_is_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=1, max_keys=2, clock=clock)
    assert [limiter.take(k) for k in ("a", "b")] == [0.0, 0.0]
    assert limiter.take("a") > 0  # a is now the most recently seen; b the least
    assert limiter.take("c") == 0.0  # a third key: b is forgotten, a is kept
    assert len(limiter._buckets) == 2
    assert limiter.take("a") > 0, "a was forgotten instead of b"
    assert limiter.take("b") == 0.0, "b was remembered beyond max_keys"

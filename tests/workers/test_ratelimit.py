"""The shared rate limiter on a real Redis: budgets, learning, 429s, daily block."""

import time

import pytest

from workers.hubspot import RateLimited
from workers.ratelimit import Deferred, RateLimiter

PORTAL = 62515
# A window short enough to drain within a test.
SHORT_WINDOW_MS = 300


def limiter(redis_client, **overrides) -> RateLimiter:
    options = {
        "default_per_10s": 10,
        "search_per_second": 5,
        "share": 0.9,
        "max_wait_seconds": 0.0,
        "daily_defer_seconds": 3600.0,
    }
    options.update(overrides)
    return RateLimiter(redis_client, **options)


def take(limiter_, n, kind="objects", portal=PORTAL) -> int:
    """How many of ``n`` calls got a slot before the first deferral."""
    for taken in range(n):
        try:
            limiter_.acquire(portal, kind)
        except Deferred:
            return taken
    return n


def headers(maximum, remaining, interval_ms=SHORT_WINDOW_MS, **daily):
    return {
        "max": maximum,
        "remaining": remaining,
        "interval_milliseconds": interval_ms,
        **daily,
    }


def test_before_any_answer_the_default_is_assumed_and_90_percent_spent(redis_client):
    assert take(limiter(redis_client), 20) == 9


def test_the_maximum_is_learned_from_hubspots_headers(redis_client):
    limits = limiter(redis_client)

    limits.observe(PORTAL, "objects", 200, headers(40, 40, interval_ms=10_000))

    assert take(limits, 50) == 36


def test_calls_hubspot_counted_that_the_window_lacks_are_added(redis_client):
    limits = limiter(redis_client)

    # Another integration of the portal spent 15 of 20 in this window.
    limits.observe(PORTAL, "objects", 200, headers(20, 5, interval_ms=10_000))

    assert take(limits, 20) == 3


def test_every_worker_spends_from_the_same_budget(redis_client):
    first, second = limiter(redis_client), limiter(redis_client)

    assert take(first, 5) == 5
    assert take(second, 10) == 4


def test_portals_have_budgets_of_their_own(redis_client):
    limits = limiter(redis_client)

    assert take(limits, 20, portal=1) == 9
    assert take(limits, 20, portal=2) == 9


def test_search_has_a_budget_of_its_own_per_second(redis_client):
    limits = limiter(redis_client)

    assert take(limits, 10, kind="search") == 4
    assert take(limits, 20) == 9

    time.sleep(1.05)
    assert take(limits, 10, kind="search") == 4


def test_a_deferral_says_when_the_window_has_room_again(redis_client):
    limits = limiter(redis_client)
    limits.observe(PORTAL, "objects", 200, headers(10, 10))
    take(limits, 9)

    with pytest.raises(Deferred) as deferred:
        limits.acquire(PORTAL, "objects")

    assert deferred.value.budget == "ten_secondly"
    assert 0 < deferred.value.retry_after <= SHORT_WINDOW_MS / 1000


def test_a_short_wait_is_waited_out_instead_of_deferred(redis_client):
    limits = limiter(redis_client, max_wait_seconds=1.0)
    limits.observe(PORTAL, "objects", 200, headers(10, 10))
    take(limits, 9)

    started = time.monotonic()
    limits.acquire(PORTAL, "objects")

    assert time.monotonic() - started < 1.0
    assert limits.stats()["limiter_waits"] == 1


def test_a_429_fills_the_window_so_no_call_follows_until_it_drains(redis_client):
    limits = limiter(redis_client)
    limits.observe(PORTAL, "objects", 200, headers(10, 8))
    error = RateLimited("too many", status=429, policy="TEN_SECONDLY_ROLLING")

    wait = limits.rate_limited(PORTAL, "objects", error)

    assert wait >= SHORT_WINDOW_MS / 1000
    assert take(limits, 5) == 0
    time.sleep(SHORT_WINDOW_MS / 1000 + 0.05)
    assert take(limits, 20) == 9
    assert limits.stats()["rate_limited"] == 1


def test_a_longer_retry_after_is_honoured(redis_client):
    limits = limiter(redis_client)
    error = RateLimited("slow down", status=429, retry_after=30.0)

    assert limits.rate_limited(PORTAL, "objects", error) == 30.0


def test_a_daily_429_blocks_the_portal_until_the_reset(redis_client):
    limits = limiter(redis_client)
    error = RateLimited("daily", status=429, policy="DAILY")

    assert limits.rate_limited(PORTAL, "objects", error, seconds=600) == 600

    with pytest.raises(Deferred) as deferred:
        limits.acquire(PORTAL, "search")
    assert deferred.value.budget == "daily"
    assert 590 < deferred.value.retry_after <= 600
    assert take(limits, 1, portal=PORTAL + 1) == 1


def test_after_the_reset_a_single_call_probes_while_others_wait(redis_client):
    limits, other = limiter(redis_client), limiter(redis_client)
    limits.rate_limited(
        PORTAL, "objects", RateLimited("daily", status=429, policy="DAILY"), seconds=0.2
    )
    time.sleep(0.25)

    limits.acquire(PORTAL, "objects")  # the probe
    with pytest.raises(Deferred) as deferred:
        other.acquire(PORTAL, "objects")
    assert deferred.value.budget == "daily"

    limits.observe(PORTAL, "objects", 200, headers(10, 9))
    assert take(other, 3) == 3


def test_a_probe_met_by_another_daily_429_blocks_again(redis_client):
    limits = limiter(redis_client)
    daily = RateLimited("daily", status=429, policy="DAILY")
    limits.rate_limited(PORTAL, "objects", daily, seconds=0.2)
    time.sleep(0.25)
    limits.acquire(PORTAL, "objects")

    limits.rate_limited(PORTAL, "objects", daily, seconds=60)

    with pytest.raises(Deferred):
        limits.acquire(PORTAL, "objects")


def test_the_daily_budget_is_spent_only_to_its_share(redis_client):
    limits = limiter(redis_client)

    limits.observe(
        PORTAL, "objects", 200, headers(10, 9, daily=1000, daily_remaining=99)
    )

    with pytest.raises(Deferred) as deferred:
        limits.acquire(PORTAL, "objects")
    assert deferred.value.budget == "daily"


def test_the_usage_report_is_never_held_back(redis_client):
    limits = limiter(redis_client)
    limits.rate_limited(
        PORTAL, "objects", RateLimited("daily", status=429, policy="DAILY")
    )

    limits.acquire(PORTAL, "usage")


def test_a_longer_retry_after_holds_every_worker(redis_client):
    limits, other = limiter(redis_client), limiter(redis_client)
    limits.observe(PORTAL, "objects", 200, headers(10, 10))
    error = RateLimited("slow down", status=429, retry_after=0.6)

    limits.rate_limited(PORTAL, "objects", error)
    time.sleep(SHORT_WINDOW_MS / 1000 + 0.05)

    with pytest.raises(Deferred) as deferred:
        other.acquire(PORTAL, "objects")
    assert deferred.value.retry_after <= 0.6
    time.sleep(0.35)
    assert take(other, 3) == 3

"""HubSpot's rate limits, shared by every worker on every machine through Redis.

Each portal has three budgets (HUBSPOT.md section 5): a rolling ten-second window
for most calls, search's own window of one second, and a daily budget. The
windows are sliding logs in Redis sorted sets, taken and refilled by atomic
scripts that read Redis's own clock, so every worker process on every machine
spends from the same budget.

HubSpot's ``X-HubSpot-RateLimit-*`` headers are the truth: each answer teaches
the limiter the portal's ten-second maximum, and calls HubSpot counted that the
window does not know of (another integration of the same portal, a worker that
lost its state) are added to it. The service spends at most ``share`` of each
budget. ``ASSOCIATOR_RATE_LIMIT_PER_10S`` is only the assumption before the first
answer.

A 429 fills its window, so no worker sends another call until it drains. A DAILY
429 blocks the portal until the budget resets; then a single call probes whether
the limit has cleared while every other waits.

:meth:`RateLimiter.acquire` never sends a call it knows will be refused: it waits
up to ``max_wait_seconds`` for a free slot and otherwise raises
:class:`Deferred`, which the tasks turn into delayed work that costs no attempt.
"""

import math
import secrets
import time

from workers.hubspot import RateLimited, TransientError
from workers.logs import get_logger

log = get_logger(__name__)

PREFIX = "associator:rate:"
STATS_KEY = "associator:stats"

TEN_SECONDLY = "TEN_SECONDLY_ROLLING"
DAILY = "DAILY"
SEARCH_KIND = "search"
# Calls the limiter never holds back: they tell how the budget stands.
UNMETERED_KINDS = frozenset({"usage"})

SEARCH_WINDOW_MS = 1_000
DEFAULT_WINDOW_MS = 10_000
LEARNED_SECONDS = 24 * 3600

# KEYS: window, learned max, learned interval, daily block, probe wanted, probing,
# cooldown (a Retry-After that holds every worker).
# ARGV: default max, share, search window ms (0 for the learned one), member.
# Answers {0, ""} when a slot was taken (or {0, "probe"} for the probe call),
# else {milliseconds to wait, why}.
ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local blocked = redis.call('PTTL', KEYS[4])
if blocked > 0 then
  return {blocked, 'daily'}
end
local cooling = redis.call('PTTL', KEYS[7])
if cooling > 0 then
  return {cooling, 'window'}
end

local probe = false
if redis.call('EXISTS', KEYS[5]) == 1 then
  if not redis.call('SET', KEYS[6], ARGV[4], 'NX', 'PX', ARGV[5]) then
    return {tonumber(ARGV[6]), 'probing'}
  end
  probe = true
end

local window = tonumber(ARGV[3])
if window == 0 then
  window = tonumber(redis.call('GET', KEYS[3]) or ARGV[7])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local max = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
local allowed = math.max(1, math.floor(max * tonumber(ARGV[2])))
local used = redis.call('ZCARD', KEYS[1])
if used < allowed then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  if probe then
    return {0, 'probe'}
  end
  return {0, ''}
end
if probe then
  redis.call('DEL', KEYS[6])
end
local oldest = redis.call('ZRANGE', KEYS[1], used - allowed, used - allowed,
  'WITHSCORES')
return {math.max(1, tonumber(oldest[2]) + window - now), 'window'}
"""

# KEYS: window, learned max, learned interval.
# ARGV: max (or ''), remaining (or ''), interval ms (or ''), search window ms
# (0 for the learned one), default interval ms.
# Learns the maximum and adds the calls HubSpot counted that the window lacks.
OBSERVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', 86400)
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[3], 'EX', 86400)
end
local window = tonumber(ARGV[4])
if window == 0 then
  window = tonumber(redis.call('GET', KEYS[3]) or ARGV[5])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if ARGV[1] == '' or ARGV[2] == '' then
  return 0
end
local counted = tonumber(ARGV[1]) - tonumber(ARGV[2])
local used = redis.call('ZCARD', KEYS[1])
local missing = math.min(counted - used, 10000)
for i = 1, missing do
  redis.call('ZADD', KEYS[1], now, 'hubspot:' .. now .. ':' .. i .. ':' .. used)
end
if missing > 0 then
  redis.call('PEXPIRE', KEYS[1], window)
end
return math.max(missing, 0)
"""


class Deferred(TransientError):
    """No slot in the budget soon enough: do this work later, at no attempt's cost.

    ``retry_after`` says when a slot is expected; ``budget`` names the budget
    (``ten_secondly``, ``search``, ``daily``).
    """

    def __init__(self, message: str, *, retry_after: float, budget: str):
        super().__init__(message, retry_after=retry_after)
        self.budget = budget


class RateLimiter:
    """The shared budgets of every portal; one instance per worker process."""

    def __init__(
        self,
        redis,
        *,
        default_per_10s: int,
        search_per_second: int,
        share: float,
        max_wait_seconds: float,
        daily_defer_seconds: float,
        probe_wait_seconds: float = 5.0,
        probe_lease_seconds: float = 30.0,
        sleep=time.sleep,
    ):
        """``probe_wait_seconds``: how soon a worker that found another probing
        the daily limit asks again; ``probe_lease_seconds``: how long the prober
        holds the right to the one probe call (longer than a call can take)."""
        self.redis = redis
        self.default_per_10s = default_per_10s
        self.search_per_second = search_per_second
        self.share = share
        self.max_wait_seconds = max_wait_seconds
        self.daily_defer_seconds = daily_defer_seconds
        self.probe_wait_seconds = probe_wait_seconds
        self.probe_lease_seconds = probe_lease_seconds
        self._sleep = sleep
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)
        self._observe = redis.register_script(OBSERVE_SCRIPT)

    # Before a call

    def acquire(self, portal_id: int, kind: str) -> None:
        """Take a slot for one call of ``kind``, waiting briefly; else Deferred."""
        if kind in UNMETERED_KINDS:
            return
        keys, default_max, window_ms, budget = self._budget(portal_id, kind)
        deadline = time.monotonic() + self.max_wait_seconds
        waited = 0.0
        while True:
            wait_ms, why = self._acquire(
                keys=[
                    *keys,
                    *self._daily_keys(portal_id),
                    self._cooldown_key(portal_id, kind),
                ],
                args=[
                    default_max,
                    self.share,
                    window_ms,
                    secrets.token_hex(8),
                    round(self.probe_lease_seconds * 1000),
                    round(self.probe_wait_seconds * 1000),
                    DEFAULT_WINDOW_MS,
                ],
            )
            why = _text(why)
            if wait_ms == 0:
                if why == "probe":
                    log.info("daily_limit_probe", portal=portal_id, kind=kind)
                if waited:
                    self._count(portal_id, "limiter_waits")
                    log.info(
                        "rate_limit_waited",
                        portal=portal_id,
                        budget=budget,
                        ms=round(waited * 1000),
                    )
                return

            seconds = wait_ms / 1000
            if why in ("daily", "probing"):
                budget = "daily"
            if why == "window" and time.monotonic() + seconds <= deadline:
                self._sleep(seconds)
                waited += seconds
                continue
            self._count(portal_id, "deferrals")
            raise Deferred(
                f"no {budget} budget left for portal {portal_id} for {seconds:.1f} s",
                retry_after=seconds,
                budget=budget,
            )

    # After an answer

    def observe(self, portal_id: int, kind: str, status: int | None, limits) -> None:
        """Learn from an answer's rate-limit headers (``limits``, may be None)."""
        if kind in UNMETERED_KINDS:
            return
        if status is not None and status != 429:
            self._probe_succeeded(portal_id)
        if not limits or kind == SEARCH_KIND:
            return
        keys, _, window_ms, _ = self._budget(portal_id, kind)
        self._observe(
            keys=keys,
            args=[
                limits.get("max", ""),
                limits.get("remaining", ""),
                limits.get("interval_milliseconds", ""),
                window_ms,
                DEFAULT_WINDOW_MS,
            ],
        )
        daily = limits.get("daily")
        daily_remaining = limits.get("daily_remaining")
        if (
            daily
            and daily_remaining is not None
            and daily_remaining <= daily * (1 - self.share)
        ):
            self.block_daily(portal_id, None, reason="daily_share_spent")

    def rate_limited(
        self,
        portal_id: int,
        kind: str,
        error: RateLimited,
        *,
        seconds: float | None = None,
    ) -> float:
        """Tighten after a 429; answers how long the work should wait.

        ``seconds`` is, for a DAILY 429, the time until the budget resets.
        """
        self._count(portal_id, "rate_limited")
        if error.policy == DAILY:
            return self.block_daily(
                portal_id, seconds or error.retry_after, reason="daily_429"
            )

        keys, default_max, window_ms, budget = self._budget(portal_id, kind)
        learned = self.redis.get(keys[1])
        maximum = int(learned) if learned else default_max
        # The window is full as far as HubSpot is concerned: fill it.
        self._observe(
            keys=keys,
            args=[maximum, 0, "", window_ms, DEFAULT_WINDOW_MS],
        )
        window_seconds = (window_ms or self._window_ms(portal_id)) / 1000
        wait = max(error.retry_after or 0.0, window_seconds)
        if error.retry_after and error.retry_after > window_seconds:
            # HubSpot asked for a longer pause: every worker keeps it.
            self.redis.set(
                self._cooldown_key(portal_id, kind),
                "retry-after",
                px=math.ceil(error.retry_after * 1000),
            )
        log.warning(
            "rate_limited",
            portal=portal_id,
            budget=budget,
            policy=error.policy,
            retry_after=error.retry_after,
            seconds=wait,
        )
        return wait

    def block_daily(
        self, portal_id: int, seconds: float | None, *, reason: str
    ) -> float:
        """Hold every call of the portal for ``seconds`` (default: the defer
        setting), then let one probe call through."""
        seconds = seconds or self.daily_defer_seconds
        block, wanted, probing = self._daily_keys(portal_id)
        pipe = self.redis.pipeline()
        pipe.set(block, reason, px=max(1, math.ceil(seconds * 1000)))
        pipe.set(wanted, "1", ex=LEARNED_SECONDS * 7)
        pipe.delete(probing)
        pipe.execute()
        log.warning(
            "daily_limit_reached", portal=portal_id, reason=reason, seconds=seconds
        )
        return seconds

    def stats(self) -> dict[str, int]:
        """Counts of 429s, waits and deferrals, of every portal."""
        return {k: int(v) for k, v in (self.redis.hgetall(STATS_KEY) or {}).items()}

    # Keys

    def _budget(self, portal_id: int, kind: str):
        """(window keys, default max, fixed window ms or 0, budget name)."""
        if kind == SEARCH_KIND:
            base = f"{PREFIX}{portal_id}:search"
            return (
                [f"{base}:window", f"{base}:max", f"{base}:interval"],
                self.search_per_second,
                SEARCH_WINDOW_MS,
                "search",
            )
        base = f"{PREFIX}{portal_id}:10s"
        return (
            [f"{base}:window", f"{base}:max", f"{base}:interval"],
            self.default_per_10s,
            0,
            "ten_secondly",
        )

    def _cooldown_key(self, portal_id: int, kind: str) -> str:
        budget = "search" if kind == SEARCH_KIND else "10s"
        return f"{PREFIX}{portal_id}:{budget}:cooldown"

    def _window_ms(self, portal_id: int) -> int:
        learned = self.redis.get(f"{PREFIX}{portal_id}:10s:interval")
        return int(learned) if learned else DEFAULT_WINDOW_MS

    def _daily_keys(self, portal_id: int) -> list[str]:
        base = f"{PREFIX}{portal_id}:daily"
        return [f"{base}:blocked", f"{base}:probe-wanted", f"{base}:probing"]

    def _probe_succeeded(self, portal_id: int) -> None:
        _, wanted, probing = self._daily_keys(portal_id)
        if self.redis.delete(wanted):
            self.redis.delete(probing)
            log.info("daily_limit_cleared", portal=portal_id)

    def _count(self, portal_id: int, what: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hincrby(STATS_KEY, what, 1)
        pipe.hincrby(STATS_KEY, f"{what}:{portal_id}", 1)
        pipe.execute()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

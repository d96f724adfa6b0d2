"""What the worker does with queued events.

The Celery task in :mod:`workers.worker` only turns its JSON arguments into a
call of :func:`handle_events`, so the logic is tested without Celery.

Every kept event ends in exactly one recorded outcome: ``applied``, ``skipped``
with a reason, or ``dead_lettered`` with a reason. Until then it is either in a
task or in the delay set (settling, waiting for a recheck or a retry).
"""

import contextlib
import random
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers.credentials import UnknownPortal
from workers.dead_letters import DeadLetterStore
from workers.delays import DelaySet
from workers.events import Event
from workers.hubspot import HubSpotError, PermanentError, RateLimited, TransientError
from workers.labels import LabelResolver
from workers.logs import get_logger
from workers.outcomes import DEAD_LETTERED, SKIPPED, OutcomeStore
from workers.planner import Planner
from workers.ratelimit import DAILY, UNMETERED_KINDS, Deferred, RateLimiter
from workers.rules import RulesError, RuleSet

log = get_logger(__name__)

# A deferral waits at least this long, so that no work spins on a limit.
MIN_DEFER_SECONDS = 0.1


@dataclass
class WorkerContext:
    settings: object
    redis: object
    outcomes: OutcomeStore
    dead_letters: DeadLetterStore
    delays: DelaySet
    rules: RuleSet
    labels: LabelResolver
    # credentials_for(portal_id) -> HubSpotClient | None; raises UnknownPortal.
    credentials_for: object
    credentials: object = None
    limiter: RateLimiter | None = None


DELIVERIES_PREFIX = "associator:deliveries:"
DELIVERIES_TTL_SECONDS = 24 * 3600


_WAITS = (RateLimited, Deferred)


class CallBudgetSpent(TransientError):
    """A task made its most calls; the rest of its work goes to another task."""


def handle_events(
    raw_events: list[dict], *, context: WorkerContext, task_id: str, meta=None
):
    meta = dict(meta or {})
    events = [Event.from_json(raw) for raw in raw_events]
    log.info(
        "events_picked_up",
        task=task_id,
        events=len(events),
        reason=meta.get("reason", "delivery"),
        attempt=meta.get("attempt", 0),
    )

    # An event decided by an earlier delivery of the same work is not redone; a
    # replayed dead letter redoes its events that are still dead-lettered.
    decided = context.outcomes.get_many([e.dedup_key for e in events])
    redo = DEAD_LETTERED if meta.get("replay") else None
    events = [
        e
        for e, outcome in zip(events, decided, strict=True)
        if not outcome or outcome.get("outcome") == redo
    ]
    events = _settle(events, context, meta)

    by_portal: dict[int, list[Event]] = defaultdict(list)
    for event in events:
        by_portal[event.portal_id].append(event)
    for portal_id, group in by_portal.items():
        _plan_portal(portal_id, group, context=context, task_id=task_id, meta=meta)


def _settle(events: list[Event], context: WorkerContext, meta) -> list[Event]:
    """Keep the events old enough to be found by search; delay the others."""
    settle = context.settings.settle_seconds
    now = time.time()
    young = [e for e in events if e.occurred_at and e.occurred_at / 1000 + settle > now]
    if young:
        due = max(e.occurred_at for e in young) / 1000 + settle
        context.delays.add(
            [e.to_json() for e in young], due_at=due, reason="settle", meta=meta
        )
        log.info("events_settling", events=len(young), seconds=round(due - now, 1))
    young_keys = {e.dedup_key for e in young}
    return [e for e in events if e.dedup_key not in young_keys]


def _plan_portal(portal_id, events, *, context: WorkerContext, task_id, meta):
    started = time.monotonic()
    try:
        client = context.credentials_for(portal_id)
    except UnknownPortal as exc:
        for event in events:
            _dead_letter(context, event, "unknown_portal", str(exc), task_id, meta)
        log.warning("unknown_portal", portal=portal_id, events=len(events))
        return
    except TransientError as exc:
        # Learning the token's portal met a HubSpot hiccup: try again later.
        _retry(context, events, exc, meta)
        return
    except PermanentError as exc:
        for event in events:
            _dead_letter(
                context, event, "hubspot_refused", exc.describe(), task_id, meta
            )
        return
    if client is None:
        for event in events:
            _record(context, event, task_id, SKIPPED, reason="no_credentials")
        return

    planner = Planner(
        client=client,
        portal_id=portal_id,
        rules=context.rules,
        labels=context.labels,
        redis=context.redis,
        claim_seconds=context.settings.write_claim_seconds,
        # A delivery of the same message again takes back what its first claimed.
        claim_owner=task_id,
        claim_wait_seconds=context.settings.claim_wait_seconds,
        dry_run=context.settings.dry_run,
    )
    calls_before = client.api_calls
    client.before_request = _before_request(
        client, portal_id, context.limiter, context.settings.max_calls_per_task
    )
    client.after_answer = _after_answer(client, portal_id, context.limiter)
    try:
        result = planner.run(events, recheck=bool(meta.get("recheck")))
    except TransientError as exc:
        _retry(context, events, exc, meta)
        return
    except (PermanentError, RulesError) as exc:
        if isinstance(exc, RulesError):
            reason, details = "configuration_error", str(exc)
        else:
            # HubSpot's status and category say what to fix before a replay.
            reason, details = "hubspot_refused", exc.describe()
        for event in events:
            _dead_letter(context, event, reason, details, task_id, meta)
        return
    except RedisError:
        # Not a bug in the plan: the message comes back (see run_task).
        raise
    except Exception:
        details = traceback.format_exc()
        for event in events:
            _dead_letter(context, event, "unexpected_error", details, task_id, meta)
        log.exception("plan_failed", portal=portal_id, task=task_id)
        return

    by_key = {e.dedup_key: e for e in events}
    for key, outcome in result.outcomes.items():
        fields = {k: v for k, v in outcome.items() if k != "outcome"}
        _record(context, by_key[key], task_id, outcome["outcome"], **fields)
    if result.recheck:
        context.delays.add(
            [e.to_json() for e in result.recheck],
            due_at=time.time() + context.settings.recheck_seconds,
            reason="recheck",
            meta={**meta, "recheck": True},
        )
        log.info("events_recheck_scheduled", events=len(result.recheck))
    for event, reason, details in result.dead:
        _dead_letter(context, event, reason, details, task_id, meta)
    # Waiting for a rate limit costs no attempt; any other failure does.
    waits = [(e, err) for e, err in result.retry if isinstance(err, _WAITS)]
    failures = [(e, err) for e, err in result.retry if not isinstance(err, _WAITS)]
    for group in (waits, failures):
        if group:
            _retry(context, [e for e, _ in group], group[0][1], meta)

    log.info(
        "plan_applied",
        portal=portal_id,
        task=task_id,
        events=len(events),
        created=result.created,
        api_calls=client.api_calls - calls_before,
        ms=round((time.monotonic() - started) * 1000, 1),
    )


def _before_request(client, portal_id: int, limiter: RateLimiter | None, most: int):
    """Stop a task before its calls could outlast the task time limit, and take
    each call's slot in the portal's shared budget."""
    limit = client.api_calls + most

    def check(kind: str) -> None:
        if client.api_calls >= limit:
            raise CallBudgetSpent(f"call budget of {most} per task used up")
        if limiter is not None:
            limiter.acquire(portal_id, kind)

    return check


def _after_answer(client, portal_id: int, limiter: RateLimiter | None):
    """Teach the limiter every answer's headers, and tighten it on a 429."""

    def learn(kind, status, limits, error) -> None:
        if limiter is None:
            return
        limiter.observe(portal_id, kind, status, limits)
        if not isinstance(error, RateLimited):
            return
        seconds = None
        # The usage report refusing with DAILY itself: asking it again would only
        # send more refused calls, each one asking again.
        if error.policy == DAILY and kind not in UNMETERED_KINDS:
            seconds = _until_daily_reset(client)
        error.retry_after = limiter.rate_limited(
            portal_id, kind, error, seconds=seconds
        )

    return learn


def _until_daily_reset(client) -> float | None:
    """Seconds until the daily budget resets, from HubSpot's usage report."""
    try:
        resets_at = client.daily_limit_resets_at()
    except HubSpotError as exc:
        log.warning("daily_reset_unknown", reason=type(exc).__name__)
        return None
    if resets_at is None:
        return None
    if resets_at.tzinfo is None:
        resets_at = resets_at.replace(tzinfo=UTC)
    return max((resets_at - datetime.now(UTC)).total_seconds(), 1.0)


def retry_delay(attempt: int, settings, retry_after: float | None) -> float:
    """Full jitter: random(0, min(max, base * 2^attempt)), or Retry-After if larger."""
    ceiling = min(settings.retry_max_seconds, settings.retry_base_seconds * 2**attempt)
    delay = random.uniform(0, ceiling)  # noqa: S311 - jitter, not security
    return max(delay, retry_after or 0)


def _retry(context: WorkerContext, events, error: HubSpotError, meta):
    if isinstance(error, _WAITS):
        _defer(context, events, error, meta)
        return
    if isinstance(error, CallBudgetSpent) and len(events) > 1:
        # Smaller halves fit in a task's calls; a single event that does not is
        # charged an attempt below, so it cannot go round for ever.
        half = len(events) // 2
        for part in (events[:half], events[half:]):
            context.delays.add(
                [e.to_json() for e in part],
                due_at=time.time(),
                reason="split",
                meta=meta,
            )
        log.info("events_split", events=len(events), parts=2)
        return
    attempt = int(meta.get("attempt", 0)) + 1
    if attempt >= context.settings.max_attempts:
        for event in events:
            _dead_letter(
                context,
                event,
                "retries_exhausted",
                f"{type(error).__name__}: {error}",
                None,
                {**meta, "attempt": attempt},
            )
        return
    delay = retry_delay(attempt, context.settings, getattr(error, "retry_after", None))
    context.delays.add(
        [e.to_json() for e in events],
        due_at=time.time() + delay,
        reason="retry",
        meta={**meta, "attempt": attempt},
    )
    log.warning(
        "events_retry_scheduled",
        events=len(events),
        attempt=attempt,
        seconds=round(delay, 2),
        error=type(error).__name__,
        status=getattr(error, "status", None),
    )


def _defer(context: WorkerContext, events, error: HubSpotError, meta):
    """Wait for the rate limit; a deferral is counted but costs no attempt."""
    seconds = max(error.retry_after or 0.0, MIN_DEFER_SECONDS)
    deferrals = int(meta.get("deferrals", 0)) + 1
    context.delays.add(
        [e.to_json() for e in events],
        due_at=time.time() + seconds,
        reason="rate_limit",
        meta={**meta, "deferrals": deferrals},
    )
    log.warning(
        "events_deferred",
        events=len(events),
        seconds=round(seconds, 2),
        deferrals=deferrals,
        budget=getattr(error, "budget", None),
        policy=getattr(error, "policy", None),
        status=error.status,
    )


def count_delivery(context: WorkerContext, task_id: str) -> int:
    """How many times this task message has been handed to a worker, this one
    included. A message that kills its worker comes back: this counts it."""
    key = DELIVERIES_PREFIX + task_id
    pipe = context.redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, DELIVERIES_TTL_SECONDS)
    deliveries, _ = pipe.execute()
    return int(deliveries)


def run_task(raw_events: list[dict], *, context: WorkerContext, task_id: str, meta):
    """One delivery of a task message: counted, handled, and never lost.

    A message handed out more than ``max_deliveries`` times (each time its
    worker died) is dead-lettered as ``worker_lost``. A bug anywhere in the
    handling dead-letters the events with the traceback.
    """
    meta = dict(meta or {})
    deliveries = count_delivery(context, task_id)
    if deliveries > context.settings.max_deliveries:
        details = (
            f"handed to a worker {deliveries - 1} times; each time it was not "
            "finished (the worker lost, or the task time limit reached)"
        )
        _dead_letter_queued(context, raw_events, "worker_lost", details, task_id, meta)
        context.redis.delete(DELIVERIES_PREFIX + task_id)
        return

    try:
        handle_events(raw_events, context=context, task_id=task_id, meta=meta)
    except (RedisConnectionError, RedisTimeoutError):
        # Nothing can be recorded without Redis: the message must come back.
        # Its worker was not lost, so this delivery is not counted (if Redis
        # lets the count be taken back).
        _uncount_delivery(context, task_id)
        raise
    except RedisError:
        # Redis refusing a command (out of memory, say) may refuse it again:
        # the delivery stays counted, so this cannot come back for ever.
        raise
    except Exception:
        log.exception("task_failed", task=task_id)
        _dead_letter_queued(
            context,
            raw_events,
            "unexpected_error",
            traceback.format_exc(),
            task_id,
            meta,
        )
    context.redis.delete(DELIVERIES_PREFIX + task_id)


def _uncount_delivery(context: WorkerContext, task_id: str) -> None:
    with contextlib.suppress(RedisError):
        context.redis.decr(DELIVERIES_PREFIX + task_id)


def _dead_letter_queued(context, raw_events, reason, details, task_id, meta):
    """Dead-letter the queued events that have no outcome yet (or, replayed, are
    still dead-lettered: their old entry was removed when they were replayed)."""
    redo = DEAD_LETTERED if meta.get("replay") else None
    for raw in raw_events:
        try:
            event = Event.from_json(raw)
        except (TypeError, ValueError):
            # Not even an event: keep what was queued, as it was.
            context.dead_letters.add(reason, [raw], details=details)
            continue
        outcome = context.outcomes.get(event.dedup_key)
        if not outcome or outcome.get("outcome") == redo:
            _dead_letter(context, event, reason, details, task_id, meta)


def _dead_letter(context: WorkerContext, event, reason, details, task_id, meta):
    entry_id = context.dead_letters.add(
        reason,
        [event.to_json()],
        details=details,
        attempts=int(meta.get("attempt", 0)),
        portal_id=event.portal_id,
    )
    _record(context, event, task_id, DEAD_LETTERED, reason=reason, dead_letter=entry_id)


def _record(context: WorkerContext, event: Event, task_id, outcome, **fields):
    context.outcomes.record(event.dedup_key, outcome, task=task_id, **fields)
    if outcome == DEAD_LETTERED:
        level = log.error
    elif outcome == SKIPPED and fields.get("reason") == "no_credentials":
        level = log.warning
    else:
        level = log.info
    level(
        "event_outcome",
        outcome=outcome,
        portal=event.portal_id,
        object=event.object_ref,
        event_id=event.event_id,
        subscription=event.subscription_type,
        task=task_id,
        **fields,
    )

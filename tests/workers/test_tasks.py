"""What a task does with failures: retries, deferrals, splits and dead letters.

Tasks run here as plain calls of :func:`workers.tasks.run_task` against a real
Redis and the HubSpot fake; the Celery worker process is tested end to end
elsewhere.
"""

import json
import time

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tests.hubspot_fake import FakeHubSpot
from workers.dead_letters import DeadLetterStore
from workers.delays import DELAY_KEY, DelaySet
from workers.events import Event
from workers.hubspot import HubSpotClient, RateLimited, TransientError
from workers.labels import LabelResolver
from workers.outcomes import OutcomeStore
from workers.planner import PlanResult
from workers.ratelimit import RateLimiter
from workers.rules import load_rules
from workers.settings import Settings
from workers.tasks import CallBudgetSpent, WorkerContext, _retry, run_task

PORTAL = 62515


@pytest.fixture(scope="module")
def hubspot():
    with FakeHubSpot(portal_id=PORTAL) as fake:
        yield fake


@pytest.fixture
def context(redis_client, redis_url, hubspot):
    hubspot.fail_next.clear()
    hubspot.reset_counters()
    settings = Settings.from_env(
        {},
        REDIS_URL=redis_url,
        ASSOCIATOR_SETTLE_SECONDS="0",
        ASSOCIATOR_MAX_ATTEMPTS="3",
        ASSOCIATOR_RETRY_BASE_SECONDS="0.01",
        ASSOCIATOR_RETRY_MAX_SECONDS="0.05",
    )
    client = HubSpotClient(
        token=hubspot.token, base_url=hubspot.url, api_version="2026-03", timeout=5
    )
    yield WorkerContext(
        settings=settings,
        redis=redis_client,
        outcomes=OutcomeStore(redis_client),
        dead_letters=DeadLetterStore(redis_client),
        delays=DelaySet(redis_client),
        rules=load_rules(None),
        labels=LabelResolver(redis_client, refresh_seconds=60),
        credentials_for=lambda portal_id: client,
        limiter=RateLimiter(
            redis_client,
            default_per_10s=100,
            search_per_second=5,
            share=0.9,
            max_wait_seconds=0.0,
            daily_defer_seconds=3600.0,
        ),
    )
    client.close()


def contact_event(object_id: int, occurred_at: int = 1_700_000_000_000) -> Event:
    return Event(
        portal_id=PORTAL,
        object_type_id="0-1",
        object_id=object_id,
        occurred_at=occurred_at + object_id,
        event_id=object_id,
        subscription_type="contact.creation",
        kind="creation",
    )


def delayed(redis_client) -> list[tuple[dict, float]]:
    return [
        (json.loads(member), score)
        for member, score in redis_client.zrange(DELAY_KEY, 0, -1, withscores=True)
    ]


def test_a_transient_failure_is_retried_later_and_costs_an_attempt(
    context, redis_client
):
    events = [contact_event(1)]

    _retry(context, events, TransientError("502", status=502), {"attempt": 0})

    [(entry, due)] = delayed(redis_client)
    assert entry["reason"] == "retry"
    assert entry["meta"]["attempt"] == 1
    assert due <= time.time() + context.settings.retry_max_seconds


def test_the_last_attempt_dead_letters_the_event(context):
    event = contact_event(2)

    _retry(context, [event], TransientError("503", status=503), {"attempt": 2})

    outcome = context.outcomes.get(event.dedup_key)
    assert outcome["outcome"] == "dead_lettered"
    assert outcome["reason"] == "retries_exhausted"
    [entry] = context.dead_letters.list()
    assert entry.attempts == 3
    assert "503" in entry.details


def test_a_429_defers_without_costing_an_attempt(context, redis_client):
    error = RateLimited("slow down", status=429, retry_after=5.0)

    _retry(context, [contact_event(3)], error, {"attempt": 2})

    [(entry, due)] = delayed(redis_client)
    assert entry["reason"] == "rate_limit"
    assert entry["meta"]["attempt"] == 2
    assert entry["meta"]["deferrals"] == 1
    assert due >= time.time() + 4


def test_a_task_out_of_calls_hands_its_events_on_in_halves(context, redis_client):
    events = [contact_event(i) for i in range(10, 15)]

    _retry(context, events, CallBudgetSpent("spent"), {"attempt": 0})

    halves = sorted(len(entry["events"]) for entry, _ in delayed(redis_client))
    assert halves == [2, 3]
    assert all(entry["meta"]["attempt"] == 0 for entry, _ in delayed(redis_client))


def test_a_single_event_out_of_calls_costs_an_attempt(context, redis_client):
    _retry(context, [contact_event(20)], CallBudgetSpent("spent"), {"attempt": 0})

    [(entry, _)] = delayed(redis_client)
    assert entry["reason"] == "retry"
    assert entry["meta"]["attempt"] == 1


def test_a_message_delivered_more_than_three_times_is_dead_lettered(context):
    event = contact_event(30)
    # Three deliveries whose worker died before finishing.
    for _ in range(3):
        context.redis.incr("associator:deliveries:task-30")

    run_task([event.to_json()], context=context, task_id="task-30", meta={})

    outcome = context.outcomes.get(event.dedup_key)
    assert outcome["outcome"] == "dead_lettered"
    assert outcome["reason"] == "worker_lost"
    assert context.redis.exists("associator:deliveries:task-30") == 0


def test_a_finished_task_forgets_its_delivery_count(context, hubspot, redis_client):
    contact = hubspot.add_record("0-1", {"email": "solo@nowhere.example"})
    event = contact_event(contact, occurred_at=0)

    run_task([event.to_json()], context=context, task_id="task-done", meta={})

    assert context.redis.exists("associator:deliveries:task-done") == 0
    # No company has the domain yet: the event waits for its recheck.
    [(entry, _)] = delayed(redis_client)
    assert entry["reason"] == "recheck"


def test_a_bug_dead_letters_the_events_with_its_traceback(context):
    def broken(portal_id):
        raise ZeroDivisionError("a bug")

    context.credentials_for = broken
    event = contact_event(40, occurred_at=0)

    run_task([event.to_json()], context=context, task_id="task-bug", meta={})

    outcome = context.outcomes.get(event.dedup_key)
    assert outcome["reason"] == "unexpected_error"
    [entry] = context.dead_letters.list()
    assert "ZeroDivisionError" in entry.details
    assert "Traceback" in entry.details


def test_something_that_is_not_an_event_is_kept_as_it_was_queued(context):
    run_task([{"no": "event"}], context=context, task_id="task-junk", meta={})

    [entry] = context.dead_letters.list()
    assert entry.reason == "unexpected_error"
    assert entry.events == [{"no": "event"}]


def test_hubspots_429_during_a_plan_defers_and_tightens_the_limiter(
    context, hubspot, redis_client
):
    contact = hubspot.add_record("0-1", {"email": "ada@limited.example"})
    hubspot.fail_next.append(("objects_read", 429, {}))
    event = contact_event(contact, occurred_at=0)

    run_task([event.to_json()], context=context, task_id="task-429", meta={})

    assert context.outcomes.get(event.dedup_key) is None
    [(entry, due)] = delayed(redis_client)
    assert entry["reason"] == "rate_limit"
    assert entry["meta"].get("attempt", 0) == 0
    assert due >= time.time() + 5
    assert context.limiter.stats()["rate_limited"] == 1


def test_a_daily_429_defers_the_portal_until_hubspots_reset(
    context, hubspot, redis_client
):
    contact = hubspot.add_record("0-1", {"email": "ada@daily.example"})
    hubspot.fail_next.append(("objects_read", 429, {}, {"policyName": "DAILY"}))
    event = contact_event(contact, occurred_at=0)

    run_task([event.to_json()], context=context, task_id="task-daily", meta={})

    [(entry, due)] = delayed(redis_client)
    assert entry["reason"] == "rate_limit"
    # The fake's budget resets at the next midnight UTC.
    midnight = (time.time() // 86400 + 1) * 86400
    assert abs(due - midnight) < 5
    assert hubspot.call_count("api_usage") == 1


def test_replayed_work_stays_replayed_through_its_retries(context, redis_client):
    meta = {"reason": "replay", "replay": "entry-1"}

    _retry(context, [contact_event(50)], TransientError("502", status=502), meta)

    [(entry, _)] = delayed(redis_client)
    assert entry["meta"]["replay"] == "entry-1"
    assert entry["meta"]["reason"] == "retry"


def test_a_hiccup_while_learning_the_tokens_portal_is_retried(context, redis_client):
    def flaky(portal_id):
        raise TransientError("account details answered 502", status=502)

    context.credentials_for = flaky
    event = contact_event(60, occurred_at=0)

    run_task([event.to_json()], context=context, task_id="task-flaky", meta={})

    assert context.outcomes.get(event.dedup_key) is None
    [(entry, _)] = delayed(redis_client)
    assert entry["reason"] == "retry"


def test_a_replayed_event_whose_worker_is_lost_again_is_dead_lettered_again(context):
    event = contact_event(32)
    # Its first dead letter was removed when it was replayed.
    context.outcomes.record(
        event.dedup_key, "dead_lettered", reason="worker_lost", dead_letter="gone"
    )
    for _ in range(3):
        context.redis.incr("associator:deliveries:task-replayed")

    run_task(
        [event.to_json()],
        context=context,
        task_id="task-replayed",
        meta={"reason": "replay", "replay": "gone"},
    )

    [entry] = context.dead_letters.list()
    assert entry.reason == "worker_lost"
    assert context.outcomes.get(event.dedup_key)["dead_letter"] == entry.id


def test_a_replayed_event_meeting_a_bug_again_is_dead_lettered_again(context):
    def broken(portal_id):
        raise ZeroDivisionError("a bug")

    context.credentials_for = broken
    event = contact_event(41, occurred_at=0)
    context.outcomes.record(
        event.dedup_key, "dead_lettered", reason="unexpected_error", dead_letter="gone"
    )

    run_task(
        [event.to_json()],
        context=context,
        task_id="task-replayed-bug",
        meta={"reason": "replay", "replay": "gone"},
    )

    [entry] = context.dead_letters.list()
    assert entry.reason == "unexpected_error"
    assert context.outcomes.get(event.dedup_key)["dead_letter"] == entry.id


def test_a_daily_429_of_the_usage_report_is_not_asked_again(
    context, hubspot, redis_client
):
    contact = hubspot.add_record("0-1", {"email": "ada@usage.example"})
    hubspot.fail_next.append(("objects_read", 429, {}, {"policyName": "DAILY"}))
    hubspot.fail_always.append(("api_usage", 429, {}, {"policyName": "DAILY"}))
    event = contact_event(contact, occurred_at=0)

    try:
        run_task([event.to_json()], context=context, task_id="task-usage", meta={})
    finally:
        hubspot.fail_always.clear()

    assert hubspot.call_count("api_usage") == 1
    [(entry, due)] = delayed(redis_client)
    assert entry["reason"] == "rate_limit"
    assert due >= time.time() + context.settings.daily_defer_seconds - 5


def test_redis_failing_in_the_middle_of_a_plan_sends_the_message_back(context, hubspot):
    class LostLimiter:
        def acquire(self, portal_id, kind):
            raise RedisConnectionError("Redis went away")

    contact = hubspot.add_record("0-1", {"email": "ada@blip.example"})
    context.limiter = LostLimiter()
    event = contact_event(contact, occurred_at=0)

    with pytest.raises(RedisError):
        run_task([event.to_json()], context=context, task_id="task-blip", meta={})

    assert context.outcomes.get(event.dedup_key) is None
    assert context.dead_letters.list() == []


def test_events_waiting_for_a_limit_and_events_that_failed_are_retried_apart(
    context, redis_client, monkeypatch
):
    limited, failed = contact_event(70, occurred_at=0), contact_event(71, occurred_at=0)

    class StubPlanner:
        def __init__(self, **_):
            pass

        def run(self, events, recheck=False):
            return PlanResult(
                retry=[
                    (limited, RateLimited("429", status=429, retry_after=5.0)),
                    (failed, TransientError("502", status=502)),
                ]
            )

    monkeypatch.setattr("workers.tasks.Planner", StubPlanner)

    run_task(
        [limited.to_json(), failed.to_json()],
        context=context,
        task_id="task-mixed",
        meta={},
    )

    entries = {entry["reason"]: entry for entry, _ in delayed(redis_client)}
    assert set(entries) == {"rate_limit", "retry"}
    assert entries["rate_limit"]["meta"].get("attempt", 0) == 0
    assert [e["object_id"] for e in entries["rate_limit"]["events"]] == [70]
    assert entries["retry"]["meta"]["attempt"] == 1
    assert [e["object_id"] for e in entries["retry"]["events"]] == [71]


def test_a_lost_redis_connection_does_not_count_as_a_lost_worker(context):
    def unreachable(portal_id):
        raise redis.exceptions.ConnectionError("Connection refused")

    context.credentials_for = unreachable
    event = contact_event(80, occurred_at=0)

    for _ in range(5):
        with pytest.raises(redis.exceptions.ConnectionError):
            run_task([event.to_json()], context=context, task_id="task-blip", meta={})

    assert int(context.redis.get("associator:deliveries:task-blip")) == 0
    assert context.outcomes.get(event.dedup_key) is None


def test_a_redis_refusal_stays_counted_so_it_ends_as_a_dead_letter(context):
    def refused(portal_id):
        raise redis.exceptions.ResponseError("OOM command not allowed")

    context.credentials_for = refused
    event = contact_event(81, occurred_at=0)

    for _ in range(3):
        with pytest.raises(redis.exceptions.ResponseError):
            run_task([event.to_json()], context=context, task_id="task-oom", meta={})
    run_task([event.to_json()], context=context, task_id="task-oom", meta={})

    assert context.outcomes.get(event.dedup_key)["reason"] == "worker_lost"

"""HubSpot misbehaving loses nothing, writes nothing twice and burns no attempt
it need not.

One stack for the module: gunicorn and a Celery worker on the embedded Redis,
calling the HTTP fake of HubSpot, which each test turns into a HubSpot that
answers a share of calls with 429, fails in bursts of 502 and 503, hangs past the
HTTP timeout or drops the connection (with and without having done the write),
refuses with permanent errors, or has spent its daily budget. Each test ends with
:func:`finish`: the outcome the service stored for every event it sent is dumped
for the reliability report, no event is lost, nothing was written twice, and no
event was dead-lettered unless the test caused it.
"""

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hubspot_fake import HUBSPOT_DEFINED, TEST_PORTAL_ID, FakeHubSpot
from tests.reliability import RunFigures, record_run
from tests.stack import ServiceStack, dedup_key
from tests.support import event
from workers.dead_letters import DeadLetterStore
from workers.ratelimit import PREFIX as RATE_PREFIX
from workers.ratelimit import STATS_KEY

PROJECT_ROOT = Path(__file__).resolve().parents[2]

HTTP_TIMEOUT_SECONDS = 1.0
# Beside the stack's short settings: a hung call gives up after a second, and a
# worker that finds another probing the daily limit asks again after half a
# second. The stack's other waits keep workers/settings.py's rule: (1 s + 1 s of
# rate-limit wait) x 20 calls = 40 s < the 65 s task time limit < the 70 s
# visibility timeout.
FAULT_SETTINGS = {
    "ASSOCIATOR_HTTP_TIMEOUT_SECONDS": str(HTTP_TIMEOUT_SECONDS),
    "ASSOCIATOR_DAILY_PROBE_WAIT_SECONDS": "0.5",
}
# Well past the HTTP timeout, so that the worker gives up on the call first.
HANG_SECONDS = 3 * HTTP_TIMEOUT_SECONDS
OUTCOME_SECONDS = 60

CONTACT_TO_PRIMARY_COMPANY = {(HUBSPOT_DEFINED, 279), (HUBSPOT_DEFINED, 1)}
WRITE_KINDS = ("associations_create", "associations_default")

# A window of one second in the throttled tests, so that each 429 costs the work
# a second (or its Retry-After) rather than HubSpot's ten.
SHORT_WINDOW_MS = 1_000
THROTTLED_SHARE = 0.3
THROTTLE_SEED = 2024

# The learning test: a portal allowing 20 calls in ten seconds, where the service
# assumes its default of 100 until HubSpot's first answer, and another integration
# of the portal has spent part of the window just before the burst.
LEARNED_LIMIT_PER_10S = 20
OTHER_INTEGRATION_CALLS = 12
BURST_DOMAINS = 40
BURST_CONTACTS = 500
BURST_DELIVERIES = 5
MOST_429S_WHILE_LEARNING = 5

# When HubSpot's daily budget comes back, counted from the first delivery: past
# the settle delay and the second delivery, so that both wait for it.
DAILY_RESET_IN_SECONDS = 6.0
# How soon after the reset the work must have resumed.
RESUME_SECONDS = 2.0

EVENT_IDS = itertools.count(1)
DOMAIN_NUMBERS = itertools.count(1)


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    """The service against one fake for the whole module, its caches warm."""
    hubspot = FakeHubSpot().start()
    try:
        service = ServiceStack(
            redis_url=redis_server.url,
            hubspot=hubspot,
            directory=tmp_path_factory.mktemp("hubspot-faults"),
            env=FAULT_SETTINGS,
        )
        with service:
            # The token's portal and the label definitions are looked up once and
            # cached; a fault a test injects must meet its own calls, not those.
            _, people = company_with_contacts(hubspot, 1)
            events = contact_events(people)
            deliver_all(service, events)
            assert outcome_kinds(service.wait_for_outcomes(events)) == {"applied"}
            yield service
    finally:
        hubspot.stop()


@pytest.fixture(autouse=True)
def clean_stack(stack, request):
    """A test starts with no stored state and no fault; a failing one shows the
    processes' logs."""
    stack.hubspot.clear_faults()
    stack.reset()
    failed_before = request.session.testsfailed
    yield
    stack.hubspot.clear_faults()
    if request.session.testsfailed > failed_before:
        print(stack.tails())


# Records and events


def company_with_contacts(hubspot: FakeHubSpot, contacts: int) -> tuple[int, list]:
    domain = f"fault-{next(DOMAIN_NUMBERS)}.example"
    firm = hubspot.add_record("company", {"domain": domain, "name": domain})
    people = [
        hubspot.add_record("contact", {"email": f"p{n}@{domain}"})
        for n in range(contacts)
    ]
    return firm, people


def created(object_type: str, object_id: int) -> dict:
    """The creation event HubSpot sends for a record created just now."""
    return event(
        object_id,
        kind=f"{object_type}.creation",
        event_id=next(EVENT_IDS),
        occurredAt=int(time.time() * 1000),
    )


def contact_events(contacts) -> list[dict]:
    return [created("contact", c) for c in contacts]


def deliver_all(stack: ServiceStack, *deliveries: list[dict]) -> None:
    statuses = [stack.deliver(delivery).status_code for delivery in deliveries]
    assert statuses == [204] * len(deliveries)


# Outcomes and logs


def outcome_kinds(outcomes) -> set[str]:
    return {o["outcome"] for o in outcomes}


def wait_for_applied(stack: ServiceStack, events, timeout_seconds=OUTCOME_SECONDS):
    """The outcomes of ``events`` once every one is ``applied``."""
    keys = [dedup_key(e) for e in events]
    deadline = time.monotonic() + timeout_seconds
    while True:
        outcomes = stack.outcomes.get_many(keys)
        if all(o and o["outcome"] == "applied" for o in outcomes):
            return outcomes
        if time.monotonic() > deadline:
            pytest.fail(
                f"not every event applied after {timeout_seconds}s: "
                f"{[o and o['outcome'] for o in outcomes]}\n{stack.worker.tail()}"
            )
        time.sleep(0.05)


def worker_lines(stack: ServiceStack, name: str) -> list[dict]:
    """The worker's log lines named ``name`` since the test began."""
    return [line for line in stack.log_since_mark() if line.get("event") == name]


def assert_no_attempt_charged(stack: ServiceStack) -> None:
    """No retry was scheduled: every pick-up of the work was its first attempt."""
    assert worker_lines(stack, "events_retry_scheduled") == []
    assert {line["attempt"] for line in worker_lines(stack, "events_picked_up")} == {0}


def assert_associated(hubspot: FakeHubSpot, firm: int, people) -> None:
    """Each contact has the company as its one, so Primary, company."""
    for person in people:
        assert hubspot.associations("contact", person, "company") == {
            firm: CONTACT_TO_PRIMARY_COMPANY
        }


def finish(
    stack: ServiceStack, request, promise: str, events, *, caused=()
) -> RunFigures:
    """Record every event's outcome for the report and check what every fault
    test promises; ``caused`` names the dead-letter reasons the test caused."""
    stack.wait_until_idle()
    hubspot = stack.hubspot
    run = record_run(
        promise,
        keys=[dedup_key(e) for e in events],
        redis=stack.redis,
        hubspot=hubspot,
    )
    print(
        f"\n{request.node.name}: {run.sent} events, {run.applied} applied, "
        f"{run.dead_lettered} dead-lettered; {hubspot.call_count()} HubSpot calls, "
        f"{run.rate_limited} answered 429, "
        f"{sum(hubspot.call_count(k) for k in WRITE_KINDS)} writes"
    )

    assert run.lost == 0
    assert run.written_twice == 0
    assert set(run.dead_letter_reasons) <= set(caused)
    assert hubspot.internal_errors == []
    unexpected = [
        line
        for line in stack.errors()
        if not (line.get("event") == "event_outcome" and line.get("reason") in caused)
    ]
    assert unexpected == []
    return run


# 429s, 5xx, hangs and lost connections: every event ends applied


@pytest.mark.parametrize(
    "retry_after", [None, 2], ids=["without-retry-after", "with-retry-after"]
)
def test_a_share_of_429s_delays_the_work_without_costing_attempts(
    stack, request, retry_after
):
    hubspot = stack.hubspot
    hubspot.rate_limit_interval_ms = SHORT_WINDOW_MS
    firms = [company_with_contacts(hubspot, 3) for _ in range(4)]
    events = [contact_events(people) for _, people in firms]
    everything = [e for batch in events for e in batch]

    hubspot.throttle(THROTTLED_SHARE, seed=THROTTLE_SEED, retry_after=retry_after)
    deliver_all(stack, *events)
    stack.wait_for_outcomes(everything, timeout_seconds=OUTCOME_SECONDS)
    hubspot.throttle(0.0)

    run = finish(
        stack,
        request,
        f"30% of calls answered 429 ({request.node.callspec.id}): every event "
        "applied, no attempt charged",
        everything,
    )
    assert run.applied == run.sent
    assert run.rate_limited > 0
    for firm, people in firms:
        assert_associated(hubspot, firm, people)
    assert_no_attempt_charged(stack)
    # Each 429 held the work for the window, or for Retry-After when longer.
    waits = {line["seconds"] for line in worker_lines(stack, "rate_limited")}
    assert waits == {float(retry_after or SHORT_WINDOW_MS / 1000)}
    deferred = [
        line for line in worker_lines(stack, "events_deferred") if line.get("policy")
    ]
    assert deferred
    assert min(line["seconds"] for line in deferred) >= (retry_after or 1.0)


def test_bursts_of_502_and_503_are_retried_until_applied(stack, request):
    hubspot = stack.hubspot
    firms = [company_with_contacts(hubspot, 3) for _ in range(2)]
    events = [contact_events(people) for _, people in firms]
    everything = [e for batch in events for e in batch]
    burst = [(None, 502, {})] * 3 + [(None, 503, {"Retry-After": "1"}), (None, 503, {})]
    hubspot.fail_next.extend(burst)

    deliver_all(stack, *events)
    stack.wait_for_outcomes(everything)

    run = finish(
        stack,
        request,
        "bursts of 502 and 503: every event applied",
        everything,
    )
    assert run.applied == run.sent
    assert hubspot.fail_next == []
    for firm, people in firms:
        assert_associated(hubspot, firm, people)
    # Each failed call cost its plan one attempt, well below the most allowed.
    retries = worker_lines(stack, "events_retry_scheduled")
    assert sorted(line["status"] for line in retries) == [502, 502, 502, 503, 503]
    assert max(line["attempt"] for line in retries) < stack.settings.max_attempts


@pytest.mark.parametrize(
    ("fault", "applied"),
    [("hang", False), ("hang", True), ("disconnect", False), ("disconnect", True)],
    ids=["hang-not-applied", "hang-applied", "reset-not-applied", "reset-applied"],
)
def test_an_interrupted_write_is_read_again_and_never_written_twice(
    stack, request, fault, applied
):
    hubspot = stack.hubspot
    firm, people = company_with_contacts(hubspot, 3)
    events = contact_events(people)
    if fault == "hang":
        hubspot.hang_next.append(("associations_create", HANG_SECONDS, applied))
    else:
        hubspot.disconnect_next.append(("associations_create", applied))

    deliver_all(stack, events)
    outcomes = stack.wait_for_outcomes(events)

    what = "applied" if applied else "not applied"
    run = finish(
        stack,
        request,
        f"a write that {'hangs' if fault == 'hang' else 'loses its connection'} "
        f"({what} by HubSpot): applied once",
        events,
    )
    assert run.applied == run.sent
    assert_associated(hubspot, firm, people)
    writes = [c for c in hubspot.calls if c["kind"] in WRITE_KINDS]
    assert writes[0]["fault"] == fault
    (retry,) = worker_lines(stack, "events_retry_scheduled")
    assert (retry["attempt"], retry["error"]) == (1, "TransientError")
    # The retry read the contacts' companies again before deciding to write.
    assert any(
        c["kind"] == "associations_read" and c["at"] > writes[0]["at"]
        for c in hubspot.calls
    )
    if applied:
        # It found what the interrupted call had written, and wrote nothing.
        assert len(writes) == 1
        assert [(o["created"], o["present"]) for o in outcomes] == [(0, 1)] * 3
    else:
        assert len(writes) == 2
        assert [(o["created"], o["present"]) for o in outcomes] == [(1, 0)] * 3


# HubSpot's limit, learned from its headers


def test_the_limiter_learns_hubspots_limit_from_its_headers(stack, request):
    hubspot = stack.hubspot
    assert stack.settings.rate_limit_per_10s == 100
    firms = [
        hubspot.add_record("company", {"domain": f"learn-{n}.example"})
        for n in range(BURST_DOMAINS)
    ]
    people = {
        hubspot.add_record(
            "contact", {"email": f"p{n}@learn-{n % BURST_DOMAINS}.example"}
        ): firms[n % BURST_DOMAINS]
        for n in range(BURST_CONTACTS)
    }
    events = contact_events(people)
    size = BURST_CONTACTS // BURST_DELIVERIES
    deliveries = [events[start : start + size] for start in range(0, len(events), size)]
    hubspot.rate_limit_per_10s = LEARNED_LIMIT_PER_10S

    started = time.monotonic()
    hubspot.spend_rate_limit(OTHER_INTEGRATION_CALLS)
    deliver_all(stack, *deliveries)
    stack.wait_for_outcomes(events, timeout_seconds=OUTCOME_SECONDS)
    seconds = time.monotonic() - started

    run = finish(
        stack,
        request,
        f"HubSpot allowing {LEARNED_LIMIT_PER_10S} calls in 10 s, the limiter "
        "assuming 100: the limit learned, every event applied",
        events,
    )
    stats = stack.redis.hgetall(STATS_KEY)
    print(
        f"learned in {seconds:.1f} s: {hubspot.call_count()} calls, "
        f"{hubspot.rate_limited} answered 429; limiter: {stats}"
    )
    assert run.applied == run.sent
    assert hubspot.rate_limited <= MOST_429S_WHILE_LEARNING
    learned = stack.redis.get(f"{RATE_PREFIX}{TEST_PORTAL_ID}:10s:max")
    assert learned == str(LEARNED_LIMIT_PER_10S)
    # The limiter, not HubSpot, held the calls back.
    assert int(stats.get("deferrals", 0)) + int(stats.get("limiter_waits", 0)) > 0
    for person, firm in people.items():
        assert hubspot.associations("contact", person, "company") == {
            firm: CONTACT_TO_PRIMARY_COMPANY
        }


# Permanent errors: dead-lettered at once, applied once fixed and replayed


PERMANENT_FAULTS = {
    # HubSpot refusing every association write of the pair: a bad type or label.
    "validation_error": (400, "VALIDATION_ERROR"),
    # The company may have only two contacts: the third input alone fails.
    "association_limit": (None, "VALIDATION_ERROR"),
    # The app's token lacks a scope: every call is refused.
    "missing_scope": (403, "MISSING_SCOPES"),
}


def replay_all(stack: ServiceStack) -> subprocess.CompletedProcess:
    """``associator dead-letters replay --all``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "dead-letters", "replay", "--all"],
        env=stack.env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("fault", list(PERMANENT_FAULTS))
def test_a_permanent_error_is_dead_lettered_at_once_and_applied_once_replayed(
    stack, request, fault
):
    hubspot = stack.hubspot
    status, category = PERMANENT_FAULTS[fault]
    firm, people = company_with_contacts(hubspot, 3)
    events = contact_events(people)
    if fault == "validation_error":
        refusal = {"message": "Association type is not valid for this pair."}
        hubspot.fail_always.append(("associations_create", 400, {}, refusal))
    elif fault == "association_limit":
        hubspot.association_limit = 2
    else:
        hubspot.fail_always.append((None, 403, {}))

    deliver_all(stack, events)
    outcomes = stack.wait_for_outcomes(events)
    stack.wait_until_idle()

    dead = [o for o in outcomes if o["outcome"] == "dead_lettered"]
    assert {o["reason"] for o in dead} == {"hubspot_refused"}
    assert len(dead) == (1 if fault == "association_limit" else 3)
    assert outcome_kinds(outcomes) <= {"dead_lettered", "applied"}
    # At once: no attempt used, nothing waiting to be retried, and the refused
    # call was not sent again.
    assert_no_attempt_charged(stack)
    entries = DeadLetterStore(stack.redis).list()
    assert len(entries) == len(dead)
    for entry in entries:
        assert (entry.reason, entry.attempts) == ("hubspot_refused", 0)
        assert category in entry.details
        if status is not None:
            assert f"status={status}" in entry.details
    refused_kind = "objects_read" if fault == "missing_scope" else "associations_create"
    assert hubspot.call_count(refused_kind) == 1

    # The cause fixed, the operator replays every dead letter.
    hubspot.clear_faults()
    replayed = replay_all(stack)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {len(dead)} dead letter(s), refused 0" in replayed.stdout
    wait_for_applied(stack, events)

    run = finish(
        stack,
        request,
        f"HubSpot refusing with {category} ({fault}): dead-lettered at once, "
        "applied once fixed and replayed",
        events,
        caused=("hubspot_refused",),
    )
    assert run.applied == run.sent
    assert DeadLetterStore(stack.redis).list() == []
    assert_associated(hubspot, firm, people)


# The daily budget spent


def test_a_daily_429_holds_the_portals_work_until_the_reset_then_probes_once(
    stack, request
):
    hubspot = stack.hubspot
    early_firm, early_people = company_with_contacts(hubspot, 3)
    late_firm, late_people = company_with_contacts(hubspot, 3)
    early, late = contact_events(early_people), contact_events(late_people)
    hubspot.daily_limit_until = reset_at = time.time() + DAILY_RESET_IN_SECONDS

    deliver_all(stack, early)
    deadline = time.monotonic() + DAILY_RESET_IN_SECONDS
    while hubspot.rate_limited == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Work arriving while the portal is blocked waits too, without a call.
    deliver_all(stack, late)
    stack.wait_until_delayed(early + late, reason="rate_limit")
    waiting = [entry for _, entry in stack.delayed()]
    assert time.time() < reset_at
    outcomes = stack.wait_for_outcomes(early + late)

    run = finish(
        stack,
        request,
        "HubSpot's daily budget spent: the work waits for the reset, then applies "
        "without an attempt charged",
        early + late,
    )
    assert outcome_kinds(outcomes) == {"applied"}
    assert_associated(hubspot, early_firm, early_people)
    assert_associated(hubspot, late_firm, late_people)

    # One 429; until the reset, no call but the one reading when it comes.
    (refused,) = [c for c in hubspot.calls if c["status"] == 429]
    assert run.rate_limited == 1
    blocked = [c["kind"] for c in hubspot.calls if refused["at"] < c["at"] < reset_at]
    assert blocked == ["api_usage"]
    resumed = [c for c in hubspot.calls if c["at"] >= reset_at]
    assert resumed[0]["at"] < reset_at + RESUME_SECONDS
    assert all(200 <= c["status"] < 300 for c in resumed)
    # Then a single call probed whether the budget was back.
    assert len(worker_lines(stack, "daily_limit_probe")) == 1
    assert len(worker_lines(stack, "daily_limit_cleared")) == 1
    # Waiting cost no attempt.
    assert {entry["meta"].get("attempt", 0) for entry in waiting} == {0}
    assert_no_attempt_charged(stack)
    print(
        f"daily reset: resumed {resumed[0]['at'] - reset_at:.2f} s after it, "
        f"{len(resumed)} calls after it"
    )

"""Redis killed while deliveries arrive: nothing acknowledged is lost.

The module runs its own embedded Redis (AOF, ``appendfsync always``) so that it
can SIGKILL it and start it again on the same port and data directory. While it
is down the receiver answers 503 within HubSpot's 5 seconds, so HubSpot delivers
again; what was answered 204 before the kill is on disk and is done once Redis is
back; and the worker that lived through the outage, the same process, goes on
consuming, also after Redis died under every one of its pool processes' tasks.
"""

import threading
import time
from dataclasses import dataclass

import pytest
import requests

from tests.faults.test_worker_loss import HoldingHubSpot, next_held
from tests.hubspot_fake import HUBSPOT_DEFINED, FakeHubSpot
from tests.reliability import record_run
from tests.stack import ServiceStack, dedup_key
from tests.support import event
from workers.embedded_redis import EmbeddedRedis

# Every wait short, in the order workers/settings.py checks:
# (1.0 s + 0.5 s) x 8 + 0.5 s = 12.5 s < 13 s < 14 s. A task whose worker lost
# Redis in the middle of it is handed out again after the visibility timeout.
OUTAGE_SETTINGS = {
    "ASSOCIATOR_VISIBILITY_TIMEOUT": "14",
    "ASSOCIATOR_TASK_TIME_LIMIT": "13",
    "ASSOCIATOR_HTTP_TIMEOUT_SECONDS": "1.0",
    "ASSOCIATOR_RATE_LIMIT_MAX_WAIT_SECONDS": "0.5",
    "ASSOCIATOR_MAX_CALLS_PER_TASK": "8",
    "ASSOCIATOR_CLAIM_WAIT_SECONDS": "0.5",
    "ASSOCIATOR_UNACKED_RESTORE_SECONDS": "1",
    # A delivery cut off between its claim and its publish blocks its
    # redelivery only this long.
    "ASSOCIATOR_DEDUP_PENDING_SECONDS": "3",
}
# HubSpot gives up on a delivery not answered within this.
HUBSPOT_TIMEOUT_SECONDS = 5.0
UP_BEFORE_SECONDS = 1.5
DOWN_SECONDS = 4.0
# How long HubSpot's simulated redeliveries go on, and how far apart.
REDELIVERY_SECONDS = 20.0
REDELIVERY_INTERVAL_SECONDS = 0.5
# The worker's reconnection, then work restored after the visibility timeout.
RECOVERY_SECONDS = 40.0
DELIVERY_INTERVAL_SECONDS = 0.5
CONTACT_TO_PRIMARY_COMPANY = {(HUBSPOT_DEFINED, 279), (HUBSPOT_DEFINED, 1)}


@dataclass
class Attempt:
    """One delivery of a batch and how the receiver answered it."""

    status: int | None
    seconds: float
    # Wall-clock time of the answer, as outcomes record theirs.
    answered_at: float


@dataclass
class Batch:
    """A new company and its contacts, delivered as one webhook."""

    firm: int
    people: list[int]
    events: list[dict]
    attempts: list[Attempt]

    @property
    def acknowledged(self) -> bool:
        return any(a.status == 204 for a in self.attempts)


# Fixtures


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A Redis for this module alone: killed and restarted by its test."""
    with EmbeddedRedis(tmp_path_factory.mktemp("outage-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(own_redis, tmp_path_factory):
    hubspot = HoldingHubSpot().start()
    try:
        service = ServiceStack(
            redis_url=own_redis.url,
            hubspot=hubspot,
            directory=tmp_path_factory.mktemp("redis-loss"),
            env=OUTAGE_SETTINGS,
        )
        with service:
            yield service
    finally:
        hubspot.forget_holds()
        hubspot.stop()


# Deliveries


class Sender:
    """HubSpot sending one new batch after another, from a thread."""

    def __init__(self, stack: ServiceStack):
        self.stack = stack
        self.batches: list[Batch] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def __enter__(self) -> "Sender":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = new_batch(self.stack.hubspot, len(self.batches))
            deliver(self.stack, batch)
            self.batches.append(batch)
            self._stop.wait(DELIVERY_INTERVAL_SECONDS)


def new_batch(hubspot: FakeHubSpot, number: int) -> Batch:
    domain = f"outage-{number}.example"
    firm = hubspot.add_record("company", {"domain": domain, "name": domain})
    people = [hubspot.add_record("contact", {"email": f"{n}@{domain}"}) for n in "ab"]
    now = int(time.time() * 1000)
    events = [
        event(firm, kind="company.creation", occurredAt=now),
        *[event(p, kind="contact.creation", occurredAt=now) for p in people],
    ]
    return Batch(firm, people, events, [])


def deliver(stack: ServiceStack, batch: Batch) -> Attempt:
    started = time.monotonic()
    try:
        status = stack.deliver(batch.events).status_code
    except requests.RequestException:
        status = None
    attempt = Attempt(status, time.monotonic() - started, time.time())
    batch.attempts.append(attempt)
    return attempt


def redeliver_until_acknowledged(stack: ServiceStack, batches: list[Batch]) -> None:
    """HubSpot's retries of every delivery that was not answered 2xx."""
    deadline = time.monotonic() + REDELIVERY_SECONDS
    waiting = [b for b in batches if not b.acknowledged]
    while waiting:
        for batch in waiting:
            deliver(stack, batch)
        waiting = [b for b in waiting if not b.acknowledged]
        if waiting and time.monotonic() > deadline:
            pytest.fail(
                f"{len(waiting)} deliveries still refused after Redis came back: "
                f"{[a.status for a in waiting[0].attempts]}\n{stack.tails()}"
            )
        time.sleep(REDELIVERY_INTERVAL_SECONDS)


def assert_associated(hubspot: FakeHubSpot, batches: list[Batch]) -> None:
    for batch in batches:
        for person in batch.people:
            assert hubspot.associations("contact", person, "company") == {
                batch.firm: CONTACT_TO_PRIMARY_COMPANY
            }


# Tests


def test_deliveries_during_a_redis_crash_are_refused_in_time_and_none_is_lost(
    stack, own_redis
):
    worker = stack.worker
    worker_pid = worker.pid
    concurrency = stack.settings.worker_concurrency

    with Sender(stack) as sender:
        time.sleep(UP_BEFORE_SECONDS)
        # Redis dies while every pool process is in the middle of a task.
        stack.hubspot.hold("objects_read", served=True, times=concurrency)
        held = [next_held(stack.hubspot, stack) for _ in range(concurrency)]
        killed_at = time.time()
        own_redis.kill()
        for call in held:
            call.release()
        time.sleep(DOWN_SECONDS)
        own_redis.restart()
        restarted_at = time.time()
    batches = sender.batches

    # Every delivery is answered in time: 204 while Redis is up, 503 while it is
    # down, and nothing else.
    first = [b.attempts[0] for b in batches]
    assert {a.status for a in first} == {204, 503}
    slowest = max(a.seconds for a in first)
    assert slowest < HUBSPOT_TIMEOUT_SECONDS
    acknowledged = [
        b
        for b in batches
        if b.attempts[0].status == 204 and b.attempts[0].answered_at < killed_at
    ]
    refused = [b for b in batches if b.attempts[0].status == 503]
    assert acknowledged and refused
    assert all(killed_at < b.attempts[0].answered_at for b in refused)

    # HubSpot delivers the refused ones again until they are accepted.
    redeliver_until_acknowledged(stack, refused)

    # The worker that lived through the outage takes new work.
    mark = worker.log_size()
    fresh = new_batch(stack.hubspot, len(batches))
    assert deliver(stack, fresh).status == 204
    batches.append(fresh)

    every_event = [e for b in batches for e in b.events]
    outcomes = stack.wait_for_outcomes(every_event, timeout_seconds=RECOVERY_SECONDS)
    assert {o["outcome"] for o in outcomes} == {"applied"}
    assert_associated(stack.hubspot, batches)
    # Some work acknowledged before the kill was still waiting (queued or
    # settling) when Redis died, and was done from what its AOF kept.
    finished = {
        dedup_key(e): o["at"] for e, o in zip(every_event, outcomes, strict=True)
    }
    assert any(
        finished[dedup_key(e)] > restarted_at for b in acknowledged for e in b.events
    )
    fresh_tasks = {
        line["task"]
        for line in worker.log(since=mark)
        if line.get("event") == "event_outcome"
        and line["object"] == f"company:{fresh.firm}"
    }
    assert len(fresh_tasks) == 1
    assert stack.worker is worker and worker.pid == worker_pid and worker.alive
    assert stack.web.alive
    # It did see Redis go.
    assert any(line.get("event") == "mover_failed" for line in worker.log())
    stack.wait_until_idle(timeout_seconds=RECOVERY_SECONDS)
    print(
        f"redis down {restarted_at - killed_at:.1f} s; {len(batches)} deliveries, "
        f"{len(refused)} refused first, slowest answer {slowest:.2f} s, "
        f"{sum(len(b.attempts) for b in refused)} attempts of the refused ones"
    )

    run = record_run(
        "A Redis crash loses no acknowledged delivery; refused ones come back",
        keys=[dedup_key(e) for e in every_event],
        redis=stack.redis,
        hubspot=stack.hubspot,
    )
    assert run.lost == 0
    assert run.written_twice == 0
    assert run.dead_letter_reasons == {}

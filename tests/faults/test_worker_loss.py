"""A worker killed in the middle of a task loses nothing and writes nothing twice.

Tasks are acknowledged only when done, so the message of a killed task comes back:
at once when a pool process dies (``task_reject_on_worker_lost``), once the
visibility timeout has passed when the whole worker is gone. A message that kills
its worker every time is dead-lettered as ``worker_lost`` after
``ASSOCIATOR_MAX_DELIVERIES``.

The kills land where they hurt: the fake holds one HubSpot call of the task (a
write, or any call naming one record) until the test has killed the process that
sent it, found by the connection the call came on. A killed task leaves its write
claims behind; the same message, delivered again, takes them back.
"""

import contextlib
import os
import queue
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pytest

from tests.hubspot_fake import HUBSPOT_DEFINED, FakeHubSpot, _match
from tests.reliability import record_run
from tests.stack import ServiceStack, dedup_key, proc_stat
from tests.support import event, processes_in
from workers.dead_letters import DeadLetterStore

# Every wait short, and in the order workers/settings.py checks: the HTTP timeout
# plus the limiter's longest wait, times the calls of a task, plus the wait for
# another plan's write, below the time limit, below the visibility timeout:
# (1.0 s + 0.5 s) x 8 + 0.5 s = 12.5 s < 13 s < 14 s. Eight calls hold a plan of
# a company and its contacts with cold caches.
LOSS_SETTINGS = {
    "ASSOCIATOR_VISIBILITY_TIMEOUT": "14",
    "ASSOCIATOR_TASK_TIME_LIMIT": "13",
    "ASSOCIATOR_HTTP_TIMEOUT_SECONDS": "1.0",
    "ASSOCIATOR_RATE_LIMIT_MAX_WAIT_SECONDS": "0.5",
    "ASSOCIATOR_MAX_CALLS_PER_TASK": "8",
    "ASSOCIATOR_CLAIM_WAIT_SECONDS": "0.5",
    # A lost worker's messages are looked for every second.
    "ASSOCIATOR_UNACKED_RESTORE_SECONDS": "1",
}
# How long the rest of the work may take once its worker is back.
RECOVERY_SECONDS = 15
# How soon the pool processes of a killed worker must be gone.
ORPHAN_SECONDS = 5.0
# Longest the fake holds a call for the test to act on it.
HOLD_SECONDS = 10.0
WRITE_KINDS = ("associations_create", "associations_default")
CONTACT_TO_PRIMARY_COMPANY = {(HUBSPOT_DEFINED, 279), (HUBSPOT_DEFINED, 1)}
CONTACTS_PER_BATCH = 12
# An event this old is planned by the task of its delivery, without settling.
PAST_MILLISECONDS = 3_600_000


@dataclass
class HeldCall:
    """One HubSpot call the fake is holding: the kind, and the client's port."""

    kind: str
    client_port: int
    _released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self._released.set()

    def wait_for_release(self) -> None:
        self._released.wait(HOLD_SECONDS)


@dataclass
class Hold:
    kinds: tuple[str, ...]
    # Hold only calls whose body names this record id.
    record_id: int | None
    # True: HubSpot did the call and its answer is lost. False: the call never
    # reached HubSpot.
    served: bool
    times: int


class HoldingHubSpot(FakeHubSpot):
    """The fake, holding chosen calls until the test has killed their sender.

    :meth:`hold` arms it; each held call is put on :attr:`held` and waits for
    :meth:`HeldCall.release` (at most ``HOLD_SECONDS``). Its sender is dead by
    then, so the answer goes nowhere.
    """

    def __init__(self, **options):
        super().__init__(**options)
        self.held: queue.Queue[HeldCall] = queue.Queue()
        self._holds: list[Hold] = []
        self._holds_lock = threading.Lock()

    def hold(self, *kinds: str, record_id=None, served=False, times=1) -> None:
        with self._holds_lock:
            self._holds.append(Hold(kinds, record_id, served, times))

    def forget_holds(self) -> None:
        """Disarm every hold and let every held call go."""
        with self._holds_lock:
            self._holds.clear()
        while not self.held.empty():
            self.held.get_nowait().release()

    def _wsgi(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = BytesIO(body)
        route, _ = _match(environ["REQUEST_METHOD"], environ["PATH_INFO"])
        hold = self._take_hold(route.kind if route else None, body)
        if hold is None:
            return super()._wsgi(environ, start_response)

        call = HeldCall(route.kind, int(environ["REMOTE_PORT"]))
        answer = super()._wsgi(environ, start_response) if hold.served else None
        self.held.put(call)
        call.wait_for_release()
        if answer is None:
            # Never seen by HubSpot: neither served nor counted.
            start_response("502 Bad Gateway", [("Content-Length", "0")])
            return [b""]
        return answer

    def _take_hold(self, kind: str | None, body: bytes) -> Hold | None:
        with self._holds_lock:
            for hold in self._holds:
                if kind not in hold.kinds:
                    continue
                if hold.record_id is not None and not re.search(
                    rf"\b{hold.record_id}\b", body.decode(errors="replace")
                ):
                    continue
                hold.times -= 1
                if hold.times <= 0:
                    self._holds.remove(hold)
                return hold
        return None


def sender_of(call: HeldCall, pids: list[int]) -> int:
    """Which of ``pids`` has the connection ``call`` came on."""
    sockets = {f"socket:[{inode}]" for inode in connection_inodes(call.client_port)}
    for pid in pids:
        with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/fd") as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if os.readlink(entry.path) in sockets:
                        return pid
    pytest.fail(
        f"none of {pids} holds the connection of the {call.kind} call "
        f"(port {call.client_port}, sockets {sockets})"
    )


def connection_inodes(local_port: int) -> list[str]:
    """The inodes of the open IPv4 sockets bound to ``local_port``."""
    inodes = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rpartition(":")[2], 16)
        # A closed connection lingers with no inode.
        if port == local_port and fields[9] != "0":
            inodes.append(fields[9])
    return inodes


def wait_until_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + ORPHAN_SECONDS
    while left := [pid for pid in pids if (proc_stat(pid) or ("Z",))[0] != "Z"]:
        if time.monotonic() > deadline:
            pytest.fail(f"pool processes {left} outlived their worker")
        time.sleep(0.05)


def next_held(hubspot: HoldingHubSpot, stack: ServiceStack) -> HeldCall:
    try:
        return hubspot.held.get(timeout=HOLD_SECONDS)
    except queue.Empty:
        pytest.fail(f"no call was held in {HOLD_SECONDS}s\n{stack.worker.tail()}")


# Fixtures


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    hubspot = HoldingHubSpot().start()
    directory = tmp_path_factory.mktemp("worker-loss")
    try:
        service = ServiceStack(
            redis_url=redis_server.url,
            hubspot=hubspot,
            directory=directory,
            env=LOSS_SETTINGS,
        )
        with service:
            yield service
        # The pool processes of a killed worker went with its group.
        assert processes_in(directory) == []
    finally:
        hubspot.forget_holds()
        hubspot.stop()


@pytest.fixture(autouse=True)
def clean_stack(stack):
    stack.reset()
    yield
    stack.hubspot.forget_holds()
    # Shown by pytest only when the test failed.
    print(stack.tails())
    assert stack.hubspot.internal_errors == []


# Records and events


def company_with_contacts(hubspot: FakeHubSpot, domain: str) -> tuple[int, list]:
    firm = hubspot.add_record("company", {"domain": domain, "name": domain})
    people = [
        hubspot.add_record("contact", {"email": f"p{n}@{domain}"})
        for n in range(CONTACTS_PER_BATCH)
    ]
    return firm, people


def created(object_type: str, object_id: int) -> dict:
    """A creation event HubSpot sends for a record created a while ago."""
    return event(
        object_id,
        kind=f"{object_type}.creation",
        occurredAt=int(time.time() * 1000) - PAST_MILLISECONDS,
    )


def batch_of(firm: int, people: list[int]) -> list[dict]:
    return [created("company", firm)] + [created("contact", p) for p in people]


def assert_associated(hubspot: FakeHubSpot, firm: int, people: list[int]) -> None:
    for person in people:
        assert hubspot.associations("contact", person, "company") == {
            firm: CONTACT_TO_PRIMARY_COMPANY
        }


def picked_up(process, task: str | None = None) -> list[dict]:
    return [
        line
        for line in process.log()
        if line.get("event") == "events_picked_up"
        and (task is None or line["task"] == task)
    ]


def unexpected_errors(stack: ServiceStack) -> list[dict]:
    """Error lines other than Celery's report of the pool process the test killed."""
    return [
        line
        for line in stack.errors()
        if "WorkerLostError" not in str(line)
        and "exited with 'signal 9 (SIGKILL)'" not in str(line)
    ]


# Tests


def test_a_killed_pool_process_is_replaced_and_its_task_done_by_the_same_worker(
    stack,
):
    hubspot = stack.hubspot
    firm, people = company_with_contacts(hubspot, "pool-loss.example")
    events = batch_of(firm, people)
    main = stack.worker.pid
    pool = stack.worker.pool_pids()

    # The write never reaches HubSpot: the process dies while sending it, its
    # claims on the pairs left in Redis.
    hubspot.hold(*WRITE_KINDS)
    assert stack.deliver(events).status_code == 204
    call = next_held(hubspot, stack)
    victim = sender_of(call, pool)
    os.kill(victim, signal.SIGKILL)
    call.release()

    outcomes = stack.wait_for_outcomes(events, timeout_seconds=RECOVERY_SECONDS)
    assert [o["outcome"] for o in outcomes] == ["applied"] * len(events)
    assert_associated(hubspot, firm, people)
    # Written by the second delivery, once (the held write never arrived).
    assert sum(hubspot.call_count(kind) for kind in WRITE_KINDS) == 1
    # The same worker did it, in a new pool process, from the same message.
    assert stack.worker.pid == main and stack.worker.alive
    replaced = stack.worker.wait_for_pool(len(pool))
    assert victim not in replaced
    task = outcomes[0]["task"]
    assert len(picked_up(stack.worker, task)) == 2
    stack.wait_until_idle()
    assert unexpected_errors(stack) == []

    run = record_run(
        "A pool process killed in the middle of a task loses nothing",
        keys=[dedup_key(e) for e in events],
        redis=stack.redis,
        hubspot=hubspot,
    )
    assert run.lost == 0
    assert run.written_twice == 0
    assert run.dead_letter_reasons == {}


def test_a_killed_worker_s_task_comes_back_to_a_new_worker_after_the_timeout(stack):
    hubspot = stack.hubspot
    firm, people = company_with_contacts(hubspot, "worker-loss.example")
    events = batch_of(firm, people)
    lost_worker = stack.worker
    pool = lost_worker.pool_pids()

    # HubSpot does the write and its answer is lost with the worker.
    hubspot.hold(*WRITE_KINDS, served=True)
    assert stack.deliver(events).status_code == 204
    call = next_held(hubspot, stack)
    sender = sender_of(call, pool)
    lost_worker.send_signal(signal.SIGKILL)
    lost_worker.wait()
    killed_at = time.monotonic()
    # Celery has the kernel kill its pool processes with their parent, so no
    # orphan finishes the task, acknowledges it or lingers.
    assert sender in pool
    wait_until_gone(pool)
    call.release()

    replacement = stack.start_worker()
    outcomes = stack.wait_for_outcomes(
        events,
        timeout_seconds=stack.settings.visibility_timeout_seconds + RECOVERY_SECONDS,
    )
    seconds = time.monotonic() - killed_at

    assert [o["outcome"] for o in outcomes] == ["applied"] * len(events)
    # The write had landed: the new worker found every pair present.
    assert {o["created"] for o in outcomes} == {0}
    assert sum(hubspot.call_count(kind) for kind in WRITE_KINDS) == 1
    assert_associated(hubspot, firm, people)
    task = outcomes[0]["task"]
    assert len(picked_up(lost_worker, task)) == 1
    assert len(picked_up(replacement, task)) == 1
    # Not before the visibility timeout (counted from the first delivery, a
    # moment before the kill), and soon after it.
    assert seconds > stack.settings.visibility_timeout_seconds - 2
    assert seconds < stack.settings.visibility_timeout_seconds + RECOVERY_SECONDS
    stack.wait_until_idle()
    assert unexpected_errors(stack) == []

    run = record_run(
        "A worker killed in the middle of a task loses nothing",
        keys=[dedup_key(e) for e in events],
        redis=stack.redis,
        hubspot=hubspot,
    )
    assert run.lost == 0
    assert run.written_twice == 0
    assert run.dead_letter_reasons == {}


def test_a_message_that_kills_its_worker_every_time_is_dead_lettered_as_lost(stack):
    hubspot = stack.hubspot
    poison = hubspot.add_record("contact", {"email": "pia@poison.example"})
    poison_events = [created("contact", poison)]
    firm, people = company_with_contacts(hubspot, "healthy.example")
    healthy = batch_of(firm, people)
    deliveries = stack.settings.max_deliveries

    # Each time a process reads the poisoned contact, it dies.
    hubspot.hold("objects_read", record_id=poison, times=deliveries)
    assert stack.deliver(poison_events).status_code == 204
    assert stack.deliver(healthy).status_code == 204
    for _ in range(deliveries):
        call = next_held(hubspot, stack)
        os.kill(sender_of(call, stack.worker.pool_pids()), signal.SIGKILL)
        call.release()
        stack.worker.wait_for_pool(stack.settings.worker_concurrency)

    [outcome] = stack.wait_for_outcomes(poison_events)
    assert outcome["outcome"] == "dead_lettered"
    assert outcome["reason"] == "worker_lost"
    assert len(picked_up(stack.worker, outcome["task"])) == deliveries
    [letter] = DeadLetterStore(stack.redis).list()
    assert letter.reason == "worker_lost"
    assert [e["object_id"] for e in letter.events] == [poison]
    assert f"{deliveries} times" in letter.details
    # The rest of the work was not held up.
    outcomes = stack.wait_for_outcomes(healthy)
    assert {o["outcome"] for o in outcomes} == {"applied"}
    assert_associated(hubspot, firm, people)
    stack.wait_until_idle()
    assert [line["event"] for line in unexpected_errors(stack)] == ["event_outcome"]

    run = record_run(
        "A message that kills every worker it reaches is dead-lettered, not retried "
        "for ever",
        keys=[dedup_key(e) for e in poison_events + healthy],
        redis=stack.redis,
        hubspot=hubspot,
    )
    assert run.lost == 0
    assert run.written_twice == 0
    assert run.dead_letter_reasons == {"worker_lost": 1}

"""The dead-letter store and replaying its entries (unit tests on fakeredis)."""

import time

import fakeredis
import pytest

from tests.support import PORTAL_ID, event
from webhook.payload import parse_event
from workers.dead_letters import DeadLetterStore
from workers.events import Event
from workers.logs import Redactor
from workers.replay import (
    EntryNotFound,
    PublishFailed,
    Replayed,
    ReplayRefused,
    replay,
)


def store():
    redis = fakeredis.FakeRedis(decode_responses=True)
    return DeadLetterStore(redis, Redactor(["the-secret", "pat-token"]))


def test_an_entry_keeps_events_reason_details_and_portal():
    dead = store()
    entry_id = dead.add(
        "invalid_event", [{"objectId": None}], details="no objectId", portal_id=7
    )
    entry = dead.get(entry_id)
    assert entry.reason == "invalid_event"
    assert entry.events == [{"objectId": None}]
    assert entry.details == "no objectId"
    assert entry.portal_id == 7
    assert entry.first_at <= entry.last_at
    assert [e.id for e in dead.list()] == [entry_id]


def test_the_same_work_stored_twice_is_one_entry_with_its_first_time_kept():
    dead = store()
    first = dead.add("invalid_event", [{"a": 1}])
    before = dead.get(first)
    second = dead.add("invalid_event", [{"a": 1}], attempts=2)
    assert first == second
    after = dead.get(first)
    assert after.first_at == before.first_at
    assert after.attempts == 2
    assert len(dead.list()) == 1


def test_secrets_never_reach_an_entry():
    dead = store()
    entry_id = dead.add(
        "invalid_event",
        [{"note": "the-secret inside", "auth": "Bearer pat-token"}],
        details="failed with pat-token",
    )
    text = repr(dead.get(entry_id))
    assert "the-secret" not in text
    assert "pat-token" not in text


def test_remove_deletes_the_entry_and_its_index():
    dead = store()
    entry_id = dead.add("invalid_event", [{"a": 1}])
    assert dead.remove(entry_id) is True
    assert dead.get(entry_id) is None
    assert dead.list() == []
    assert dead.remove(entry_id) is False


def test_ids_names_every_stored_entry():
    dead = store()
    first = dead.add("invalid_event", [{"a": 1}])
    second = dead.add("invalid_event", [{"a": 2}])
    assert sorted(dead.ids()) == sorted([first, second])


def test_remove_at_a_time_keeps_an_entry_stored_again_since():
    dead = store()
    entry_id = dead.add("unknown_portal", [queued_event(1)])
    entry = dead.get(entry_id)
    assert dead.remove(entry_id, last_at=entry.last_at - 1) is False
    assert dead.get(entry_id) == entry
    assert dead.remove(entry_id, last_at=entry.last_at) is True
    assert dead.get(entry_id) is None


# -- replay -----------------------------------------------------------------------


class Queue:
    """Stands in for the broker: keeps every published task."""

    def __init__(self):
        self.tasks = []

    def __call__(self, events, meta):
        self.tasks.append((events, meta))
        return f"task-{len(self.tasks)}"


def broker_down(events, meta):
    raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def queued_event(object_id, portal_id=PORTAL_ID) -> dict:
    return parse_event(event(object_id, portalId=portal_id)).to_json()


def test_replay_queues_the_events_as_they_are_and_removes_the_entry():
    dead, queue = store(), Queue()
    events = [queued_event(1)]
    entry_id = dead.add("unknown_portal", events, portal_id=PORTAL_ID)

    result = replay(dead, entry_id, queue)

    assert queue.tasks == [(events, {"reason": "replay", "replay": entry_id})]
    assert result == Replayed(entry_id, 1, [PORTAL_ID], "task-1", removed=True)
    assert dead.get(entry_id) is None


def test_replay_of_events_of_several_portals_queues_them_in_one_task():
    dead, queue = store(), Queue()
    events = [queued_event(1, portal_id=7), queued_event(2, portal_id=8)]
    entry_id = dead.add("hubspot_refused", events)

    result = replay(dead, entry_id, queue)

    assert [task_events for task_events, _ in queue.tasks] == [events]
    assert result.portals == [7, 8]


def test_replay_parses_a_raw_invalid_event_again_as_the_receiver_does():
    dead, queue = store(), Queue()
    raw = event(5, objectId="5")
    entry_id = dead.add("invalid_event", [raw], details="no usable objectId")

    replay(dead, entry_id, queue)

    [(events, _)] = queue.tasks
    assert events == [parse_event(raw).to_json()]
    assert Event.from_json(events[0]).object_id == 5
    assert dead.get(entry_id) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (event(5, objectId=None), "still unusable: no usable objectId"),
        (event(5, portalId="x"), "still unusable: no usable portalId"),
        (event(5, kind="contact.propertyChange"), "does not act on"),
        ({"unstorable": "nested too deeply to store", "keys": []}, "does not act on"),
    ],
)
def test_replay_refuses_a_raw_event_that_is_still_unusable_and_keeps_it(raw, message):
    dead, queue = store(), Queue()
    entry_id = dead.add("invalid_event", [raw])

    with pytest.raises(ReplayRefused, match=message) as refused:
        replay(dead, entry_id, queue)

    assert refused.value.entry_id == entry_id
    assert queue.tasks == []
    assert dead.get(entry_id) is not None


def test_replay_refuses_an_entry_whose_events_are_not_queued_events():
    dead, queue = store(), Queue()
    entry_id = dead.add("unexpected_error", [{"objectId": 1}])

    with pytest.raises(ReplayRefused, match="not a queued event"):
        replay(dead, entry_id, queue)

    assert queue.tasks == []
    assert dead.get(entry_id) is not None


def test_replay_of_an_unknown_entry_says_so():
    with pytest.raises(EntryNotFound, match="no dead letter with id 0123abcd"):
        replay(store(), "0123abcd", Queue())


def test_a_failed_publish_keeps_the_entry():
    dead = store()
    entry_id = dead.add("unknown_portal", [queued_event(1)])

    with pytest.raises(PublishFailed, match=r"Connection refused.*it stays"):
        replay(dead, entry_id, broker_down)

    assert dead.get(entry_id) is not None


def test_an_entry_stored_again_while_its_work_was_queued_stays():
    dead = store()
    events = [queued_event(1)]
    entry_id = dead.add("unknown_portal", events)

    def publish_and_fail_again_at_once(events, meta):
        time.sleep(0.002)  # a later last_at than the replayed version's
        dead.add("unknown_portal", events, attempts=1)
        return "task-1"

    result = replay(dead, entry_id, publish_and_fail_again_at_once)

    assert result.removed is False
    assert dead.get(entry_id).attempts == 1

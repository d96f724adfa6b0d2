"""The dead-letter store (unit tests on fakeredis)."""

import fakeredis

from workers.dead_letters import DeadLetterStore
from workers.logs import Redactor


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

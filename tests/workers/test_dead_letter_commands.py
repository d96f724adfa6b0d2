"""``associator dead-letters``: list, show, replay and purge, on a real Redis."""

import json
import os

import pytest

from tests.support import PORTAL_ID, event, free_port, queued_messages
from webhook.payload import parse_event
from workers import cli
from workers.connections import PROCESS_EVENTS, QUEUE
from workers.credentials import UnknownPortal
from workers.dead_letters import DeadLetterStore
from workers.delays import DelaySet
from workers.events import Event
from workers.labels import LabelResolver
from workers.logs import Redactor
from workers.outcomes import OutcomeStore
from workers.replay import PublishFailed, queue_publisher, replay
from workers.rules import load_rules
from workers.settings import Settings
from workers.tasks import WorkerContext, handle_events

TOKEN = "pat-na1-00000000-1111-2222-3333-444444444444"
CLIENT_SECRET = "dead-letter-test-client-secret"


@pytest.fixture
def environment(monkeypatch, redis_url):
    """Only this test's settings: REDIS_URL on the module's Redis."""
    for name in list(os.environ):
        if name.startswith(("HUBSPOT_", "ASSOCIATOR_")) or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", redis_url)
    return monkeypatch


@pytest.fixture
def store(redis_client):
    return DeadLetterStore(redis_client)


def associator(capsys, *argv):
    """Run ``associator dead-letters ARGV``: (exit code, stdout, stderr)."""
    code = cli.main(["dead-letters", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def queued_event(object_id, portal_id=PORTAL_ID) -> dict:
    return parse_event(event(object_id, portalId=portal_id)).to_json()


def worker_context(redis_client, credentials_for) -> WorkerContext:
    settings = Settings.from_env({})
    return WorkerContext(
        settings=settings,
        redis=redis_client,
        outcomes=OutcomeStore(redis_client),
        dead_letters=DeadLetterStore(redis_client),
        delays=DelaySet(redis_client),
        rules=load_rules(None),
        labels=LabelResolver(redis_client, refresh_seconds=60),
        credentials_for=credentials_for,
    )


def unknown_portal(portal_id):
    raise UnknownPortal(f"no credentials for portal {portal_id}")


def no_credentials(portal_id):
    return None


# -- list and show ----------------------------------------------------------------


def test_list_prints_a_table_of_every_entry(environment, store, capsys):
    invalid = store.add(
        "invalid_event", [event(1, objectId=None)], details="no usable objectId"
    )
    refused = store.add(
        "hubspot_refused",
        [queued_event(2), queued_event(3)],
        details="Traceback (most recent call last):\n  ...\nPermanentError: 400 "
        + "x" * 80,
        attempts=3,
        portal_id=PORTAL_ID,
    )

    code, out, _ = associator(capsys, "list")

    assert code == 0
    header, *rows, footer = out.splitlines()
    assert header.split() == [
        "id",
        "reason",
        "portal",
        "events",
        "attempts",
        "first",
        "last",
        "detail",
    ]
    by_id = {row.split()[0]: row for row in rows}
    assert by_id[invalid].split()[1:5] == ["invalid_event", "-", "1", "0"]
    assert by_id[invalid].endswith("no usable objectId")
    assert by_id[refused].split()[1:5] == ["hubspot_refused", str(PORTAL_ID), "2", "3"]
    assert "PermanentError: 400 xxx" in by_id[refused]
    assert by_id[refused].endswith("…")
    assert footer == "2 dead letter(s)"


def test_list_json_prints_the_entries_as_a_json_array(environment, store, capsys):
    entry_id = store.add("unknown_portal", [queued_event(1)], portal_id=PORTAL_ID)

    code, out, _ = associator(capsys, "list", "--json")

    assert code == 0
    assert json.loads(out) == [store.get(entry_id).to_json()]


def test_list_says_so_when_there_is_nothing(environment, capsys):
    assert associator(capsys, "list") == (0, "no dead letters\n", "")
    assert associator(capsys, "list", "--json")[:2] == (0, "[]\n")


def test_show_prints_the_whole_entry(environment, store, capsys):
    entry_id = store.add(
        "unknown_portal",
        [queued_event(1)],
        details="no credentials for portal 62515",
        attempts=2,
        portal_id=PORTAL_ID,
    )

    code, out, _ = associator(capsys, "show", entry_id)

    assert code == 0
    assert json.loads(out) == store.get(entry_id).to_json()


@pytest.mark.parametrize("command", ["show", "replay", "purge"])
def test_an_unknown_id_is_a_clear_error(environment, command, capsys):
    code, out, err = associator(capsys, command, "0123456789abcdef0123")

    assert code == 1
    assert out == ""
    assert err == "associator: no dead letter with id 0123456789abcdef0123\n"


@pytest.mark.parametrize(
    "argv", [["list"], ["show", "x"], ["replay", "--all"], ["purge", "--all"]]
)
def test_every_command_needs_redis_url(environment, argv, capsys):
    environment.delenv("REDIS_URL")

    code, out, err = associator(capsys, *argv)

    assert code == 2
    assert out == ""
    assert "REDIS_URL is not set" in err


def test_no_output_shows_a_token_or_secret(environment, redis_client, capsys):
    environment.setenv("HUBSPOT_ACCESS_TOKEN", TOKEN)
    environment.setenv("HUBSPOT_CLIENT_SECRET", CLIENT_SECRET)
    # Stored by a process that did not know these values, so not redacted then.
    unredacted = DeadLetterStore(redis_client, Redactor())
    entry_id = unredacted.add(
        "invalid_event",
        [event(1, objectId=None, note=f"signed with {CLIENT_SECRET}")],
        details=f"401 for Bearer {TOKEN}",
    )

    outputs = [
        associator(capsys, "list"),
        associator(capsys, "list", "--json"),
        associator(capsys, "show", entry_id),
        associator(capsys, "replay", entry_id),
    ]

    text = "".join(out + err for _, out, err in outputs)
    assert "[redacted]" in text
    assert TOKEN not in text
    assert CLIENT_SECRET not in text


# -- replay -----------------------------------------------------------------------


def test_replay_queues_the_events_as_new_work_and_removes_the_entry(
    environment, store, redis_client, capsys
):
    events = [queued_event(1)]
    entry_id = store.add("unknown_portal", events, portal_id=PORTAL_ID)

    code, out, err = associator(capsys, "replay", entry_id)

    assert (code, err) == (0, "")
    assert out.startswith(f"replayed {entry_id}: 1 event(s) of portal {PORTAL_ID}")
    assert queued_messages(redis_client) == [
        {
            "task": PROCESS_EVENTS,
            "args": [events],
            "kwargs": {"meta": {"reason": "replay", "replay": entry_id}},
        }
    ]
    assert store.get(entry_id) is None


def test_replay_of_an_entry_with_events_of_several_portals(
    environment, store, redis_client, capsys
):
    events = [queued_event(1, portal_id=7), queued_event(2, portal_id=8)]
    entry_id = store.add("hubspot_refused", events)

    code, out, _ = associator(capsys, "replay", entry_id)

    assert code == 0
    assert "2 event(s) of portals 7, 8" in out
    [message] = queued_messages(redis_client)
    assert message["args"] == [events]


def test_replay_of_an_invalid_event_now_usable_queues_it_parsed(
    environment, store, redis_client, capsys
):
    raw = event(5, objectId="5")
    entry_id = store.add("invalid_event", [raw], details="no usable objectId")

    code, _, _ = associator(capsys, "replay", entry_id)

    assert code == 0
    [message] = queued_messages(redis_client)
    assert message["args"] == [[parse_event(raw).to_json()]]
    assert store.get(entry_id) is None


def test_replay_refuses_an_invalid_event_still_unusable(
    environment, store, redis_client, capsys
):
    entry_id = store.add("invalid_event", [event(5, objectId=None)])

    code, out, err = associator(capsys, "replay", entry_id)

    assert code == 1
    assert out == ""
    assert err == (
        f"associator: dead letter {entry_id} is still unusable: no usable objectId; "
        "it stays\n"
    )
    assert queued_messages(redis_client) == []
    assert store.get(entry_id) is not None


def test_replay_all_queues_every_usable_entry_and_keeps_the_rest(
    environment, store, redis_client, capsys
):
    first = store.add("unknown_portal", [queued_event(1, portal_id=7)])
    second = store.add("retries_exhausted", [queued_event(2, portal_id=8)])
    unusable = store.add("invalid_event", [event(3, objectId=None)])

    code, out, err = associator(capsys, "replay", "--all")

    assert code == 1
    assert out.splitlines()[-1] == "replayed 2 dead letter(s), refused 1"
    assert f"dead letter {unusable} is still unusable" in err
    metas = [m["kwargs"]["meta"]["replay"] for m in queued_messages(redis_client)]
    assert sorted(metas) == sorted([first, second])
    assert store.ids() == [unusable]


def test_a_failed_publish_leaves_the_entry_in_place(store, settings):
    entry_id = store.add("unknown_portal", [queued_event(1)])
    closed = Settings.from_env({}, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")

    with queue_publisher(closed) as publish, pytest.raises(PublishFailed) as failed:
        replay(store, entry_id, publish)

    assert "it stays" in str(failed.value)
    assert store.get(entry_id) is not None


def test_replay_exits_non_zero_when_the_queue_refuses_the_work(
    environment, store, redis_client, capsys
):
    entry_id = store.add("unknown_portal", [queued_event(1)])
    redis_client.set(QUEUE, "not a list")  # every push to the queue now fails

    code, out, err = associator(capsys, "replay", entry_id)

    assert code == 1
    assert out == ""
    assert err.startswith(f"associator: dead letter {entry_id} could not be queued (")
    assert err.endswith("; it stays\n")
    assert store.get(entry_id) is not None


def test_a_replayed_dead_letter_is_redone_by_the_worker(
    environment, redis_client, capsys
):
    outcomes = OutcomeStore(redis_client)
    raw = queued_event(7)
    key = Event.from_json(raw).dedup_key
    handle_events(
        [raw], context=worker_context(redis_client, unknown_portal), task_id="first"
    )
    assert outcomes.get(key)["outcome"] == "dead_lettered"
    [entry_id] = DeadLetterStore(redis_client).ids()

    # The same work queued again without replay is not redone.
    handle_events(
        [raw], context=worker_context(redis_client, no_credentials), task_id="again"
    )
    assert outcomes.get(key)["task"] == "first"

    assert associator(capsys, "replay", entry_id)[0] == 0
    [message] = queued_messages(redis_client)
    handle_events(
        *message["args"],
        **message["kwargs"],
        context=worker_context(redis_client, no_credentials),
        task_id="replayed",
    )

    outcome = outcomes.get(key)
    assert outcome["outcome"] == "skipped"
    assert outcome["reason"] == "no_credentials"
    assert outcome["task"] == "replayed"


def test_a_replay_does_not_redo_an_event_decided_otherwise_since(
    environment, redis_client
):
    outcomes = OutcomeStore(redis_client)
    raw = queued_event(8)
    key = Event.from_json(raw).dedup_key
    outcomes.record(key, "applied", task="later", created=1, present=0)

    handle_events(
        [raw],
        context=worker_context(redis_client, no_credentials),
        task_id="replayed",
        meta={"reason": "replay", "replay": "0123abcd"},
    )

    assert outcomes.get(key)["task"] == "later"


# -- purge ------------------------------------------------------------------------


def test_purge_removes_one_entry(environment, store, capsys):
    kept = store.add("unknown_portal", [queued_event(1)])
    purged = store.add("unknown_portal", [queued_event(2)])

    assert associator(capsys, "purge", purged) == (0, "purged 1 dead letter(s)\n", "")
    assert store.ids() == [kept]


def test_purge_all_removes_every_entry(environment, store, capsys):
    store.add("unknown_portal", [queued_event(1)])
    store.add("invalid_event", [event(2, objectId=None)])

    assert associator(capsys, "purge", "--all") == (
        0,
        "purged 2 dead letter(s)\n",
        "",
    )
    assert store.ids() == []


@pytest.mark.parametrize("argv", [["replay"], ["purge"], ["purge", "x", "--all"]])
def test_replay_and_purge_take_one_id_or_all(environment, argv, capsys):
    with pytest.raises(SystemExit) as usage:
        cli.main(["dead-letters", *argv])

    assert usage.value.code == 2
    assert "--all" in capsys.readouterr().err

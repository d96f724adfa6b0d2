"""Deduplication and queueing: every event kept is queued exactly once, however
often and however concurrently HubSpot delivers it, and a delivery that cannot be
queued now answers 503 and leaves nothing behind that would block its redelivery."""

import logging
import socket
import threading
import time
from collections import Counter

import pytest
import requests
from werkzeug.serving import make_server

from tests.support import encode, event, queued_events, queued_messages, signed_headers
from webhook.intake import DEDUP_PREFIX
from webhook.payload import parse_event
from workers.connections import QUEUE

URL = "http://localhost/webhooks/hubspot"
# ASSOCIATOR_REDIS_TIMEOUT_SECONDS, by default.
BROKER_TIMEOUT_SECONDS = 1.0


@pytest.fixture
def app(make_app):
    # Built during setup so caplog's handler, attached when the test starts,
    # survives create_app's logging configuration.
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def deliver(client, events):
    body = encode(events)
    return client.post(URL, data=body, headers=signed_headers(body, URL))


def logged(caplog, name):
    return [r for r in caplog.records if r.getMessage() == name]


def queued_keys(redis):
    """How many times each event identity is on the queue."""
    return Counter(
        (
            e["portal_id"],
            e["object_type_id"],
            e["object_id"],
            e["event_id"],
            e["occurred_at"],
        )
        for e in queued_events(redis)
    )


def dedup_key(raw):
    return DEDUP_PREFIX + parse_event(raw).dedup_key


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Redeliveries


def test_the_same_delivery_three_times_is_queued_once(client, redis_client, caplog):
    events = [event(1), event(2, kind="object.creation", objectTypeId="2-77")]

    answers = [deliver(client, events).status_code for _ in range(3)]

    assert answers == [204, 204, 204]
    assert len(queued_messages(redis_client)) == 1
    assert [e["object_id"] for e in queued_events(redis_client)] == [1, 2]
    counts = [
        (r.fields["kept"], r.fields["duplicates"])
        for r in logged(caplog, "webhook_received")
    ]
    assert counts == [(2, 0), (0, 2), (0, 2)]


def test_identical_events_inside_one_delivery_are_queued_once(client, redis_client):
    assert deliver(client, [event(1), event(1), event(1)]).status_code == 204

    assert [e["object_id"] for e in queued_events(redis_client)] == [1]


def test_a_redelivery_with_new_events_queues_only_the_new_ones(client, redis_client):
    deliver(client, [event(1), event(2)])

    assert deliver(client, [event(2), event(1), event(3)]).status_code == 204

    batches = [
        [e["object_id"] for e in m["args"][0]] for m in queued_messages(redis_client)
    ]
    assert batches == [[1, 2], [3]]


def test_a_delivery_of_only_duplicates_and_ignored_events_gets_204(
    client, redis_client
):
    deliver(client, [event(1)])

    response = deliver(client, [event(1), event(2, kind="contact.propertyChange")])

    assert response.status_code == 204
    assert len(queued_messages(redis_client)) == 1


@pytest.mark.parametrize(
    "second",
    [
        event(2, event_id=1, occurredAt=1_700_000_000_001),
        event(1, event_id=1, portalId=777),
        event(1, event_id=1, kind="company.creation"),
        event(1, event_id=1, kind="object.creation", objectTypeId="2-9"),
        event(1, event_id=1, occurredAt=1_700_000_000_999),
    ],
    ids=["object", "portal", "object_type", "custom_object_type", "occurred_at"],
)
def test_events_sharing_an_event_id_but_not_an_identity_are_both_queued(
    second, client, redis_client
):
    first = event(1, event_id=1)

    assert deliver(client, [first, second]).status_code == 204
    assert deliver(client, [second]).status_code == 204

    assert len(queued_events(redis_client)) == 2


def test_the_same_event_in_the_generic_shape_is_a_duplicate(client, redis_client):
    classic = event(1, kind="contact.creation")
    generic = event(1, kind="object.creation", objectTypeId="0-1")

    deliver(client, [classic])
    deliver(client, [generic])

    assert len(queued_events(redis_client)) == 1


# Claims that block a delivery


def test_an_event_pending_under_another_delivery_gets_503_and_claims_nothing(
    client, redis_client, caplog
):
    busy, free = event(1), event(2)
    redis_client.set(dedup_key(busy), "pending:other", px=30_000)

    response = deliver(client, [free, busy])

    assert response.status_code == 503
    assert queued_messages(redis_client) == []
    assert redis_client.get(dedup_key(free)) is None
    (deferred,) = logged(caplog, "webhook_deferred")
    assert deferred.levelno == logging.WARNING
    assert deferred.fields["reason"] == "pending_in_other_delivery"

    # The other delivery queues its event; HubSpot's redelivery adds the rest.
    redis_client.set(dedup_key(busy), "done")
    assert deliver(client, [free, busy]).status_code == 204
    assert [e["object_id"] for e in queued_events(redis_client)] == [2]


def test_a_claim_left_by_a_crashed_delivery_expires_and_lets_redelivery_through(
    client, redis_client
):
    redis_client.set(dedup_key(event(1)), "pending:crashed", px=500)

    assert deliver(client, [event(1)]).status_code == 503
    time.sleep(0.55)
    assert deliver(client, [event(1)]).status_code == 204

    assert len(queued_events(redis_client)) == 1


# A publish that fails


def test_an_unreachable_broker_gets_503_and_releases_the_claims(
    app, make_app, redis_client, caplog
):
    events = [event(1), event(2)]
    # Redis answers, the broker does not. Celery builds its connection pool at
    # the first publish, so the URL must change before any delivery is sent.
    celery = app.extensions["associator"].celery
    celery.conf.broker_url = f"redis://127.0.0.1:{closed_port()}/0"

    started = time.monotonic()
    response = deliver(app.test_client(), events)
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert elapsed < BROKER_TIMEOUT_SECONDS, "the broker connection was retried"
    (deferred,) = logged(caplog, "webhook_deferred")
    assert deferred.fields["reason"] == "publish_failed"
    assert redis_client.keys(DEDUP_PREFIX + "*") == []
    assert redis_client.llen(QUEUE) == 0

    # HubSpot's redelivery reaches a process whose broker is back.
    redelivered = make_app().test_client()
    for _ in range(2):
        assert deliver(redelivered, events).status_code == 204
    assert [e["object_id"] for e in queued_events(redis_client)] == [1, 2]


def test_a_publish_refused_by_the_broker_gets_503_until_it_recovers(
    client, redis_client
):
    events = [event(1), event(2)]
    # The queue's key holds a string: the broker refuses the push, Redis is fine.
    redis_client.set(QUEUE, "not a list")

    assert deliver(client, events).status_code == 503
    assert redis_client.keys(DEDUP_PREFIX + "*") == []

    redis_client.delete(QUEUE)
    assert deliver(client, events).status_code == 204
    assert deliver(client, events).status_code == 204
    assert [e["object_id"] for e in queued_events(redis_client)] == [1, 2]


def test_an_unusable_event_is_not_stored_twice_when_the_publish_fails(
    client, redis_client
):
    events = [event(1, objectId=None), event(2)]
    redis_client.set(QUEUE, "not a list")
    assert deliver(client, events).status_code == 503

    redis_client.delete(QUEUE)
    assert deliver(client, events).status_code == 204

    assert redis_client.zcard("associator:dead-letters") == 1
    assert [e["object_id"] for e in queued_events(redis_client)] == [2]


# Concurrent deliveries, over real HTTP


@pytest.fixture
def server(app):
    """The app behind werkzeug's threaded HTTP server; yields its webhook URL."""
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(
        target=http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}/webhooks/hubspot"
    http.shutdown()
    thread.join()


def post_at_once(url, bodies):
    """POST every body from its own thread, all released together."""
    start = threading.Barrier(len(bodies))
    answers = [None] * len(bodies)

    def post(index, body):
        with requests.Session() as session:
            start.wait()
            response = session.post(
                url, data=body, headers=signed_headers(body, url), timeout=10
            )
            answers[index] = response.status_code

    threads = [
        threading.Thread(target=post, args=(i, body)) for i, body in enumerate(bodies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_concurrent_copies_of_a_delivery_queue_each_event_exactly_once(
    server, redis_client
):
    rounds = []
    for round_number in range(6):
        events = [event(round_number * 100 + i) for i in range(30)]
        body = encode(events)
        answers = post_at_once(server, [body] * 3)

        assert set(answers) <= {204, 503}
        assert 204 in answers
        rounds.append(body)

    for body in rounds:
        assert post_at_once(server, [body]) == [204]
    counts = queued_keys(redis_client)
    assert len(counts) == 6 * 30
    assert set(counts.values()) == {1}


def test_concurrent_overlapping_deliveries_queue_each_event_exactly_once(
    server, redis_client
):
    events = [event(i) for i in range(40)]
    bodies = [encode(events[i * 10 : i * 10 + 20]) for i in range(3)]

    for _ in range(4):
        assert set(post_at_once(server, bodies)) <= {204, 503}
    assert [post_at_once(server, [body]) for body in bodies] == [[204]] * 3

    counts = queued_keys(redis_client)
    assert len(counts) == 40
    assert set(counts.values()) == {1}

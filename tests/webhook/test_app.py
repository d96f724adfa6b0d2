"""POST /webhooks/hubspot on the real app and a real Redis: size, signature, shape,
then what is queued, set aside or ignored, and how each answer is logged."""

import logging
import socket
import threading
import time

import pytest

from tests.support import (
    PORTAL_ID,
    SECRET,
    encode,
    event,
    queued_events,
    queued_messages,
    signed_headers,
)
from webhook.signature import sign_v1, sign_v3
from workers.dead_letters import ENTRY_PREFIX, DeadLetterStore

URL = "http://localhost/webhooks/hubspot"
PUBLIC_URL = "https://hooks.example.com/hubspot/inbound"
MEBIBYTE = 1024 * 1024
HUBSPOT_TIMEOUT_SECONDS = 5
UNAVAILABLE = b"queue unavailable, retry later\n"


@pytest.fixture
def app(make_app):
    # Built during setup: create_app replaces the root logger's handlers, and
    # caplog attaches its own afresh when the test itself starts.
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def capture_logs_of_an_app_built_in_the_test(caplog):
    logging.getLogger().addHandler(caplog.handler)


def logged(caplog, name):
    return [r for r in caplog.records if r.getMessage() == name]


def deliver(client, events, *, url=URL, signed_url=None, headers=None):
    """POST ``events`` (a list, or raw bytes) signed as HubSpot signs them."""
    body = events if isinstance(events, bytes) else encode(events)
    sent = signed_headers(body, signed_url or url)
    sent.update(headers or {})
    return client.post(url, data=body, headers=sent)


def queued_refs(redis):
    return [
        (e["object_type_id"], e["object_id"], e["kind"]) for e in queued_events(redis)
    ]


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers on them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    stop = threading.Event()
    held = []

    def accept_and_say_nothing():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join()
    listener.close()
    for connection in held:
        connection.close()


# Size


def test_a_body_above_the_limit_gets_413_before_its_signature_is_checked(
    make_app, caplog
):
    client = make_app(ASSOCIATOR_MAX_BODY_BYTES="1024").test_client()
    capture_logs_of_an_app_built_in_the_test(caplog)

    response = client.post(URL, data=b"[" + b" " * 1023 + b"]")

    assert response.status_code == 413
    (rejected,) = logged(caplog, "webhook_rejected")
    assert rejected.levelno == logging.WARNING
    assert rejected.fields["reason"] == "body_too_large"


def test_the_default_limit_is_one_mebibyte(client, redis_client):
    at_limit = encode([event(1)]).ljust(MEBIBYTE)
    assert deliver(client, at_limit).status_code == 204
    assert deliver(client, at_limit + b" ").status_code == 413
    assert len(queued_events(redis_client)) == 1


# Signature


def _stale(body, url):
    return signed_headers(body, url, timestamp=int((time.time() - 360) * 1000))


def _future(body, url):
    return signed_headers(body, url, timestamp=int((time.time() + 360) * 1000))


def _malformed_timestamp(body, url):
    headers = signed_headers(body, url)
    timestamp = "+" + headers["X-HubSpot-Request-Timestamp"]
    headers["X-HubSpot-Request-Timestamp"] = timestamp
    headers["X-HubSpot-Signature-v3"] = sign_v3(SECRET, "POST", url, body, timestamp)
    return headers


def _without(*names):
    def build(body, url):
        headers = signed_headers(body, url)
        for name in names:
            del headers[name]
        return headers

    return build


def _v1_only(**changes):
    def build(body, url):
        headers = _without("X-HubSpot-Signature-v3", "X-HubSpot-Request-Timestamp")(
            body, url
        )
        headers.update(changes)
        return headers

    return build


REFUSALS = {
    "no_signature_at_all": (
        lambda body, url: {"Content-Type": "application/json"},
        "missing_signature",
    ),
    "wrong_secret": (
        lambda body, url: signed_headers(body, url, secret="not-the-secret"),
        "signature_mismatch",
    ),
    "signed_for_another_url": (
        lambda body, url: signed_headers(body, "https://elsewhere.example/hook"),
        "signature_mismatch",
    ),
    "signed_for_another_body": (
        lambda body, url: signed_headers(body + b" ", url),
        "signature_mismatch",
    ),
    "stale_timestamp": (_stale, "stale_timestamp"),
    "future_timestamp": (_future, "future_timestamp"),
    "malformed_timestamp": (_malformed_timestamp, "malformed_timestamp"),
    "v3_without_timestamp": (
        _without("X-HubSpot-Request-Timestamp"),
        "missing_timestamp",
    ),
    "v1_with_a_wrong_digest": (
        _v1_only(**{"X-HubSpot-Signature": sign_v1("not-the-secret", b"[]")}),
        "signature_mismatch",
    ),
    "unknown_version": (
        _v1_only(**{"X-HubSpot-Signature-Version": "v9"}),
        "unknown_signature_version",
    ),
}


@pytest.mark.parametrize("cause", list(REFUSALS))
def test_an_unverified_delivery_gets_401_with_one_body_for_every_cause(
    cause, client, redis_client, caplog
):
    build_headers, reason = REFUSALS[cause]
    body = encode([event(1), event(2, kind="contact.creation", portalId=None)])

    response = client.post(URL, data=body, headers=build_headers(body, URL))

    assert response.status_code == 401
    assert response.data == b"invalid signature\n"
    (rejected,) = logged(caplog, "webhook_rejected")
    assert rejected.levelno == logging.WARNING
    assert rejected.fields == {"reason": reason, "status": 401}
    assert queued_events(redis_client) == []
    assert DeadLetterStore(redis_client).list() == []
    assert logged(caplog, "webhook_received") == []


def test_requiring_v3_refuses_a_delivery_signed_only_with_v1(make_app, caplog):
    client = make_app(ASSOCIATOR_REQUIRE_V3="true").test_client()
    capture_logs_of_an_app_built_in_the_test(caplog)
    body = encode([event(1)])

    response = client.post(URL, data=body, headers=_v1_only()(body, URL))

    assert response.status_code == 401
    assert response.data == b"invalid signature\n"
    (rejected,) = logged(caplog, "webhook_rejected")
    assert rejected.fields["reason"] == "v3_required"


def test_a_delivery_signed_only_with_v1_is_accepted_by_default(
    client, redis_client, caplog
):
    body = encode([event(1)])

    response = client.post(URL, data=body, headers=_v1_only()(body, URL))

    assert response.status_code == 204
    (received,) = logged(caplog, "webhook_received")
    assert received.fields["signature"] == "v1"
    assert len(queued_events(redis_client)) == 1


def test_the_signature_is_checked_before_the_shape(client):
    response = client.post(URL, data=b"this is not json")

    assert response.status_code == 401


# Shape


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"\xff\xfe\x00", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b"null", "not_an_array"),
        (b'{"eventId": 1}', "not_an_array"),
        (b"[1, 2]", "not_an_array_of_objects"),
        (b'[{"eventId": 1}, []]', "not_an_array_of_objects"),
    ],
)
def test_a_verified_body_that_is_not_an_array_of_objects_gets_400(
    body, reason, client, caplog
):
    response = deliver(client, body)

    assert response.status_code == 400
    assert response.data == b"the body must be a JSON array of event objects\n"
    (rejected,) = logged(caplog, "webhook_rejected")
    assert rejected.levelno == logging.WARNING
    assert rejected.fields == {"reason": reason, "status": 400}


def test_an_empty_array_gets_204(client, redis_client):
    assert deliver(client, []).status_code == 204
    assert queued_messages(redis_client) == []


def test_a_wrong_method_is_refused_not_failed(client):
    assert client.get(URL).status_code == 405


# The URI that HubSpot signed


def test_the_query_string_is_part_of_the_signed_uri(client):
    url = URL + "?portal=62515&label=a%3Ab%20c"

    assert deliver(client, [event(1)], url=url).status_code == 204
    assert deliver(client, [event(2)], url=url, signed_url=URL).status_code == 401


def test_behind_a_proxy_the_uri_is_rebuilt_from_the_forwarded_headers(client):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "hooks.example.com"}
    public = "https://hooks.example.com/webhooks/hubspot"

    ok = deliver(client, [event(1)], signed_url=public, headers=forwarded)
    as_seen_inside = deliver(client, [event(2)], signed_url=URL, headers=forwarded)

    assert ok.status_code == 204
    assert as_seen_inside.status_code == 401


def test_behind_a_proxy_the_query_string_is_still_signed(client):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "hooks.example.com"}
    public = "https://hooks.example.com/webhooks/hubspot?app=7"

    response = deliver(
        client, [event(1)], url=URL + "?app=7", signed_url=public, headers=forwarded
    )

    assert response.status_code == 204


def test_only_the_nearest_proxy_hop_is_trusted(client):
    forwarded = {
        "X-Forwarded-Proto": "http, https",
        "X-Forwarded-Host": "spoofed.example, hooks.example.com",
    }

    trusted = deliver(
        client,
        [event(1)],
        signed_url="https://hooks.example.com/webhooks/hubspot",
        headers=forwarded,
    )
    spoofed = deliver(
        client,
        [event(2)],
        signed_url="http://spoofed.example/webhooks/hubspot",
        headers=forwarded,
    )

    assert trusted.status_code == 204
    assert spoofed.status_code == 401


def test_a_public_url_is_the_signed_uri_whatever_the_proxy_says(make_app):
    client = make_app(ASSOCIATOR_PUBLIC_URL=PUBLIC_URL).test_client()
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "internal.example"}

    assert deliver(client, [event(1)], signed_url=PUBLIC_URL).status_code == 204
    assert (
        deliver(client, [event(2)], signed_url=PUBLIC_URL, headers=forwarded)
    ).status_code == 204
    assert (
        deliver(
            client,
            [event(3)],
            signed_url="https://internal.example/webhooks/hubspot",
            headers=forwarded,
        )
    ).status_code == 401


def test_a_public_url_without_a_query_gets_the_requests_query(make_app):
    client = make_app(ASSOCIATOR_PUBLIC_URL=PUBLIC_URL).test_client()
    url = URL + "?portal=62515"

    signed_with_query = deliver(
        client, [event(1)], url=url, signed_url=PUBLIC_URL + "?portal=62515"
    )
    signed_without = deliver(client, [event(2)], url=url, signed_url=PUBLIC_URL)

    assert signed_with_query.status_code == 204
    assert signed_without.status_code == 401


def test_a_public_url_with_its_own_query_is_signed_as_configured(make_app):
    public = PUBLIC_URL + "?key=abc"
    client = make_app(ASSOCIATOR_PUBLIC_URL=public).test_client()

    response = deliver(client, [event(1)], url=URL + "?other=1", signed_url=public)

    assert response.status_code == 204


# What is kept, ignored and set aside


def test_both_payload_shapes_are_queued(client, redis_client):
    events = [
        event(1, kind="contact.creation"),
        event(2, kind="company.creation"),
        event(3, kind="line_item.creation"),
        event(4, kind="object.creation", objectTypeId="0-3"),
        event(5, kind="object.creation", objectTypeId="2-123456"),
    ]

    assert deliver(client, events).status_code == 204
    assert queued_refs(redis_client) == [
        ("0-1", 1, "creation"),
        ("0-2", 2, "creation"),
        ("0-8", 3, "creation"),
        ("0-3", 4, "creation"),
        ("2-123456", 5, "creation"),
    ]


def test_association_change_events_are_queued(client, redis_client):
    classic = event(
        10,
        kind="contact.associationChange",
        objectId=None,
        associationType="CONTACT_TO_COMPANY",
        fromObjectId=10,
        toObjectId=20,
        associationRemoved=False,
        isPrimaryAssociation=True,
    )
    generic = event(
        11,
        kind="object.associationChange",
        objectId=None,
        fromObjectTypeId="0-3",
        toObjectTypeId="2-555",
        fromObjectId=11,
        toObjectId=30,
        associationTypeId=77,
        associationCategory="USER_DEFINED",
        associationRemoved=True,
    )

    assert deliver(client, [classic, generic]).status_code == 204

    assert queued_refs(redis_client) == [
        ("0-1", 10, "association_change"),
        ("0-3", 11, "association_change"),
    ]
    first, second = (e["association"] for e in queued_events(redis_client))
    assert (first["to_object_type_id"], first["to_object_id"]) == ("0-2", 20)
    assert first["primary"] is True
    assert (second["to_object_type_id"], second["to_object_id"]) == ("2-555", 30)
    assert second["removed"] is True


def test_other_subscription_types_are_acknowledged_counted_and_not_queued(
    client, redis_client, caplog
):
    others = [
        event(1, kind="contact.propertyChange", propertyName="email"),
        event(2, kind="company.deletion"),
        event(3, kind="deal.merge"),
        event(4, kind="object.propertyChange", objectTypeId="2-9"),
        event(5, kind="conversation.newMessage"),
        {"no": "subscription type"},
    ]

    assert deliver(client, others).status_code == 204

    assert queued_messages(redis_client) == []
    assert DeadLetterStore(redis_client).list() == []
    (received,) = logged(caplog, "webhook_received")
    assert (received.fields["ignored"], received.fields["kept"]) == (6, 0)


def test_an_unusable_event_is_a_dead_letter_and_the_rest_is_queued(
    client, redis_client, caplog
):
    no_object = event(1, objectId=None)
    no_portal = event(2, portalId=None)
    generic_without_type = event(3, kind="object.creation")
    good = event(4)

    response = deliver(client, [no_object, no_portal, generic_without_type, good])

    assert response.status_code == 204
    assert queued_refs(redis_client) == [("0-1", 4, "creation")]
    letters = DeadLetterStore(redis_client).list()
    assert sorted(letter.events[0]["eventId"] for letter in letters) == [1, 2, 3]
    for letter in letters:
        assert letter.reason == "invalid_event"
        (raw,) = letter.events
        assert (
            raw == {1: no_object, 2: no_portal, 3: generic_without_type}[raw["eventId"]]
        )
    (received,) = logged(caplog, "webhook_received")
    assert (received.fields["kept"], received.fields["invalid"]) == (1, 3)


def test_a_redelivered_unusable_event_stays_one_dead_letter(client, redis_client):
    for _ in range(3):
        assert deliver(client, [event(1, objectId=None)]).status_code == 204

    assert len(DeadLetterStore(redis_client).list()) == 1


def test_an_unusable_event_with_text_redis_cannot_encode_is_still_a_dead_letter(
    client, redis_client
):
    # A lone surrogate survives json.loads; it once made storing the dead
    # letter fail, and the delivery got 503 on every attempt.
    raw = {
        "subscriptionType": "object.creation",
        "objectTypeId": "\ud800",
        "portalId": 1,
        "objectId": 2,
    }

    assert deliver(client, [raw]).status_code == 204

    (letter,) = DeadLetterStore(redis_client).list()
    assert letter.events == [raw]


def test_no_dead_letter_holds_the_secret_or_the_signature(client, redis_client):
    leaky = event(1, objectId=None, note=f"the secret is {SECRET}")
    body = encode([leaky, event(2, portalId=SECRET)])
    headers = signed_headers(body, URL)

    assert client.post(URL, data=body, headers=headers).status_code == 204

    stored = [
        value
        for key in redis_client.keys(ENTRY_PREFIX + "*")
        for value in redis_client.hgetall(key).values()
    ]
    assert len(DeadLetterStore(redis_client).list()) == 2
    for secretive in (
        SECRET,
        headers["X-HubSpot-Signature"],
        headers["X-HubSpot-Signature-v3"],
    ):
        assert not any(secretive in value for value in stored)


# Logs


def test_one_line_per_delivery_tells_what_became_of_its_events(
    client, redis_client, caplog
):
    deliver(client, [event(1)])
    caplog.clear()
    events = [
        event(1),
        event(2, portalId=777),
        event(2, portalId=777),
        event(3, kind="contact.propertyChange"),
        event(4, objectId=None),
    ]

    assert deliver(client, events).status_code == 204

    (received,) = logged(caplog, "webhook_received")
    assert received.levelno == logging.INFO
    fields = dict(received.fields)
    assert isinstance(fields.pop("ms"), float)
    assert isinstance(fields.pop("delivery"), str)
    assert fields == {
        "portals": [777, PORTAL_ID],
        "events": 5,
        "kept": 1,
        "duplicates": 2,
        "ignored": 1,
        "invalid": 1,
        "signature": "v3",
    }


# Queue unavailable


def test_a_refused_redis_connection_gets_503(make_app, caplog):
    client = make_app(REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0").test_client()
    capture_logs_of_an_app_built_in_the_test(caplog)

    kept = deliver(client, [event(1)])
    unusable = deliver(client, [event(2, objectId=None)])

    assert (kept.status_code, kept.data) == (503, UNAVAILABLE)
    assert unusable.status_code == 503
    reasons = [r.fields["reason"] for r in logged(caplog, "webhook_deferred")]
    assert reasons == ["redis_unavailable", "redis_unavailable"]


@pytest.mark.parametrize(
    "events",
    [[event(1)], [event(1, objectId=None), event(2)]],
    ids=["kept_event", "unusable_and_kept_events"],
)
def test_a_redis_that_never_answers_gets_503_well_within_hubspots_timeout(
    events, make_app, silent_server
):
    client = make_app(REDIS_URL=silent_server).test_client()

    started = time.monotonic()
    response = deliver(client, events)
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert elapsed < HUBSPOT_TIMEOUT_SECONDS - 0.5


# Health


def test_healthz_answers_while_the_process_lives(make_app):
    client = make_app(REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0").test_client()

    assert client.get("/healthz").status_code == 200


def test_readyz_answers_200_when_redis_answers(client):
    assert client.get("/readyz").status_code == 200


def test_readyz_answers_503_when_redis_refuses(make_app):
    client = make_app(REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0").test_client()

    assert client.get("/readyz").status_code == 503


def test_readyz_answers_503_in_time_when_redis_never_answers(make_app, silent_server):
    client = make_app(REDIS_URL=silent_server).test_client()

    started = time.monotonic()
    assert client.get("/readyz").status_code == 503
    assert time.monotonic() - started < HUBSPOT_TIMEOUT_SECONDS - 0.5

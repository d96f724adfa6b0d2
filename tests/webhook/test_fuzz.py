"""Whatever a client sends, the receiver answers on purpose, never with a 500.

Signed bodies get 204, 400 or 413; anything not signed with the client secret
gets 401 and leaves no trace in the queue or the dead-letter store. One app and
one Redis serve every example of a test; Redis is emptied before each example.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import app_config
from tests.support import SECRET, encode, event, queued_events, signed_headers
from webhook import create_app
from webhook.signature import sign_v1
from workers.dead_letters import DeadLetterStore

URL = "http://localhost/webhooks/hubspot"
SIGNED_ANSWERS = {204, 400, 413}

# redis_client is function-scoped: each test empties Redis per example itself.
fuzzing = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def client(redis_server):
    return create_app(app_config(redis_server.url)).test_client()


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

EVENT_FIELDS = [
    "eventId",
    "subscriptionId",
    "portalId",
    "appId",
    "occurredAt",
    "subscriptionType",
    "attemptNumber",
    "objectId",
    "objectTypeId",
    "changeSource",
    "changeFlag",
    "sourceId",
    "associationType",
    "fromObjectId",
    "toObjectId",
    "fromObjectTypeId",
    "toObjectTypeId",
    "associationTypeId",
    "associationCategory",
    "associationRemoved",
    "isPrimaryAssociation",
]
junk = (
    json_values
    | st.sampled_from(
        [
            -1,
            0,
            2**63 - 1,
            2**63,
            2**64,
            10**30,
            "",
            "123",
            "12a",
            "-5",
            " 7",
            "٣",
            "0-1",
            "2-",
            "0-1\n",
            "contact.creation",
            "object.creation",
            "x.associationChange",
            "\ud800",
            "\ud800.creation",
            1.5,
            float("inf"),
        ]
    )
    | st.integers(min_value=-(2**64), max_value=2**64).map(str)
)
valid_events = st.sampled_from(
    [
        event(1),
        event(2, kind="deal.creation"),
        event(3, kind="object.creation", objectTypeId="2-123"),
        event(
            4,
            kind="contact.associationChange",
            objectId=None,
            associationType="CONTACT_TO_COMPANY",
            fromObjectId=4,
            toObjectId=40,
        ),
        event(
            5,
            kind="object.associationChange",
            objectId=None,
            fromObjectTypeId="0-3",
            toObjectTypeId="0-1",
            fromObjectId=5,
            toObjectId=50,
        ),
    ]
)


@st.composite
def mutated_events(draw):
    raw = dict(draw(valid_events))
    for name in draw(st.lists(st.sampled_from(EVENT_FIELDS), min_size=1, max_size=5)):
        if draw(st.booleans()):
            raw[name] = draw(junk)
        else:
            raw.pop(name, None)
    return raw


def deliver(client, body, headers=None):
    if headers is None:
        headers = signed_headers(body, URL)
    return client.post(URL, data=body, headers=headers)


def dead_letters(redis):
    return DeadLetterStore(redis).list()


@settings(fuzzing, max_examples=40)
@given(value=json_values)
def test_any_signed_json_value_gets_a_deliberate_answer(value, client, redis_client):
    redis_client.flushall()
    is_a_delivery = isinstance(value, list) and all(isinstance(v, dict) for v in value)

    response = deliver(client, json.dumps(value).encode())

    assert response.status_code == (204 if is_a_delivery else 400)


@settings(fuzzing, max_examples=20)
@given(body=st.binary(max_size=200))
def test_any_signed_bytes_get_a_deliberate_answer(body, client, redis_client):
    redis_client.flushall()

    assert deliver(client, body).status_code in SIGNED_ANSWERS


@settings(fuzzing, max_examples=40)
@given(
    events=st.lists(
        st.dictionaries(st.sampled_from(EVENT_FIELDS) | st.text(max_size=8), junk),
        max_size=6,
    )
)
def test_an_array_of_any_objects_is_a_delivery(events, client, redis_client):
    redis_client.flushall()

    response = deliver(client, encode(events))

    assert response.status_code == 204
    assert len(queued_events(redis_client)) + len(dead_letters(redis_client)) <= len(
        events
    )


@settings(fuzzing, max_examples=60)
@given(raw=mutated_events())
def test_a_mangled_event_is_queued_set_aside_or_ignored_never_a_failure(
    raw, client, redis_client
):
    redis_client.flushall()

    response = deliver(client, encode([raw, event(99)]))

    assert response.status_code == 204
    queued = queued_events(redis_client)
    letters = dead_letters(redis_client)
    assert queued[-1]["object_id"] == 99
    assert len(queued) - 1 + len(letters) <= 1
    for queued_event in queued:
        for name in ("portal_id", "object_id"):
            assert 0 <= queued_event[name] < 2**63
    for letter in letters:
        assert letter.reason == "invalid_event"
        assert SECRET not in json.dumps(letter.to_json())


def _unsigned(body):
    return {"Content-Type": "application/json"}


def _wrong_secret(body):
    return signed_headers(body, URL, secret=SECRET + "x")


def _signed_for_another_body(body):
    return signed_headers(body + b"\n", URL)


def _v1_with_wrong_secret(body):
    return {
        "X-HubSpot-Signature": sign_v1("not-" + SECRET, body),
        "X-HubSpot-Signature-Version": "v1",
    }


header_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60
)


@st.composite
def garbage_headers(draw, body):
    names = [
        "X-HubSpot-Signature",
        "X-HubSpot-Signature-Version",
        "X-HubSpot-Signature-v3",
        "X-HubSpot-Request-Timestamp",
    ]
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    return {name: draw(header_text) for name in chosen}


@settings(fuzzing, max_examples=40)
@given(data=st.data())
def test_anything_not_signed_with_the_secret_gets_401_and_leaves_no_trace(
    data, client, redis_client
):
    redis_client.flushall()
    body = data.draw(
        st.one_of(
            st.lists(mutated_events(), max_size=3).map(encode),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=100),
        )
    )
    sign = data.draw(
        st.sampled_from(
            [_unsigned, _wrong_secret, _signed_for_another_body, _v1_with_wrong_secret]
        )
    )
    headers = data.draw(st.one_of(st.just(sign(body)), garbage_headers(body)))

    response = deliver(client, body, headers)

    assert response.status_code == 401
    assert queued_events(redis_client) == []
    assert dead_letters(redis_client) == []

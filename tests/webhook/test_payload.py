"""Parsing deliveries into events: both shapes, ignored types, unusable events."""

import json

import pytest

from tests.support import event
from webhook.payload import MalformedDelivery, parse_delivery
from workers.events import ASSOCIATION_CHANGE, CREATION, Event


def parse(events):
    return parse_delivery(json.dumps(events).encode())


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"{}", b'"x"', b"[1, 2]", b"[{}, []]", b"\xff\xfe", b"null"],
)
def test_refuses_a_body_that_is_not_an_array_of_objects(body):
    with pytest.raises(MalformedDelivery):
        parse_delivery(body)


def test_refuses_absurdly_nested_json_without_crashing():
    with pytest.raises(MalformedDelivery):
        parse_delivery(b"[" * 100_000)


def test_an_empty_array_is_a_delivery_of_nothing():
    delivery = parse([])
    assert (delivery.events, delivery.invalid, delivery.ignored) == ([], [], 0)


@pytest.mark.parametrize(
    ("kind", "type_id"),
    [
        ("contact.creation", "0-1"),
        ("company.creation", "0-2"),
        ("deal.creation", "0-3"),
        ("ticket.creation", "0-5"),
        ("product.creation", "0-7"),
        ("line_item.creation", "0-8"),
    ],
)
def test_classic_creation_maps_to_its_object_type(kind, type_id):
    (parsed,) = parse([event(7, kind=kind)]).events
    assert parsed.object_type_id == type_id
    assert parsed.kind == CREATION


def test_keeps_every_field_the_workers_need():
    raw = event(123, event_id=99, sourceId="userId:5", changeSource="IMPORT")
    (parsed,) = parse([raw]).events
    assert parsed == Event(
        portal_id=62515,
        object_type_id="0-1",
        object_id=123,
        occurred_at=raw["occurredAt"],
        event_id=99,
        subscription_type="contact.creation",
        kind=CREATION,
        change_source="IMPORT",
        source_id="userId:5",
    )


def test_generic_creation_keeps_custom_object_types():
    (parsed,) = parse([event(5, kind="object.creation", objectTypeId="2-4567")]).events
    assert parsed.object_type_id == "2-4567"
    assert parsed.object_ref == "2-4567:5"


def test_ids_sent_as_strings_are_read_as_numbers():
    raw = event(5, portalId="62515", objectId="5", eventId="8")
    (parsed,) = parse([raw]).events
    assert (parsed.portal_id, parsed.object_id, parsed.event_id) == (62515, 5, 8)


@pytest.mark.parametrize(
    "raw",
    [
        event(1, objectId=None),
        event(1, portalId=None),
        event(1, portalId=True),
        event(1, objectId="12abc"),
        event(1, objectId=-3),
        event(1, objectId=2**64),
        event(1, kind="object.creation"),
        event(1, kind="object.creation", objectTypeId="contacts"),
    ],
)
def test_an_unusable_event_is_set_aside_without_sinking_the_delivery(raw):
    delivery = parse([raw, event(2)])
    assert [e.object_id for e in delivery.events] == [2]
    (invalid,) = delivery.invalid
    assert invalid.reason == "invalid_event"
    assert invalid.raw == raw


@pytest.mark.parametrize(
    "kind",
    [
        "contact.propertyChange",
        "contact.deletion",
        "company.merge",
        "deal.restore",
        "conversation.creation",
        "unknownthing.creation",
        "conversation.newMessage",
        "object.propertyChange",
    ],
)
def test_other_subscription_types_are_counted_not_kept(kind):
    delivery = parse([event(1, kind=kind), {"no": "type"}])
    assert delivery.events == []
    assert delivery.ignored == 2


def test_classic_association_change_names_both_sides():
    raw = event(
        10,
        kind="deal.associationChange",
        objectId=None,
        associationType="DEAL_TO_CONTACT",
        fromObjectId=10,
        toObjectId=20,
        associationRemoved=False,
        isPrimaryAssociation=False,
    )
    (parsed,) = parse([raw]).events
    assert parsed.kind == ASSOCIATION_CHANGE
    assert (parsed.object_type_id, parsed.object_id) == ("0-3", 10)
    change = parsed.association
    assert (change.from_object_type_id, change.from_object_id) == ("0-3", 10)
    assert (change.to_object_type_id, change.to_object_id) == ("0-1", 20)
    assert change.removed is False


def test_generic_association_change_takes_its_types_from_the_event():
    raw = event(
        10,
        kind="object.associationChange",
        objectId=None,
        fromObjectTypeId="0-8",
        toObjectTypeId="0-3",
        fromObjectId=10,
        toObjectId=20,
        associationTypeId=20,
        associationCategory="HUBSPOT_DEFINED",
        associationRemoved=True,
    )
    (parsed,) = parse([raw]).events
    assert parsed.object_type_id == "0-8"
    assert parsed.association.association_type_id == 20
    assert parsed.association.removed is True


def test_the_dedup_key_is_portal_type_object_event_and_time():
    a = parse([event(1, event_id=5)]).events[0]
    b = parse([event(2, event_id=5)]).events[0]
    assert a.dedup_key == f"62515:0-1:1:5:{a.occurred_at}"
    assert a.dedup_key != b.dedup_key


def test_events_survive_the_trip_through_the_queue_as_json():
    raw = event(
        10,
        kind="object.associationChange",
        fromObjectTypeId="0-1",
        toObjectTypeId="0-2",
        fromObjectId=10,
        toObjectId=20,
    )
    (parsed,) = parse([raw]).events
    assert Event.from_json(json.loads(json.dumps(parsed.to_json()))) == parsed

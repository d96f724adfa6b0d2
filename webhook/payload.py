"""Turn a verified delivery body into events.

A delivery is a JSON array of event objects. The whole delivery is refused only
when it is not that; one unusable event never sinks the others, it is set aside
as :class:`InvalidEvent` for the dead-letter store.
"""

import json
import re
from dataclasses import dataclass, field

from workers.events import (
    ASSOCIATION_CHANGE,
    CREATION,
    OBJECT_TYPE_IDS,
    AssociationChange,
    Event,
)

OBJECT_TYPE_ID = re.compile(r"\A[0-9]+-[0-9]+\Z")
GENERIC_PREFIX = "object"


class MalformedDelivery(Exception):
    """The body is not a JSON array of objects."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class InvalidEvent:
    reason: str
    detail: str
    raw: dict


@dataclass
class Delivery:
    events: list[Event] = field(default_factory=list)
    invalid: list[InvalidEvent] = field(default_factory=list)
    ignored: int = 0

    @property
    def portals(self) -> list[int]:
        return sorted({e.portal_id for e in self.events})


def parse_delivery(body: bytes) -> Delivery:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedDelivery("invalid_json") from exc

    if not isinstance(data, list):
        raise MalformedDelivery("not_an_array")
    if not all(isinstance(item, dict) for item in data):
        raise MalformedDelivery("not_an_array_of_objects")

    delivery = Delivery()
    for raw in data:
        try:
            event = parse_event(raw)
        except _Unusable as exc:
            delivery.invalid.append(
                InvalidEvent("invalid_event", str(exc), _storable(raw))
            )
            continue
        if event is None:
            delivery.ignored += 1
        else:
            delivery.events.append(event)
    return delivery


class _Unusable(Exception):
    pass


def parse_event(raw: dict) -> Event | None:
    """The event, or None for a subscription type this service does not act on."""
    subscription_type = raw.get("subscriptionType")
    if not isinstance(subscription_type, str) or "." not in subscription_type:
        return None
    prefix, _, action = subscription_type.partition(".")
    if prefix != GENERIC_PREFIX and prefix not in OBJECT_TYPE_IDS:
        # conversation.creation and other products' events: not CRM records.
        return None
    if action == "creation":
        kind = CREATION
    elif action == "associationChange":
        kind = ASSOCIATION_CHANGE
    else:
        return None

    portal_id = _id(raw.get("portalId"))
    if portal_id is None:
        raise _Unusable("no usable portalId")

    association = _association(raw, prefix) if kind == ASSOCIATION_CHANGE else None
    object_type_id = _object_type_id(raw, prefix, association)
    if object_type_id is None:
        raise _Unusable(f"no usable object type for {subscription_type!r}")

    object_id = _id(raw.get("objectId"))
    if object_id is None and association is not None:
        object_id = association.from_object_id
    if object_id is None:
        raise _Unusable("no usable objectId")

    return Event(
        portal_id=portal_id,
        object_type_id=object_type_id,
        object_id=object_id,
        occurred_at=_id(raw.get("occurredAt")),
        event_id=_id(raw.get("eventId")),
        subscription_type=subscription_type,
        kind=kind,
        change_source=_text(raw.get("changeSource")),
        source_id=_text(raw.get("sourceId")),
        association=association,
    )


def _object_type_id(raw, prefix, association) -> str | None:
    if prefix != GENERIC_PREFIX:
        return OBJECT_TYPE_IDS.get(prefix)
    type_id = raw.get("objectTypeId")
    if type_id is None and association is not None:
        type_id = association.from_object_type_id
    if isinstance(type_id, str) and OBJECT_TYPE_ID.match(type_id):
        return type_id
    return None


def _association(raw: dict, prefix: str) -> AssociationChange:
    association_type = _text(raw.get("associationType"))
    from_type = _type_id(raw.get("fromObjectTypeId"))
    to_type = _type_id(raw.get("toObjectTypeId"))

    # Classic events name the pair in associationType: "LINE_ITEM_TO_DEAL".
    if association_type and "_TO_" in association_type:
        from_name, _, to_name = association_type.lower().partition("_to_")
        from_type = from_type or OBJECT_TYPE_IDS.get(from_name)
        to_type = to_type or OBJECT_TYPE_IDS.get(to_name)
    if from_type is None and prefix != GENERIC_PREFIX:
        from_type = OBJECT_TYPE_IDS.get(prefix)

    return AssociationChange(
        association_type=association_type,
        from_object_type_id=from_type,
        from_object_id=_id(raw.get("fromObjectId")),
        to_object_type_id=to_type,
        to_object_id=_id(raw.get("toObjectId")),
        association_type_id=_id(raw.get("associationTypeId")),
        association_category=_text(raw.get("associationCategory")),
        removed=raw.get("associationRemoved") is True,
        primary=raw.get("isPrimaryAssociation") is True,
    )


def _storable(raw: dict) -> dict:
    """The raw event, or a stand-in when it is too deeply nested to store."""
    try:
        json.dumps(raw)
    except (RecursionError, ValueError):
        return {"unstorable": "nested too deeply to store", "keys": sorted(raw)[:20]}
    return raw


def _id(value) -> int | None:
    """HubSpot ids and epoch milliseconds: JSON numbers, sometimes strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 2**63 else None
    if isinstance(value, str) and 0 < len(value) <= 19 and value.isascii():
        if not value.isdigit():
            return None
        number = int(value)
        return number if number < 2**63 else None
    return None


def _type_id(value) -> str | None:
    if isinstance(value, str) and OBJECT_TYPE_ID.match(value):
        return value
    return None


def _text(value) -> str | None:
    if value is None:
        return None
    return str(value) if isinstance(value, str | int) else None

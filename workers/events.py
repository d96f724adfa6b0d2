"""The event model shared by the receiver and the workers.

Both of HubSpot's payload shapes (classic ``contact.creation`` and generic
``object.creation`` with ``objectTypeId``) map to one :class:`Event`. Events travel
through the queue as the plain dicts of :meth:`Event.to_json`.
"""

from dataclasses import asdict, dataclass

CREATION = "creation"
ASSOCIATION_CHANGE = "association_change"

# HubSpot's object type ids of the standard objects, by the names used in classic
# subscription types (``line_item.creation``) and association types (``LINE_ITEM``).
OBJECT_TYPE_IDS = {
    "contact": "0-1",
    "company": "0-2",
    "deal": "0-3",
    "ticket": "0-5",
    "product": "0-7",
    "line_item": "0-8",
    "quote": "0-14",
}
OBJECT_NAMES = {type_id: name for name, type_id in OBJECT_TYPE_IDS.items()}


def object_label(object_type_id: str) -> str:
    """``0-1`` -> ``contact``; custom objects keep their id (``2-123``)."""
    return OBJECT_NAMES.get(object_type_id, object_type_id)


@dataclass(frozen=True)
class AssociationChange:
    association_type: str | None
    from_object_type_id: str | None
    from_object_id: int | None
    to_object_type_id: str | None
    to_object_id: int | None
    association_type_id: int | None
    association_category: str | None
    removed: bool
    primary: bool


@dataclass(frozen=True)
class Event:
    portal_id: int
    object_type_id: str
    object_id: int
    occurred_at: int | None
    event_id: int | None
    subscription_type: str
    kind: str
    change_source: str | None = None
    source_id: str | None = None
    association: AssociationChange | None = None

    @property
    def dedup_key(self) -> str:
        """Identity of one event; ``eventId`` alone is not unique at HubSpot.

        An association change also names its other end, so two changes of one
        record in the same instant stay two events.
        """
        parts = [
            self.portal_id,
            self.object_type_id,
            self.object_id,
            self.event_id,
            self.occurred_at,
        ]
        if self.association is not None:
            parts += [
                self.association.to_object_type_id,
                self.association.to_object_id,
            ]
        return ":".join(str(part if part is not None else "") for part in parts)

    @property
    def object_ref(self) -> str:
        return f"{object_label(self.object_type_id)}:{self.object_id}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Event":
        association = data.get("association")
        fields = {**data, "association": None}
        if association:
            fields["association"] = AssociationChange(**association)
        return cls(**fields)

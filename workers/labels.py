"""Association type ids, resolved from HubSpot's label definitions.

Type ids are directional (contact->company unlabeled is 279, company->contact
280) and user-defined labels exist only per account, so they are read from the
labels endpoint and cached in Redis for a day. HubSpot's defined table is the
fallback for unlabeled and Primary when the endpoint cannot be reached.
"""

import json

from workers.events import object_label
from workers.hubspot import AssociationType, HubSpotError
from workers.logs import get_logger
from workers.rules import PRIMARY, UNLABELED, RulesError

log = get_logger(__name__)

HUBSPOT_DEFINED = "HUBSPOT_DEFINED"
LABELS_PREFIX = "associator:labels:"

# HubSpot's defined type ids: (from, to) -> {name: type id}.
DEFINED_TYPES = {
    ("0-1", "0-2"): {UNLABELED: 279, PRIMARY: 1},
    ("0-2", "0-1"): {UNLABELED: 280, PRIMARY: 2},
    ("0-3", "0-1"): {UNLABELED: 3},
    ("0-1", "0-3"): {UNLABELED: 4},
    ("0-3", "0-2"): {UNLABELED: 341, PRIMARY: 5},
    ("0-2", "0-3"): {UNLABELED: 342, PRIMARY: 6},
    ("0-3", "0-8"): {UNLABELED: 19},
    ("0-8", "0-3"): {UNLABELED: 20},
    ("0-5", "0-1"): {UNLABELED: 16},
    ("0-1", "0-5"): {UNLABELED: 15},
    ("0-5", "0-2"): {UNLABELED: 339, PRIMARY: 26},
    ("0-2", "0-5"): {UNLABELED: 340, PRIMARY: 25},
    ("0-5", "0-3"): {UNLABELED: 28},
    ("0-3", "0-5"): {UNLABELED: 27},
    ("0-3", "0-14"): {UNLABELED: 63},
    ("0-14", "0-3"): {UNLABELED: 64},
    ("0-14", "0-8"): {UNLABELED: 67},
    ("0-8", "0-14"): {UNLABELED: 68},
}


class LabelResolver:
    def __init__(self, redis, *, refresh_seconds: int):
        self.redis = redis
        self.refresh_seconds = refresh_seconds

    def definitions(
        self, client, portal_id, from_type, to_type, *, fallback: bool = True
    ) -> list[AssociationType]:
        """The pair's types; HubSpot's defined table when they cannot be read and
        ``fallback`` allows it (it holds no user-defined label)."""
        key = f"{LABELS_PREFIX}{portal_id}:{from_type}:{to_type}"
        cached = self.redis.get(key)
        if cached:
            return [AssociationType(*item) for item in json.loads(cached)]
        try:
            types = client.label_definitions(from_type, to_type)
        except HubSpotError as exc:
            defined = DEFINED_TYPES.get((from_type, to_type)) if fallback else None
            if not defined:
                raise
            log.warning(
                "labels_fallback",
                portal=portal_id,
                pair=f"{object_label(from_type)}->{object_label(to_type)}",
                reason=type(exc).__name__,
            )
            return [
                AssociationType(HUBSPOT_DEFINED, type_id, None if n == UNLABELED else n)
                for n, type_id in defined.items()
            ]
        self.redis.set(
            key,
            json.dumps([[t.category, t.type_id, t.label] for t in types]),
            ex=self.refresh_seconds,
        )
        return types

    def resolve(self, client, portal_id, from_type, to_type, name) -> AssociationType:
        """The type written for ``name``: unlabeled, Primary or a user label."""
        # A user's label is only in the portal's definitions: while they cannot be
        # read, the error stands (a retry), not an unknown label.
        types = self.definitions(
            client,
            portal_id,
            from_type,
            to_type,
            fallback=name in (UNLABELED, PRIMARY),
        )
        for t in types:
            if name == UNLABELED and t.category == HUBSPOT_DEFINED and not t.label:
                return t
            if name == PRIMARY and t.category == HUBSPOT_DEFINED and t.label == PRIMARY:
                return t
        if name == UNLABELED:
            # A custom object's unlabeled type is USER_DEFINED, not HubSpot's.
            for t in types:
                if not t.label:
                    return t
        if name not in (UNLABELED, PRIMARY):
            for t in types:
                if t.label and t.label.strip().lower() == name.strip().lower():
                    return t
        fallback = DEFINED_TYPES.get((from_type, to_type), {}).get(name)
        if fallback is not None and name in (UNLABELED, PRIMARY):
            return AssociationType(
                HUBSPOT_DEFINED, fallback, None if name == UNLABELED else PRIMARY
            )
        raise RulesError(
            f"the label {name!r} is not defined for "
            f"{object_label(from_type)} -> {object_label(to_type)} in portal "
            f"{portal_id}; define it in HubSpot or change the rule"
        )

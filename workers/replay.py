"""Replaying dead letters: an entry's events go back on the queue as new work.

Exceptions, each with a ``reason`` and the ``entry_id``; in every case the entry
stays in the store::

    ReplayError
    ├── EntryNotFound   no entry has that id
    ├── ReplayRefused   its events cannot become work (still unusable)
    └── PublishFailed   the work could not be queued

The queued task carries ``meta = {"reason": "replay", "replay": <entry id>}``, and
the worker redoes its events although their recorded outcome is
``dead_lettered``. The entry is removed only once its work is queued, and only
while it is the version that was replayed: when the replayed work fails again
before the removal, the entry stored anew stays.
"""

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webhook.payload import MalformedDelivery, parse_delivery
from workers import connections
from workers.dead_letters import DeadLetter, DeadLetterStore
from workers.events import Event
from workers.logs import get_logger

log = get_logger(__name__)

REPLAY = "replay"
# The receiver stores unusable events under this reason as HubSpot sent them; every
# other reason holds events as queued (Event.to_json).
INVALID_EVENT = "invalid_event"

# publish(events, meta) -> id of the queued task
Publish = Callable[[list[dict], dict], str]


class ReplayError(Exception):
    reason = "replay_failed"

    def __init__(self, entry_id: str, message: str):
        super().__init__(message)
        self.entry_id = entry_id


class EntryNotFound(ReplayError):
    reason = "not_found"

    def __init__(self, entry_id: str):
        super().__init__(entry_id, f"no dead letter with id {entry_id}")


class ReplayRefused(ReplayError):
    reason = "refused"


class PublishFailed(ReplayError):
    reason = "publish_failed"


@dataclass(frozen=True)
class Replayed:
    entry_id: str
    events: int
    portals: list[int]
    task_id: str
    # False when the entry was stored again while its work was being queued.
    removed: bool


def replay(store: DeadLetterStore, entry_id: str, publish: Publish) -> Replayed:
    """Queue the work of one entry again, then remove the entry."""
    entry = store.get(entry_id)
    if entry is None:
        raise EntryNotFound(entry_id)
    events = replay_events(entry)

    meta = {"reason": REPLAY, "replay": entry.id}
    try:
        task_id = publish(events, meta)
    except Exception as exc:
        raise PublishFailed(
            entry.id,
            f"dead letter {entry.id} could not be queued "
            f"({type(exc).__name__}: {exc}); it stays",
        ) from exc

    removed = store.remove(entry.id, last_at=entry.last_at)
    portals = sorted({e["portal_id"] for e in events})
    log.info(
        "dead_letter_replayed",
        entry=entry.id,
        reason=entry.reason,
        events=len(events),
        portals=portals,
        task=task_id,
        removed=removed,
    )
    return Replayed(entry.id, len(events), portals, task_id, removed)


def replay_events(entry: DeadLetter) -> list[dict]:
    """The events to queue for ``entry``, as Event dicts; raises ReplayRefused."""
    if not entry.events:
        raise ReplayRefused(entry.id, f"dead letter {entry.id} holds no events")
    if entry.reason == INVALID_EVENT:
        return _parse_again(entry)

    for raw in entry.events:
        try:
            Event.from_json(raw)
        except (TypeError, AttributeError) as exc:
            raise ReplayRefused(
                entry.id,
                f"dead letter {entry.id} holds an event that is not a queued event "
                f"({exc})",
            ) from exc
    return entry.events


def _parse_again(entry: DeadLetter) -> list[dict]:
    """Raw HubSpot events, parsed as the receiver parses a delivery."""
    try:
        delivery = parse_delivery(json.dumps(entry.events).encode())
    except MalformedDelivery as exc:
        raise ReplayRefused(
            entry.id,
            f"dead letter {entry.id} is not a list of HubSpot events ({exc.reason})",
        ) from exc

    if delivery.invalid:
        details = "; ".join(invalid.detail for invalid in delivery.invalid)
        raise ReplayRefused(
            entry.id, f"dead letter {entry.id} is still unusable: {details}"
        )
    if delivery.ignored:
        raise ReplayRefused(
            entry.id,
            f"dead letter {entry.id} holds {delivery.ignored} event(s) of a type "
            "the service does not act on",
        )
    return [event.to_json() for event in delivery.events]


@contextlib.contextmanager
def queue_publisher(settings) -> Iterator[Publish]:
    """A publish function sending tasks to the worker's queue on ``REDIS_URL``."""
    app = connections.celery_app(settings, role="operator")

    def publish(events: list[dict], meta: dict) -> str:
        result = app.send_task(
            connections.PROCESS_EVENTS,
            args=[events],
            kwargs={"meta": meta},
            queue=connections.QUEUE,
        )
        return result.id

    try:
        yield publish
    finally:
        app.close()

"""What the worker does with queued events.

The Celery task in :mod:`workers.worker` only turns its JSON arguments into a
call of :func:`handle_events`, so the logic is tested without Celery.
"""

from dataclasses import dataclass

from workers.events import Event
from workers.logs import get_logger
from workers.outcomes import SKIPPED, OutcomeStore

log = get_logger(__name__)


@dataclass
class WorkerContext:
    redis: object
    outcomes: OutcomeStore
    has_credentials: bool


def handle_events(raw_events: list[dict], *, context: WorkerContext, task_id: str):
    events = [Event.from_json(raw) for raw in raw_events]
    log.info("events_picked_up", task=task_id, events=len(events))

    for event in events:
        if context.outcomes.get(event.dedup_key) is not None:
            # Already decided by an earlier delivery of the same work.
            log.info("event_already_done", task=task_id, event=event.dedup_key)
            continue
        if not context.has_credentials:
            context.outcomes.record(
                event.dedup_key, SKIPPED, reason="no_credentials", task=task_id
            )
            log.warning(
                "event_outcome",
                outcome=SKIPPED,
                reason="no_credentials",
                portal=event.portal_id,
                object=event.object_ref,
                event_id=event.event_id,
                subscription=event.subscription_type,
                task=task_id,
            )
            continue
        # TODO: plan and write the missing associations (the association rules
        # and the HubSpot client come next); until then the event is only logged.
        log.info(
            "event_received",
            portal=event.portal_id,
            object=event.object_ref,
            event_id=event.event_id,
            subscription=event.subscription_type,
            task=task_id,
        )

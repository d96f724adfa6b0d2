"""The Celery worker process: ``celery -A workers.worker worker``.

Importing this module reads the settings and refuses to start, with a clear
message, when the worker could not do its job (no ``REDIS_URL``, or no
``HUBSPOT_ACCESS_TOKEN`` outside ``associator run``).
"""

import sys

from celery import signals

from workers import connections
from workers.logs import configure_logging, get_logger
from workers.outcomes import OutcomeStore
from workers.settings import ConfigError, Settings
from workers.tasks import WorkerContext, handle_events

log = get_logger(__name__)


def _load_settings() -> Settings:
    try:
        settings = Settings.from_env()
        required = ["REDIS_URL"]
        if not settings.local:
            required.append("HUBSPOT_ACCESS_TOKEN")
        settings.require(*required, role="worker")
    except ConfigError as exc:
        print(f"associator: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


settings = _load_settings()
app = connections.celery_app(settings, role="worker")
_context: WorkerContext | None = None


@signals.setup_logging.connect
def _setup_logging(**_):
    # Connected, so Celery leaves the root logger to us.
    configure_logging(settings, process="worker")


@signals.worker_ready.connect
def _announce(**_):
    if settings.hubspot_access_token:
        log.info("worker_ready", queue=connections.QUEUE, credentials="private_app")
    else:
        log.warning(
            "worker_ready",
            queue=connections.QUEUE,
            credentials="none",
            detail="HUBSPOT_ACCESS_TOKEN is not set: events are skipped "
            "with reason no_credentials",
        )


def context() -> WorkerContext:
    global _context
    if _context is None:
        redis = connections.redis_client(settings, role="worker")
        _context = WorkerContext(
            redis=redis,
            outcomes=OutcomeStore(redis),
            has_credentials=bool(settings.hubspot_access_token),
        )
    return _context


@app.task(name=connections.PROCESS_EVENTS, bind=True)
def process_events(self, events: list[dict], delivery_id: str | None = None):
    handle_events(events, context=context(), task_id=self.request.id)

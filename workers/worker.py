"""The Celery worker process: ``celery -A workers.worker worker``.

Importing this module reads the settings and refuses to start, with a clear
message, when the worker could not do its job (no ``REDIS_URL``, or no
``HUBSPOT_ACCESS_TOKEN`` outside ``associator run``).
"""

import sys

from celery import signals
from celery.exceptions import Reject
from redis.exceptions import RedisError

from workers import connections
from workers.credentials import PrivateAppCredentials
from workers.dead_letters import DeadLetterStore
from workers.delays import DelaySet, Mover
from workers.hubspot import HubSpotError
from workers.labels import LabelResolver
from workers.logs import Redactor, configure_logging, get_logger
from workers.outcomes import OutcomeStore
from workers.ratelimit import RateLimiter
from workers.rules import RulesError, load_rules
from workers.settings import ConfigError, Settings
from workers.tasks import WorkerContext, run_task

log = get_logger(__name__)


def _load_settings() -> Settings:
    try:
        settings = Settings.from_env()
        required = ["REDIS_URL"]
        if not settings.local:
            required.append("HUBSPOT_ACCESS_TOKEN")
        settings.require(*required, role="worker")
        load_rules(settings.rules_path)
    except (ConfigError, RulesError) as exc:
        print(f"associator: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


settings = _load_settings()
app = connections.celery_app(settings, role="worker")
_context: WorkerContext | None = None
_mover: Mover | None = None


@signals.setup_logging.connect
def _setup_logging(**_):
    # Connected, so Celery leaves the root logger to us.
    configure_logging(settings, process="worker")


def context() -> WorkerContext:
    """The worker's shared pieces, built once per process (after the fork)."""
    global _context
    if _context is None:
        redis = connections.redis_client(settings, role="worker")
        credentials = PrivateAppCredentials(settings, redis)
        _context = WorkerContext(
            settings=settings,
            redis=redis,
            outcomes=OutcomeStore(redis),
            dead_letters=DeadLetterStore(redis, Redactor(settings.secrets)),
            delays=DelaySet(redis, lease_seconds=settings.delay_lease_seconds),
            rules=load_rules(settings.rules_path),
            labels=LabelResolver(redis, refresh_seconds=settings.label_cache_seconds),
            credentials_for=credentials.credentials_for,
            credentials=credentials,
            limiter=RateLimiter(
                redis,
                default_per_10s=settings.rate_limit_per_10s,
                search_per_second=settings.search_limit_per_second,
                share=settings.rate_limit_share,
                max_wait_seconds=settings.rate_limit_max_wait_seconds,
                daily_defer_seconds=settings.daily_defer_seconds,
                probe_wait_seconds=settings.daily_probe_wait_seconds,
                # Longer than the probe call itself can take.
                probe_lease_seconds=3 * settings.http_timeout_seconds,
            ),
        )
    return _context


def publish(events: list[dict], meta: dict) -> None:
    app.send_task(
        connections.PROCESS_EVENTS,
        args=[events],
        kwargs={"meta": meta},
        queue=connections.QUEUE,
    )


@signals.worker_ready.connect
def _start(**_):
    global _mover
    shared = context()
    credentials = shared.credentials
    if credentials.configured:
        try:
            portal = credentials.token_portal()
        except HubSpotError as exc:
            log.error("token_portal_unknown", reason=str(exc))
            portal = None
        log.info(
            "worker_ready",
            queue=connections.QUEUE,
            credentials="private_app",
            portal=portal,
            api_version=settings.hubspot_api_version,
            rules=[r.name for r in shared.rules.rules],
            dry_run=settings.dry_run,
        )
    else:
        log.warning(
            "worker_ready",
            queue=connections.QUEUE,
            credentials="none",
            detail="HUBSPOT_ACCESS_TOKEN is not set: events are skipped "
            "with reason no_credentials",
        )
    _mover = Mover(
        shared.delays, publish, interval_seconds=settings.mover_interval_seconds
    )
    _mover.start()


@signals.worker_shutdown.connect
def _stop(**_):
    if _mover is not None:
        _mover.stop()


@app.task(name=connections.PROCESS_EVENTS, bind=True)
def process_events(
    self, events: list[dict], delivery_id: str | None = None, meta: dict | None = None
):
    try:
        run_task(events, context=context(), task_id=self.request.id, meta=meta)
    except RedisError as exc:
        # Back on the queue (or, with Redis gone, left unacknowledged for the
        # broker to restore): the work is not lost.
        log.warning("task_requeued", task=self.request.id, reason=type(exc).__name__)
        raise Reject(str(exc), requeue=True) from exc

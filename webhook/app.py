"""The receiver: verify HubSpot's webhook deliveries and queue their events.

It answers within HubSpot's 5-second timeout by doing only four things: check the
size, verify the signature on the raw body, parse, and hand the events to
:class:`~webhook.intake.Intake`. Everything else happens in the worker.
"""

import secrets
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from webhook.intake import Intake, QueueUnavailable
from webhook.payload import MalformedDelivery, parse_delivery
from webhook.signature import SignatureError, verify_signature
from workers import connections
from workers.dead_letters import DeadLetterStore
from workers.logs import Redactor, configure_logging, get_logger
from workers.settings import ConfigError, Settings

log = get_logger(__name__)

WEBHOOK_PATH = "/webhooks/hubspot"


def create_app(config: Mapping[str, str] | None = None) -> Flask:
    """The WSGI app. ``config`` maps variable names to values over the environment.

    Without ``config`` (gunicorn in production) a missing setting ends the process
    with a clear message instead of serving into a queue nobody reads.
    """
    try:
        settings = Settings.from_env(**dict(config or {}))
        settings.require("REDIS_URL", "HUBSPOT_CLIENT_SECRET", role="web")
    except ConfigError as exc:
        if config is not None:
            raise
        print(f"associator: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings, process="web")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # HubSpot signs the public URL; behind one proxy hop (a PaaS router) the
    # scheme and host it called arrive in X-Forwarded-Proto/-Host.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)

    redis = connections.redis_client(settings, role="web")
    celery = connections.celery_app(settings, role="web")
    dead_letters = DeadLetterStore(redis, Redactor(settings.secrets))

    def publish(events, delivery_id):
        celery.send_task(
            connections.PROCESS_EVENTS,
            args=[events],
            kwargs={"delivery_id": delivery_id},
            queue=connections.QUEUE,
            retry=False,
        )

    app.extensions["associator"] = Receiver(
        settings=settings,
        redis=redis,
        celery=celery,
        intake=Intake(
            redis,
            publish,
            dead_letters,
            pending_seconds=settings.dedup_pending_seconds,
            done_seconds=settings.dedup_ttl_seconds,
            budget_seconds=settings.redis_budget_seconds,
        ),
    )

    app.add_url_rule(WEBHOOK_PATH, view_func=receive_webhook, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz)
    app.add_url_rule("/readyz", view_func=readyz)
    app.register_error_handler(RequestEntityTooLarge, body_too_large)
    app.register_error_handler(Exception, unexpected_error)
    return app


class Receiver:
    def __init__(self, *, settings: Settings, redis, celery, intake: Intake):
        self.settings = settings
        self.redis = redis
        self.celery = celery
        self.intake = intake


def _receiver() -> Receiver:
    return current_app.extensions["associator"]


def receive_webhook():
    receiver = _receiver()
    settings = receiver.settings
    started = time.monotonic()
    body = request.get_data(cache=True)

    try:
        version = verify_signature(
            secret=settings.hubspot_client_secret,
            method=request.method,
            uri=signed_uri(settings.public_url),
            body=body,
            headers=request.headers,
            require_v3=settings.require_v3,
            max_skew=timedelta(seconds=settings.signature_max_age_seconds),
        )
    except SignatureError as exc:
        log.warning("webhook_rejected", reason=exc.reason, status=401)
        return _plain("invalid signature", 401)

    try:
        delivery = parse_delivery(body)
    except MalformedDelivery as exc:
        log.warning("webhook_rejected", reason=exc.reason, status=400)
        return _plain("the body must be a JSON array of event objects", 400)

    delivery_id = secrets.token_hex(8)
    try:
        result = receiver.intake.accept(delivery, delivery_id=delivery_id)
    except QueueUnavailable as exc:
        log.warning(
            "webhook_deferred",
            reason=exc.reason,
            status=503,
            delivery=delivery_id,
            events=len(delivery.events),
            ms=_ms(started),
        )
        return _plain("queue unavailable, retry later", 503)

    log.info(
        "webhook_received",
        delivery=delivery_id,
        portals=delivery.portals,
        events=len(delivery.events) + len(delivery.invalid) + delivery.ignored,
        kept=result.kept,
        duplicates=result.duplicates,
        ignored=result.ignored,
        invalid=result.invalid,
        signature=version,
        ms=_ms(started),
    )
    return Response(status=204)


def signed_uri(public_url: str | None) -> str:
    """The URL HubSpot called, as it signed it, query string included."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw is None:
        raw = request.full_path if request.query_string else request.path
    path_and_query = raw if raw.startswith("/") else _path_of(raw)

    if public_url:
        if urlsplit(public_url).query or "?" not in path_and_query:
            return public_url
        return public_url + "?" + path_and_query.split("?", 1)[1]
    return f"{request.scheme}://{request.host}{path_and_query}"


def _path_of(absolute: str) -> str:
    # An absolute-form request target ("http://host/path?q"): keep path and query.
    parts = urlsplit(absolute)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def healthz():
    return _plain("ok", 200)


def readyz():
    try:
        _receiver().redis.ping()
    except Exception as exc:
        log.warning("not_ready", reason=type(exc).__name__)
        return _plain("redis unavailable", 503)
    return _plain("ready", 200)


def body_too_large(exc):
    log.warning("webhook_rejected", reason="body_too_large", status=413)
    return _plain("body too large", 413)


def unexpected_error(exc):
    if isinstance(exc, HTTPException):
        return exc
    # A bug must not make HubSpot drop the delivery: 503 makes it come back.
    log.exception("webhook_failed", reason=type(exc).__name__, status=503)
    return _plain("temporarily unavailable, retry later", 503)


def _plain(text: str, status: int) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain")


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)

"""Connections to Redis: the state store (redis-py) and the Celery broker.

The web process must answer HubSpot within 5 seconds, so its connections have
short connect and read timeouts and never retry on their own: a Redis that is down
or hangs turns into a 503 in time, and HubSpot redelivers later. The worker can
wait longer and lets Celery reconnect.
"""

import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

QUEUE = "associator"
PROCESS_EVENTS = "associator.process_events"


def redis_client(settings, *, role: str) -> redis.Redis:
    timeout = (
        settings.redis_timeout_seconds
        if role == "web"
        else settings.worker_redis_timeout_seconds
    )
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        health_check_interval=30,
    )


def celery_app(settings, *, role: str) -> Celery:
    app = Celery("associator", broker=settings.redis_url, set_as_current=False)
    transport_options = {
        "visibility_timeout": settings.visibility_timeout_seconds,
        # Messages of a lost worker come back once the visibility timeout has
        # passed, at the next sweep; kombu would sweep only every tenth tick.
        "unacked_restore_interval": settings.unacked_restore_seconds,
        "unacked_restore_throttle": 1,
        # One worker sweeps at a time, under a lock. A worker killed during its
        # sweep would hold it for kombu's 5 minutes, on top of the visibility
        # timeout; held one interval, it costs one sweep. (Sweeps that overlap
        # are harmless: each message is restored in a transaction.)
        "unacked_mutex_expire": max(settings.unacked_restore_seconds, 1),
    }
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        enable_utc=True,
        broker_connection_retry_on_startup=True,
        # A worker waits out a Redis outage of any length rather than exiting
        # after Celery's default 100 tries (about 50 minutes).
        broker_connection_max_retries=None,
        # A task that outlives the visibility timeout would be handed out twice.
        task_time_limit=settings.task_time_limit_seconds,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task killed by its time limit comes back rather than being
        # acknowledged with its events unrecorded; its deliveries are counted.
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
        broker_transport_options=transport_options,
    )
    if role == "web":
        timeout = settings.redis_timeout_seconds
        transport_options.update(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            # Without it kombu retries a refused connection for its connect
            # timeout and more (about 2 s) before the publish fails.
            max_retries=0,
        )
        app.conf.update(
            broker_connection_timeout=timeout,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            task_publish_retry=False,
            broker_pool_limit=None,
        )
    return app

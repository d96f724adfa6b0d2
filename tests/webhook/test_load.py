"""The receiver under concurrent deliveries, through a real gunicorn and Redis.

Every event of every acknowledged delivery is queued once and only once, however
the deliveries interleave across gunicorn's processes and threads.
"""

import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import (
    PORTAL_ID,
    SECRET,
    encode,
    event,
    free_port,
    queued_events,
    queued_messages,
    service_environment,
    signed_headers,
    wait_for_status,
)
from workers.events import Event

DELIVERIES = 10
EVENTS_PER_DELIVERY = 100
REQUEST_TIMEOUT_SECONDS = 10
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10


@pytest.fixture(scope="module")
def receiver_url(redis_server, tmp_path_factory):
    """The webhook URL of a gunicorn with two processes of four threads each."""
    directory = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "--threads",
        "4",
        "--no-control-socket",
        "webhook:create_app()",
    ]
    env = service_environment(
        REDIS_URL=redis_server.url,
        HUBSPOT_CLIENT_SECRET=SECRET,
        ASSOCIATOR_LOG_FORMAT="json",
    )
    log_path = directory / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    try:
        try:
            wait_for_status(
                f"http://127.0.0.1:{port}/healthz",
                timeout_seconds=START_TIMEOUT_SECONDS,
                process=process,
            )
        except AssertionError as exc:
            pytest.fail(f"{exc}\n--- gunicorn.log ---\n{log_path.read_text()}")
        yield f"http://127.0.0.1:{port}/webhooks/hubspot"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def deliveries() -> list[list[dict]]:
    """Ten deliveries of a hundred events each, no event in two of them."""
    return [
        [
            event(number * EVENTS_PER_DELIVERY + position + 1)
            for position in range(EVENTS_PER_DELIVERY)
        ]
        for number in range(DELIVERIES)
    ]


def post_concurrently(url: str, bodies: list[bytes]) -> list[int]:
    """POST every body at once, each from its own thread; the statuses in order."""
    start = threading.Barrier(len(bodies))

    def post(body: bytes) -> int:
        headers = signed_headers(body, url)
        start.wait(timeout=REQUEST_TIMEOUT_SECONDS)
        response = requests.post(
            url, data=body, headers=headers, timeout=REQUEST_TIMEOUT_SECONDS
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(post, bodies))


def assert_queued_exactly_once(redis, sent: list[list[dict]]) -> None:
    queued = [Event.from_json(raw) for raw in queued_events(redis)]

    repeated = {
        key: count
        for key, count in Counter(e.dedup_key for e in queued).items()
        if count > 1
    }
    assert repeated == {}
    assert len(queued) == DELIVERIES * EVENTS_PER_DELIVERY
    assert {(e.portal_id, e.object_id, e.event_id) for e in queued} == {
        (PORTAL_ID, raw["objectId"], raw["eventId"])
        for delivery in sent
        for raw in delivery
    }


def test_concurrent_deliveries_are_all_accepted_and_queued_exactly_once(
    receiver_url, redis_client
):
    sent = deliveries()

    statuses = post_concurrently(receiver_url, [encode(d) for d in sent])

    assert statuses == [204] * DELIVERIES
    assert_queued_exactly_once(redis_client, sent)
    # One task message per delivery, holding all of its events.
    assert len(queued_messages(redis_client)) == DELIVERIES


def test_concurrent_redeliveries_are_accepted_and_queue_nothing_more(
    receiver_url, redis_client
):
    sent = deliveries()
    bodies = [encode(d) for d in sent]

    first = post_concurrently(receiver_url, bodies)
    again = post_concurrently(receiver_url, bodies)

    assert first == [204] * DELIVERIES
    assert again == [204] * DELIVERIES
    assert_queued_exactly_once(redis_client, sent)
    assert len(queued_messages(redis_client)) == DELIVERIES


def test_the_same_deliveries_racing_each_other_still_queue_each_event_once(
    receiver_url, redis_client
):
    sent = deliveries()
    bodies = [encode(d) for d in sent]

    # Each delivery twice at once, as when HubSpot retries one that is slow.
    raced = post_concurrently(receiver_url, bodies + bodies)
    # HubSpot sends a refused delivery again later.
    refused = [
        body
        for body, status in zip(bodies + bodies, raced, strict=True)
        if status != 204
    ]
    retried = post_concurrently(receiver_url, refused) if refused else []

    assert set(raced) <= {204, 503}
    assert retried == [204] * len(refused)
    assert_queued_exactly_once(redis_client, sent)

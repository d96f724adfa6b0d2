"""How fast the receiver takes signed deliveries: latency and throughput.

Starts an embedded Redis and a gunicorn serving the receiver (two processes of
four threads, as ``associator run`` starts it), posts signed deliveries of 100
distinct events each from several threads at once, prints the p50 and p99 latency
of a delivery and the deliveries and events per second, and stops both::

    python benchmarks/receiver.py [--deliveries 500] [--concurrency 10]

Nothing of the machine's configuration is used: no ``REDIS_URL``, no HubSpot
credentials, and a client secret made up for the run.
"""

import argparse
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

from webhook.signature import sign_v1, sign_v3
from workers.connections import QUEUE
from workers.embedded_redis import EmbeddedRedis, die_with_parent

PORTAL_ID = 62515
EVENTS_PER_DELIVERY = 100
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 4
REQUEST_TIMEOUT_SECONDS = 10
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=500, help="default 500")
    parser.add_argument("--concurrency", type=int, default=10, help="default 10")
    args = parser.parse_args(argv)
    if args.deliveries < 1 or args.concurrency < 1:
        parser.error("--deliveries and --concurrency must be at least 1")

    with tempfile.TemporaryDirectory(prefix="associator-bench-") as directory:
        directory = Path(directory)
        with EmbeddedRedis(directory / "redis") as server:
            secret = secrets.token_urlsafe(32)
            port = _free_port()
            log_path = directory / "gunicorn.log"
            web = _start_gunicorn(port, server.url, secret, log_path)
            try:
                url = f"http://127.0.0.1:{port}"
                if not _wait_until_ready(f"{url}/readyz", web):
                    print(log_path.read_text(), file=sys.stderr)
                    print("benchmark: gunicorn did not get ready", file=sys.stderr)
                    return 1
                results = _send(
                    f"{url}/webhooks/hubspot",
                    secret,
                    deliveries=args.deliveries,
                    concurrency=args.concurrency,
                )
            finally:
                _stop(web)
            with redis.Redis.from_url(server.url) as client:
                queued = client.llen(QUEUE)

    return _report(results, args, queued)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_gunicorn(port: int, redis_url: str, secret: str, log_path: Path):
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HUBSPOT_", "ASSOCIATOR_"))
        and name not in ("REDIS_URL", "PORT")
    }
    env.update(
        REDIS_URL=redis_url,
        HUBSPOT_CLIENT_SECRET=secret,
        ASSOCIATOR_LOG_FORMAT="json",
    )
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(GUNICORN_WORKERS),
        "--threads",
        str(GUNICORN_THREADS),
        "--no-control-socket",
        "webhook:create_app()",
    ]
    # Its log goes to a file, as it would on a platform: a pipe nobody reads
    # would stall it.
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=log_path.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )


def _wait_until_ready(url: str, web: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and web.poll() is None:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return False


def _stop(web: subprocess.Popen) -> None:
    web.send_signal(signal.SIGTERM)
    try:
        web.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        web.kill()
        web.wait()


def _delivery(number: int) -> bytes:
    """A body of 100 events that no other delivery of the run shares."""
    now = int(time.time() * 1000)
    events = []
    for position in range(EVENTS_PER_DELIVERY):
        object_id = number * EVENTS_PER_DELIVERY + position + 1
        events.append(
            {
                "eventId": object_id,
                "subscriptionId": 1,
                "portalId": PORTAL_ID,
                "appId": 54321,
                "occurredAt": now,
                "subscriptionType": "contact.creation",
                "attemptNumber": 0,
                "objectId": object_id,
                "changeSource": "CRM_UI",
                "changeFlag": "CREATED",
            }
        )
    return json.dumps(events).encode()


def _send(url: str, secret: str, *, deliveries: int, concurrency: int) -> dict:
    # One keep-alive connection per sending thread.
    local = threading.local()

    def post(number: int) -> tuple[int, float]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        body = _delivery(number)
        timestamp = str(int(time.time() * 1000))
        headers = {
            "Content-Type": "application/json",
            "X-HubSpot-Signature": sign_v1(secret, body),
            "X-HubSpot-Signature-Version": "v1",
            "X-HubSpot-Signature-v3": sign_v3(secret, "POST", url, body, timestamp),
            "X-HubSpot-Request-Timestamp": timestamp,
        }

        started = time.perf_counter()
        try:
            status = session.post(
                url, data=body, headers=headers, timeout=REQUEST_TIMEOUT_SECONDS
            ).status_code
        except requests.RequestException:
            status = 0
        return status, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(post, range(deliveries)))
    elapsed = time.perf_counter() - started

    return {
        "statuses": [status for status, _ in answers],
        "latencies_ms": sorted(seconds * 1000 for _, seconds in answers),
        "elapsed_seconds": elapsed,
    }


def _percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def _report(results: dict, args, queued: int) -> int:
    latencies = results["latencies_ms"]
    elapsed = results["elapsed_seconds"]
    failed = [status for status in results["statuses"] if status != 204]
    events = args.deliveries * EVENTS_PER_DELIVERY

    print(
        f"receiver: gunicorn {GUNICORN_WORKERS} processes x {GUNICORN_THREADS} "
        "threads, embedded Redis (appendfsync always)"
    )
    print(
        f"sent:     {args.deliveries} deliveries x {EVENTS_PER_DELIVERY} events, "
        f"concurrency {args.concurrency}, in {elapsed:.2f} s"
    )
    print(
        f"latency:  p50 {_percentile(latencies, 50):.1f} ms, "
        f"p99 {_percentile(latencies, 99):.1f} ms, "
        f"max {latencies[-1]:.1f} ms"
    )
    print(
        f"rate:     {args.deliveries / elapsed:.1f} deliveries/s, "
        f"{events / elapsed:.0f} events/s"
    )
    print(f"queued:   {queued} task messages for {args.deliveries} deliveries")
    if queued != args.deliveries:
        print(
            f"benchmark: expected one task message per delivery, found {queued}",
            file=sys.stderr,
        )
        return 1
    if failed:
        print(
            f"benchmark: {len(failed)} deliveries were not answered 204 "
            f"(statuses {sorted(set(failed))}; 0 is no answer)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

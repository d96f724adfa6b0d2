"""Helpers shared by the tests: signing deliveries, reading the queue, and
watching the real processes a test starts.
"""

import base64
import json
import os
import socket
import time
from pathlib import Path

import requests

from webhook.signature import sign_v1, sign_v3
from workers.connections import QUEUE

SECRET = "test-client-secret-0123456789"
PORTAL_ID = 62515


def event(object_id=123, *, kind="contact.creation", event_id=None, **fields):
    """One HubSpot-shaped event; ``fields`` override or add keys."""
    raw = {
        "eventId": object_id if event_id is None else event_id,
        "subscriptionId": 12345,
        "portalId": PORTAL_ID,
        "appId": 54321,
        "occurredAt": 1_700_000_000_000 + object_id,
        "subscriptionType": kind,
        "attemptNumber": 0,
        "objectId": object_id,
        "changeSource": "CRM_UI",
        "changeFlag": "CREATED",
    }
    raw.update(fields)
    return raw


def signed_headers(body: bytes, url: str, *, secret=SECRET, timestamp=None):
    """Headers as HubSpot sends them on a CRM webhook delivery: v1 and v3."""
    timestamp = str(int(time.time() * 1000) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "X-HubSpot-Signature": sign_v1(secret, body),
        "X-HubSpot-Signature-Version": "v1",
        "X-HubSpot-Signature-v3": sign_v3(secret, "POST", url, body, timestamp),
        "X-HubSpot-Request-Timestamp": timestamp,
    }


def encode(events) -> bytes:
    return json.dumps(events).encode()


def queued_messages(redis, queue=QUEUE) -> list[dict]:
    """Task messages waiting in the Celery queue, decoded (oldest first)."""
    messages = []
    for raw in reversed(redis.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
        messages.append(
            {"task": message["headers"]["task"], "args": args, "kwargs": kwargs}
        )
    return messages


def queued_events(redis, queue=QUEUE) -> list[dict]:
    """Every event in every queued task message."""
    return [e for m in queued_messages(redis, queue) for e in m["args"][0]]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_environment(**variables: str) -> dict[str, str]:
    """``os.environ`` without any setting of this service, plus ``variables``.

    A child process started with it sees only what the test gives it, not the
    credentials or Redis of the machine running the tests.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HUBSPOT_", "ASSOCIATOR_"))
        and name not in ("REDIS_URL", "PORT")
    }
    env.update(variables)
    return env


def wait_for_status(url, *, status=200, timeout_seconds=30.0, process=None):
    """Poll ``url`` until it answers ``status``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"the process exited with {process.returncode} before {url} "
                f"answered {status}"
            )
        try:
            if requests.get(url, timeout=1).status_code == status:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer {status} in {timeout_seconds}s")
        time.sleep(0.1)


def processes_in(directory: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process working in ``directory`` or below it.

    Every process a test starts with ``cwd=directory`` works there, and so do its
    descendants (redis-server moves into its data directory below it), however
    they were forked and whoever adopted them. Linux only: it reads ``/proc``.
    """
    directory = Path(directory).resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            # Gone meanwhile, a zombie, or not ours to inspect.
            continue
        if cwd == directory or directory in cwd.parents:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry.name), command))
    return found

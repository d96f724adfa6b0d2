"""Helpers shared by the tests: signing deliveries and reading the queue."""

import base64
import json
import time

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

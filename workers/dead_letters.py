"""The dead-letter store: work that cannot succeed, kept for an operator.

An entry holds the event(s) as received or queued, the reason (a stable
snake_case word such as ``invalid_event``), details, attempts, the first and last
time it was stored, and the portal. Entries live in Redis: a hash per entry and a
sorted set indexing them by last time.

The same work stored twice (HubSpot redelivering an unusable event) updates one
entry, because the id is derived from the reason and the events. No entry ever
holds a secret: every text goes through the redactor, and header-like fields
(signatures, tokens) are never passed in.

Putting an entry back as work is :mod:`workers.replay`.
"""

import hashlib
import json
import time
from dataclasses import dataclass

from redis.exceptions import WatchError

from workers.logs import Redactor

INDEX_KEY = "associator:dead-letters"
ENTRY_PREFIX = "associator:dead-letter:"


@dataclass(frozen=True)
class DeadLetter:
    id: str
    reason: str
    details: str
    events: list
    attempts: int
    first_at: float
    last_at: float
    portal_id: int | None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "reason": self.reason,
            "details": self.details,
            "events": self.events,
            "attempts": self.attempts,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "portal_id": self.portal_id,
        }


class DeadLetterStore:
    def __init__(self, redis, redact: Redactor | None = None):
        self.redis = redis
        self.redact = redact or Redactor()

    @staticmethod
    def entry_id(reason: str, events: list) -> str:
        canonical = json.dumps([reason, events], sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    def add(
        self,
        reason: str,
        events: list,
        *,
        details: str = "",
        attempts: int = 0,
        portal_id: int | None = None,
        pipeline=None,
    ) -> str:
        """Store (or refresh) an entry; returns its id.

        With ``pipeline`` the commands are only queued on it, so a caller can
        store several entries in one round trip.
        """
        events_text = self.redact(json.dumps(events, default=str))
        entry_id = self.entry_id(reason, json.loads(events_text))
        key = ENTRY_PREFIX + entry_id
        now = time.time()

        pipe = pipeline if pipeline is not None else self.redis.pipeline()
        pipe.hsetnx(key, "first_at", repr(now))
        pipe.hset(
            key,
            mapping={
                "reason": reason,
                "details": self.redact(details),
                "events": events_text,
                "attempts": attempts,
                "last_at": repr(now),
                "portal_id": "" if portal_id is None else portal_id,
            },
        )
        pipe.zadd(INDEX_KEY, {entry_id: now})
        if pipeline is None:
            pipe.execute()
        return entry_id

    def get(self, entry_id: str) -> DeadLetter | None:
        data = self.redis.hgetall(ENTRY_PREFIX + entry_id)
        if not data:
            return None
        return _entry(entry_id, data)

    def ids(self) -> list[str]:
        """Every indexed entry id, the least recently stored first."""
        return [_text(i) for i in self.redis.zrange(INDEX_KEY, 0, -1)]

    def list(self) -> list[DeadLetter]:
        ids = self.ids()
        pipe = self.redis.pipeline()
        for entry_id in ids:
            pipe.hgetall(ENTRY_PREFIX + entry_id)
        return [
            _entry(entry_id, data)
            for entry_id, data in zip(ids, pipe.execute(), strict=True)
            if data
        ]

    def remove(self, entry_id: str, *, last_at: float | None = None) -> bool:
        """Delete an entry; True when there was one to delete.

        With ``last_at`` the entry is deleted only while it is still the version
        stored at that time: one stored again meanwhile (the same work failing
        again) stays.
        """
        key = ENTRY_PREFIX + entry_id
        with self.redis.pipeline() as pipe:
            if last_at is not None:
                pipe.watch(key)
                stored = pipe.hget(key, "last_at")
                if stored is None or float(_text(stored)) != last_at:
                    return False
                pipe.multi()
            pipe.delete(key)
            pipe.zrem(INDEX_KEY, entry_id)
            try:
                deleted, _ = pipe.execute()
            except WatchError:
                return False
        return bool(deleted)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(entry_id: str, data: dict) -> DeadLetter:
    data = {_text(k): _text(v) for k, v in data.items()}
    portal = data.get("portal_id") or None
    return DeadLetter(
        id=entry_id,
        reason=data.get("reason", ""),
        details=data.get("details", ""),
        events=json.loads(data.get("events", "[]")),
        attempts=int(data.get("attempts", 0)),
        first_at=float(data.get("first_at", 0)),
        last_at=float(data.get("last_at", 0)),
        portal_id=int(portal) if portal else None,
    )

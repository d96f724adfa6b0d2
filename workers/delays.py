"""All delayed work goes through one Redis sorted set, scored by due time.

The settle delay, rechecks, retry backoff and rate-limit deferrals are entries in
this set; none is a Celery ``eta``/``countdown``, because with Redis as broker a
task held past the visibility timeout is handed out twice. Every worker process
runs a :class:`Mover` that takes due entries with an atomic script and publishes
them as tasks. Taking an entry leases it (pushes its score forward) instead of
removing it, so an entry whose publisher dies comes due again; it is removed once
published. Publishing twice is harmless because tasks are idempotent.
"""

import json
import secrets
import threading
import time

from workers.logs import get_logger

log = get_logger(__name__)

DELAY_KEY = "associator:delayed"

# KEYS[1]: the set. ARGV: now, lease seconds, how many.
TAKE_DUE_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local lease_until = tonumber(ARGV[1]) + tonumber(ARGV[2])
for i, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], lease_until, member)
end
return due
"""


class DelaySet:
    def __init__(self, redis, *, lease_seconds: float = 60.0):
        self.redis = redis
        self.lease_seconds = lease_seconds
        self._take_due = redis.register_script(TAKE_DUE_SCRIPT)

    def add(
        self,
        events: list[dict],
        *,
        due_at: float,
        reason: str,
        meta: dict | None = None,
    ) -> str:
        """Schedule ``events`` to be queued again at ``due_at`` (epoch seconds).

        ``reason`` says why they wait (``settle``, ``retry``, ...); ``meta`` goes
        with the task that queues them again, with ``reason`` in it.
        """
        entry = {
            "id": secrets.token_hex(8),
            "events": events,
            "reason": reason,
            "meta": {**(meta or {}), "reason": reason},
        }
        member = json.dumps(entry, sort_keys=True)
        self.redis.zadd(DELAY_KEY, {member: due_at})
        return entry["id"]

    def take_due(self, *, now: float | None = None, limit: int = 100) -> list[tuple]:
        """Lease up to ``limit`` due entries: [(member, entry)]."""
        now = time.time() if now is None else now
        members = self._take_due(
            keys=[DELAY_KEY], args=[repr(now), self.lease_seconds, limit]
        )
        return [(m, json.loads(m)) for m in members]

    def done(self, member) -> None:
        self.redis.zrem(DELAY_KEY, member)

    def pending(self) -> int:
        return self.redis.zcard(DELAY_KEY)

    def next_due(self) -> float | None:
        first = self.redis.zrange(DELAY_KEY, 0, 0, withscores=True)
        return first[0][1] if first else None


class Mover:
    """Moves due entries of the delay set onto the queue, in a daemon thread."""

    def __init__(self, delays: DelaySet, publish, *, interval_seconds: float):
        self.delays = delays
        self.publish = publish
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def move_due(self) -> int:
        moved = 0
        for member, entry in self.delays.take_due():
            self.publish(entry["events"], entry.get("meta", {}))
            self.delays.done(member)
            moved += 1
            log.info(
                "delayed_work_queued",
                entry=entry["id"],
                reason=entry["reason"],
                events=len(entry["events"]),
            )
        return moved

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mover", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while self.move_due():
                    pass
            except Exception as exc:  # a Redis outage must not end the thread
                log.warning("mover_failed", reason=type(exc).__name__)
            self._stop.wait(self.interval_seconds)

"""Deduplicate a delivery's events and put them on the queue, exactly once.

For each event key one atomic script claims it as pending for this delivery; the
claimed events are published in one task message; then their keys are marked done
for days. A key already done is a duplicate. A key pending under another delivery
means that delivery is still being queued: this one answers 503 and HubSpot's
redelivery settles it. A failed publish releases the claims and answers 503, so
nothing acknowledged is ever lost and nothing is queued twice.
"""

import contextlib
import secrets
import time
from dataclasses import dataclass

from webhook.payload import Delivery
from workers.dead_letters import DeadLetterStore

DEDUP_PREFIX = "associator:dedup:"
PENDING = "pending:"
DONE = "done"

# KEYS: the delivery's event keys. ARGV: pending value, pending TTL in ms.
# Returns "busy" when a key is pending under another delivery (nothing claimed),
# else one flag per key: 1 claimed, 0 already done.
CLAIM_SCRIPT = """
for i, key in ipairs(KEYS) do
  local state = redis.call('GET', key)
  if state and state ~= 'done' and state ~= ARGV[1] then
    return 'busy'
  end
end
local flags = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('GET', key)
  if state == 'done' then
    flags[i] = 0
  else
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    flags[i] = 1
  end
end
return flags
"""

# KEYS: claimed keys. ARGV: pending value, done TTL in seconds.
MARK_DONE_SCRIPT = """
for i, key in ipairs(KEYS) do
  local state = redis.call('GET', key)
  if state == false or state == ARGV[1] then
    redis.call('SET', key, 'done', 'EX', ARGV[2])
  end
end
return #KEYS
"""

# KEYS: claimed keys. ARGV: pending value.
RELEASE_SCRIPT = """
local released = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    released = released + 1
  end
end
return released
"""


class QueueUnavailable(Exception):
    """The delivery could not be queued now; HubSpot should redeliver it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class IntakeResult:
    kept: int
    duplicates: int
    invalid: int
    ignored: int


class Intake:
    def __init__(
        self,
        redis,
        publish,
        dead_letters: DeadLetterStore,
        *,
        pending_seconds: int,
        done_seconds: int,
        budget_seconds: float,
    ):
        self.redis = redis
        self.publish = publish
        self.dead_letters = dead_letters
        self.pending_ms = int(pending_seconds * 1000)
        self.done_seconds = int(done_seconds)
        self.budget_seconds = budget_seconds
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._mark_done = redis.register_script(MARK_DONE_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    def accept(self, delivery: Delivery, *, delivery_id: str) -> IntakeResult:
        deadline = time.monotonic() + self.budget_seconds

        # Unusable events are stored before anything is claimed: if that fails,
        # the whole delivery is refused and comes back.
        if delivery.invalid:
            self._store_invalid(delivery)
            self._check_budget(deadline)

        # Identical events inside one delivery count as duplicates at once.
        unique = {}
        for event in delivery.events:
            unique.setdefault(DEDUP_PREFIX + event.dedup_key, event)
        duplicates = len(delivery.events) - len(unique)
        if not unique:
            return IntakeResult(0, duplicates, len(delivery.invalid), delivery.ignored)

        token = PENDING + delivery_id + ":" + secrets.token_hex(4)
        keys = list(unique)
        flags = self._call(self._claim, keys, [token, self.pending_ms])
        if flags == "busy":
            raise QueueUnavailable("pending_in_other_delivery")
        claimed = [key for key, flag in zip(keys, flags, strict=True) if flag]
        duplicates += len(keys) - len(claimed)

        if claimed:
            try:
                self._check_budget(deadline)
                self.publish([unique[key].to_json() for key in claimed], delivery_id)
            except Exception as exc:
                self._release_quietly(claimed, token)
                if isinstance(exc, QueueUnavailable):
                    raise
                raise QueueUnavailable("publish_failed") from exc

            # The events are queued: a failure from here on must not make HubSpot
            # send them again. An unmarked key stays pending until it expires, and the
            # worker skips an event whose outcome is already recorded.
            with contextlib.suppress(Exception):
                self._mark_done(keys=claimed, args=[token, self.done_seconds])

        return IntakeResult(
            len(claimed), duplicates, len(delivery.invalid), delivery.ignored
        )

    def _store_invalid(self, delivery: Delivery) -> None:
        def store():
            pipe = self.redis.pipeline()
            for invalid in delivery.invalid:
                self.dead_letters.add(
                    invalid.reason,
                    [invalid.raw],
                    details=invalid.detail,
                    portal_id=_portal(invalid.raw),
                    pipeline=pipe,
                )
            pipe.execute()

        self._call(store)

    def _call(self, command, keys=None, args=None):
        try:
            if keys is None:
                return command()
            return command(keys=keys, args=args)
        except Exception as exc:
            raise QueueUnavailable("redis_unavailable") from exc

    def _check_budget(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise QueueUnavailable("redis_budget_exceeded")

    def _release_quietly(self, keys, token) -> None:
        # A failed release is harmless: the claims expire on their own.
        with contextlib.suppress(Exception):
            self._release(keys=keys, args=[token])


def _portal(raw: dict) -> int | None:
    portal = raw.get("portalId")
    return portal if isinstance(portal, int) and not isinstance(portal, bool) else None

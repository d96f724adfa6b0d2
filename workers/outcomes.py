"""Every kept event ends in exactly one recorded outcome.

Outcomes live in Redis under the event's dedup key for a week, so a test, an
operator or a second delivery of the same task can see what became of an event.
"""

import json
import time

OUTCOME_PREFIX = "associator:outcome:"
OUTCOME_TTL_SECONDS = 7 * 24 * 3600

APPLIED = "applied"
SKIPPED = "skipped"
DEAD_LETTERED = "dead_lettered"

SKIP_REASONS = frozenset(
    {
        "record_missing",
        "no_rule",
        "no_candidate",
        "free_mail_domain",
        "filtered_out",
        "dry_run",
        "no_credentials",
    }
)


class OutcomeStore:
    def __init__(self, redis):
        self.redis = redis

    def record(self, dedup_key: str, outcome: str, **details) -> None:
        if outcome == SKIPPED and details.get("reason") not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {details.get('reason')!r}")
        entry = {"outcome": outcome, "at": time.time(), **details}
        self.redis.set(
            OUTCOME_PREFIX + dedup_key, json.dumps(entry), ex=OUTCOME_TTL_SECONDS
        )

    def get_many(self, dedup_keys: list[str]) -> list[dict | None]:
        if not dedup_keys:
            return []
        raws = self.redis.mget([OUTCOME_PREFIX + key for key in dedup_keys])
        return [json.loads(raw) if raw else None for raw in raws]

    def get(self, dedup_key: str) -> dict | None:
        raw = self.redis.get(OUTCOME_PREFIX + dedup_key)
        return json.loads(raw) if raw else None

"""What planning an import costs: HubSpot calls, time and memory per batch.

Fills the HubSpot fake of the tests with companies and contacts as an import
would (several contacts per company domain), then plans the contacts' creation
events in batches of 100, as the worker takes them from deliveries, against a
real embedded Redis. Prints per batch and in all the API calls, the milliseconds
and the peak memory the planning allocated, and checks every association is
there::

    python benchmarks/planner.py [--contacts 5000] [--per-company 5]
"""

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# After the path is set: the fake lives with the tests.
from tests.hubspot_fake import FakeHubSpot
from workers.embedded_redis import EmbeddedRedis
from workers.events import Event
from workers.hubspot import HubSpotClient
from workers.labels import LabelResolver
from workers.planner import Planner
from workers.ratelimit import RateLimiter
from workers.rules import load_rules

EVENTS_PER_BATCH = 100
CLAIM_SECONDS = 600
LABEL_CACHE_SECONDS = 3600
HTTP_TIMEOUT_SECONDS = 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=5000, help="default 5000")
    parser.add_argument(
        "--per-company", type=int, default=5, help="contacts per domain, default 5"
    )
    parser.add_argument("--api-version", default="2026-03", choices=["2026-03", "v4"])
    args = parser.parse_args(argv)
    if args.contacts < 1 or args.per_company < 1:
        parser.error("--contacts and --per-company must be at least 1")

    with (
        tempfile.TemporaryDirectory(prefix="associator-bench-") as directory,
        EmbeddedRedis(Path(directory) / "redis") as server,
        FakeHubSpot() as hubspot,
    ):
        store = redis.Redis.from_url(server.url, decode_responses=True)
        contacts = _import(hubspot, args.contacts, args.per_company)
        client = HubSpotClient(
            token=hubspot.token,
            base_url=hubspot.url,
            api_version=args.api_version,
            timeout=HTTP_TIMEOUT_SECONDS,
        )
        # As the worker does: every call takes its slot in the shared budgets.
        limiter = RateLimiter(
            store,
            default_per_10s=100,
            search_per_second=5,
            share=0.9,
            max_wait_seconds=10.0,
            daily_defer_seconds=3600.0,
        )
        client.before_request = lambda kind: limiter.acquire(hubspot.portal_id, kind)
        client.after_answer = lambda kind, status, limits, error: limiter.observe(
            hubspot.portal_id, kind, status, limits
        )
        planner = Planner(
            client=client,
            portal_id=hubspot.portal_id,
            rules=load_rules(None),
            labels=LabelResolver(store, refresh_seconds=LABEL_CACHE_SECONDS),
            redis=store,
            claim_seconds=CLAIM_SECONDS,
        )

        calls, times, peaks, created = [], [], [], 0
        for start in range(0, len(contacts), EVENTS_PER_BATCH):
            batch = [_event(c) for c in contacts[start : start + EVENTS_PER_BATCH]]
            calls_before = hubspot.call_count()
            tracemalloc.start()
            started = time.perf_counter()
            result = planner.run(batch)
            times.append((time.perf_counter() - started) * 1000)
            peaks.append(tracemalloc.get_traced_memory()[1] / 1024)
            tracemalloc.stop()
            calls.append(hubspot.call_count() - calls_before)
            created += result.created

        missing = [c for c in contacts if not hubspot.associations("0-1", c, "0-2")]
        client.close()
        store.close()

    batches = len(calls)
    print(f"contacts: {len(contacts)} in {batches} batches of {EVENTS_PER_BATCH}")
    print(f"associations created: {created}; contacts left without: {len(missing)}")
    print(
        f"API calls: {sum(calls)} in all, {statistics.mean(calls):.1f} a batch "
        f"(first {calls[0]}, with the label cache cold; most {max(calls)})"
    )
    print(
        f"ms a batch: p50 {statistics.median(times):.0f}, max {max(times):.0f} "
        "(the fake answers on loopback and the limiter may wait; real HubSpot "
        "adds ~100 ms a call)"
    )
    print(f"peak memory a batch: {max(peaks):.0f} KiB")
    return 1 if missing else 0


def _import(hubspot: FakeHubSpot, contacts: int, per_company: int) -> list[int]:
    ids = []
    for n in range(contacts):
        domain = f"company-{n // per_company}.example"
        if n % per_company == 0:
            hubspot.add_record("0-2", {"domain": domain, "name": domain})
        ids.append(hubspot.add_record("0-1", {"email": f"person-{n}@{domain}"}))
    return ids


def _event(contact_id: int) -> Event:
    return Event(
        portal_id=62515,
        object_type_id="0-1",
        object_id=contact_id,
        occurred_at=0,
        event_id=contact_id,
        subscription_type="contact.creation",
        kind="creation",
        change_source="IMPORT",
    )


if __name__ == "__main__":
    raise SystemExit(main())

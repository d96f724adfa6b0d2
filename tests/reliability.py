"""What a fault test leaves for ``scripts/reliability_report.py``.

At its end a fault test calls :func:`record_run` with the events it sent: their
stored outcomes are read from Redis, dumped with the fake's counts to
``build/reliability/<test>.json``, and returned as figures for the test's own
assertions (nothing lost, nothing written twice).
"""

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.reliability_report import figures
from workers.outcomes import OutcomeStore

RESULTS_DIR = Path(__file__).resolve().parents[1] / "build" / "reliability"


@dataclass(frozen=True)
class RunFigures:
    sent: int
    applied: int
    skipped: int
    dead_lettered: int
    lost: int
    written_twice: int
    rate_limited: int
    dead_letter_reasons: dict


def record_run(promise: str, *, keys, redis, hubspot) -> RunFigures:
    """Dump the outcomes of the events with dedup ``keys``; answer the figures.

    The run is named after the test calling it (its pytest node id).
    """
    test = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
    keys = list(dict.fromkeys(keys))
    stored = OutcomeStore(redis).get_many(keys)
    run = {
        "test": test,
        "promise": promise,
        "finished_at": time.time(),
        "outcomes": dict(zip(keys, stored, strict=True)),
        "written_twice": hubspot.redundant_writes,
        "rate_limited": hubspot.rate_limited,
        "api_calls": hubspot.call_count(),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", test)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(run, sort_keys=True))
    return RunFigures(**figures(run))

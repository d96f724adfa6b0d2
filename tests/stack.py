"""The whole service as real processes, for end-to-end and fault tests.

:class:`ServiceStack` runs what the Procfile runs, gunicorn serving
``webhook:create_app()`` and a Celery worker, as child processes on a given Redis
and against a :class:`~tests.hubspot_fake.FakeHubSpot` served from the test
process. Every wait of the service is set short through its ``ASSOCIATOR_*``
settings (:data:`FAST_SETTINGS`); a test module overrides any of them with
``env``.

A module starts one stack (its startup costs seconds) and shares it between its
tests; :meth:`ServiceStack.reset` clears what one test leaves in Redis. Each
process's output goes to a file in the stack's directory, and a failing wait
shows its tail. Fault tests reach the processes through :attr:`ServiceStack.web`
and :attr:`ServiceStack.worker` (pids, pool children, signals), and start a new
worker with :meth:`ServiceStack.start_worker` or
:meth:`ServiceStack.restart_worker`. :meth:`ServiceStack.stop` leaves no process
behind: it ends each process group, orphaned pool children included.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest
import redis
import requests

from tests.support import (
    SECRET,
    free_port,
    service_environment,
    signed_headers,
    wait_for_status,
)
from webhook.app import WEBHOOK_PATH
from webhook.payload import parse_event
from workers.connections import QUEUE
from workers.credentials import PORTAL_CACHE_PREFIX
from workers.delays import DELAY_KEY
from workers.embedded_redis import die_with_parent
from workers.events import Event
from workers.labels import LABELS_PREFIX
from workers.local_service import WORKER_COMMAND
from workers.outcomes import OutcomeStore
from workers.settings import Settings

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
OUTCOME_TIMEOUT_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.05
LOG_TAIL_LINES = 60
STATE_PREFIX = "associator:"
# Where kombu's Redis transport keeps the messages handed to a worker and not yet
# acknowledged (its default unacked_key).
UNACKED_KEY = "unacked"
# Caches of facts the fake never changes: kept by reset(), so that a test's call
# count does not depend on which test ran first.
CACHE_PREFIXES = (PORTAL_CACHE_PREFIX, LABELS_PREFIX)

# Every wait of the service, short. Each value is checked by workers/settings.py
# as the processes start.
FAST_SETTINGS = {
    "ASSOCIATOR_LOG_FORMAT": "json",
    "ASSOCIATOR_LOG_LEVEL": "INFO",
    "ASSOCIATOR_WORKER_CONCURRENCY": "2",
    # Above 0, so that a new event waits in the delay set and comes back through
    # the mover, as in production. A test's search lag stays below it.
    "ASSOCIATOR_SETTLE_SECONDS": "1.0",
    "ASSOCIATOR_RECHECK_SECONDS": "2.0",
    "ASSOCIATOR_MOVER_INTERVAL_SECONDS": "0.1",
    # A delay-set entry taken by a mover that died comes due again this soon.
    "ASSOCIATOR_DELAY_LEASE_SECONDS": "5",
    "ASSOCIATOR_RETRY_BASE_SECONDS": "0.2",
    "ASSOCIATOR_RETRY_MAX_SECONDS": "1.0",
    "ASSOCIATOR_HTTP_TIMEOUT_SECONDS": "2.0",
    # The default: search's window is one second, so a wait of one second always
    # finds a slot, where a shorter one defers plans that then read again.
    "ASSOCIATOR_RATE_LIMIT_MAX_WAIT_SECONDS": "1.0",
    "ASSOCIATOR_DAILY_DEFER_SECONDS": "2.0",
    "ASSOCIATOR_MAX_CALLS_PER_TASK": "20",
    # (2 s + 1 s) x 20 calls + 2 s of waiting for another plan's write = 62 s
    # < the time limit < the visibility timeout.
    "ASSOCIATOR_TASK_TIME_LIMIT": "65",
    "ASSOCIATOR_VISIBILITY_TIMEOUT": "70",
    # A claim left by a killed worker blocks its pair only this long.
    "ASSOCIATOR_WRITE_CLAIM_SECONDS": "10",
}


def web_command(port: int) -> list[str]:
    """The Procfile's web process, bound to a loopback port."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--preload",
        "--threads",
        "4",
        "--no-control-socket",
        "--graceful-timeout",
        str(int(STOP_TIMEOUT_SECONDS / 2)),
        "webhook:create_app()",
    ]


def dedup_key(item: "str | Event | Mapping") -> str:
    """The key the service stores an event's outcome under.

    ``item`` is a key already, an :class:`Event`, or a raw HubSpot event, parsed
    as the receiver parses it.
    """
    if isinstance(item, str):
        return item
    if isinstance(item, Event):
        return item.dedup_key
    event = parse_event(dict(item))
    if event is None:
        raise ValueError(f"the receiver ignores this event; it gets no outcome: {item}")
    return event.dedup_key


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, from ``/proc``; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[2])


def living_processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, process group) of every process but zombies."""
    found = {}
    for entry in Path("/proc").iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z":
            found[int(entry.name)] = stat
    return found


class ServiceProcess:
    """One process of the stack in a session of its own, its output in a file.

    Its own session makes it the leader of a process group that its children
    join, so :meth:`stop` can end them even when they outlive it.
    """

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], directory: Path
    ):
        self.name = name
        self.command = command
        self.env = env
        self.directory = directory
        self.log_path = directory / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        with self.log_path.open("wb") as output:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.directory,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        return self

    # What a test reads

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def children(self) -> list[int]:
        """The pids of the process's living children, from ``/proc``."""
        return sorted(
            pid for pid, (_, ppid, _) in living_processes().items() if ppid == self.pid
        )

    def group(self) -> list[int]:
        """Every living process of its group: itself, its children, their orphans."""
        return sorted(
            pid for pid, (_, _, pgid) in living_processes().items() if pgid == self.pid
        )

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        shown = self.output().splitlines()[-lines:]
        return f"--- last {len(shown)} lines of {self.log_path} ---\n" + "\n".join(
            shown
        )

    def log(self, *, since: int = 0) -> list[dict]:
        """The JSON log lines from byte offset ``since`` on, in order."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(since)
                raw = handle.read()
        except FileNotFoundError:
            return []
        parsed = []
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    parsed.append(json.loads(line))
                except ValueError:
                    continue
        return parsed

    def log_size(self) -> int:
        """The current end of the output, for ``log(since=...)``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for_log(
        self,
        matches: Callable[[dict], bool],
        *,
        since: int = 0,
        timeout_seconds: float = START_TIMEOUT_SECONDS,
    ) -> dict:
        """The first JSON log line ``matches`` accepts; fail if none comes in time."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            for line in self.log(since=since):
                if matches(line):
                    return line
            if not self.alive:
                pytest.fail(
                    f"{self.name} exited with {self.returncode} before the awaited "
                    f"log line\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name} logged no awaited line in {timeout_seconds}s\n"
                    f"{self.tail()}"
                )
            time.sleep(POLL_SECONDS)

    # What a test does to it

    def send_signal(self, signum: int) -> None:
        """Signal the process itself (not its group), e.g. SIGKILL or SIGTERM."""
        if self.alive:
            self.process.send_signal(signum)

    def wait(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> int:
        return self.process.wait(timeout_seconds)

    def stop(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM, SIGKILL after ``timeout_seconds``, then end what is left of the
        group; the exit code (negative: the signal that ended it)."""
        if self.process is None:
            return None
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.process.wait()
        # Pool children whose parent was killed are left in its group.
        self._kill_group()
        deadline = time.monotonic() + timeout_seconds
        while (left := self.group()) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if left:
            raise AssertionError(f"{self.name} left processes behind: {left}")
        return self.process.returncode

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class WorkerProcess(ServiceProcess):
    """The Celery worker: a main process and its prefork pool."""

    def pool_pids(self) -> list[int]:
        """The pool processes, as the main process has them right now."""
        return self.children()

    def wait_ready(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> dict:
        """The worker's ``worker_ready`` line, once it consumes the queue."""
        return self.wait_for_log(
            lambda line: line.get("event") == "worker_ready",
            timeout_seconds=timeout_seconds,
        )

    def wait_for_pool(
        self, size: int, timeout_seconds: float = START_TIMEOUT_SECONDS
    ) -> list[int]:
        """The pool's pids once it has ``size`` processes (after a child was killed,
        the main process starts another)."""
        deadline = time.monotonic() + timeout_seconds
        while len(pids := self.pool_pids()) != size:
            if not self.alive or time.monotonic() > deadline:
                pytest.fail(
                    f"the worker's pool has {pids}, not {size} processes\n{self.tail()}"
                )
            time.sleep(POLL_SECONDS)
        return pids


class ServiceStack:
    """gunicorn and a Celery worker on ``redis_url``, calling ``hubspot``.

    ``env`` overrides :data:`FAST_SETTINGS` or adds variables; a value of None
    removes one. Use it as a context manager, or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(
        self,
        *,
        redis_url: str,
        hubspot,
        directory: Path,
        api_version: str = "2026-03",
        env: Mapping[str, str | None] | None = None,
    ):
        self.redis_url = redis_url
        self.hubspot = hubspot
        self.directory = Path(directory)
        self.api_version = api_version

        variables = {
            **FAST_SETTINGS,
            "REDIS_URL": redis_url,
            "HUBSPOT_API_BASE_URL": hubspot.url,
            "HUBSPOT_ACCESS_TOKEN": hubspot.token,
            "HUBSPOT_CLIENT_SECRET": SECRET,
            "HUBSPOT_API_VERSION": api_version,
            **(env or {}),
        }
        kept = {k: str(v) for k, v in variables.items() if v is not None}
        self.env = service_environment(**kept)
        # The settings the processes run with; they refuse to start on bad ones.
        self.settings = Settings.from_env(self.env)

        self.port = None
        self.web: ServiceProcess | None = None
        self.worker: WorkerProcess | None = None
        self.workers: list[WorkerProcess] = []
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.outcomes = OutcomeStore(self.redis)
        self._log_marks: dict[ServiceProcess, int] = {}

    # Lifecycle

    def start(self) -> "ServiceStack":
        self.directory.mkdir(parents=True, exist_ok=True)
        # Nothing runs on this Redis yet: what an earlier stack left goes.
        self.redis.flushall()
        self.port = free_port()
        self.web = ServiceProcess(
            "web", web_command(self.port), self.env, self.directory
        ).start()
        try:
            # Both start at once; the worker needs the longer.
            self.start_worker(wait=False)
            try:
                wait_for_status(
                    self.url("/readyz"),
                    timeout_seconds=START_TIMEOUT_SECONDS,
                    process=self.web.process,
                )
            except AssertionError as exc:
                pytest.fail(f"{exc}\n{self.web.tail()}")
            self.worker.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.mark_logs()
        return self

    def stop(self) -> None:
        """Web first, so nothing new arrives, then every worker ever started."""
        problems = []
        for process in [self.web, *self.workers]:
            if process is None:
                continue
            try:
                process.stop()
            except AssertionError as exc:
                problems.append(str(exc))
        self.redis.close()
        if problems:
            raise AssertionError("; ".join(problems))

    def __enter__(self) -> "ServiceStack":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start_worker(self, *, wait: bool = True) -> WorkerProcess:
        """Start another worker (after the last was killed, or beside it)."""
        name = "worker" if not self.workers else f"worker-{len(self.workers) + 1}"
        worker = WorkerProcess(name, WORKER_COMMAND, self.env, self.directory)
        self.workers.append(worker)
        self.worker = worker.start()
        if wait:
            worker.wait_ready()
        return worker

    def restart_worker(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS):
        """Stop the current worker (SIGTERM, then SIGKILL) and start a new one."""
        self.worker.stop(timeout_seconds)
        return self.start_worker()

    def kill_worker(self, signum: int = signal.SIGKILL) -> None:
        """Signal the worker's main process; its pool is left as it reacts."""
        self.worker.send_signal(signum)

    # Talking to it

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def webhook_url(self) -> str:
        return self.url(WEBHOOK_PATH)

    def deliver(self, events: list[dict], **headers: str) -> requests.Response:
        """POST one delivery as HubSpot signs it (v1 and v3); ``headers`` add to or
        replace the signed ones."""
        body = json.dumps(events).encode()
        sent = {**signed_headers(body, self.webhook_url), **headers}
        # A new connection each time: a kept-alive one the web has just closed
        # would fail the POST.
        return requests.post(
            self.webhook_url, data=body, headers=sent, timeout=REQUEST_TIMEOUT_SECONDS
        )

    def wait_for_outcomes(
        self,
        items: Iterable,
        timeout_seconds: float = OUTCOME_TIMEOUT_SECONDS,
    ) -> list[dict]:
        """The outcome of each item (raw event, :class:`Event` or dedup key), in the
        order given, once every one has one."""
        keys = [dedup_key(item) for item in items]
        deadline = time.monotonic() + timeout_seconds
        while True:
            found = self.outcomes.get_many(keys)
            missing = [k for k, outcome in zip(keys, found, strict=True) if not outcome]
            if not missing:
                return found
            if not self.worker.alive:
                pytest.fail(
                    f"the worker exited with {self.worker.returncode} with "
                    f"{len(missing)} of {len(keys)} events undecided\n"
                    f"{self.worker.tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{len(missing)} of {len(keys)} events have no outcome after "
                    f"{timeout_seconds}s (e.g. {missing[:3]}); queued tasks "
                    f"{self.redis.llen(QUEUE)}, delayed entries "
                    f"{self.redis.zcard(DELAY_KEY)}\n{self.worker.tail()}"
                )
            time.sleep(POLL_SECONDS)

    def delayed(self) -> list[tuple[float, dict]]:
        """(due at, entry) of everything in the delay set, soonest first."""
        return [
            (score, json.loads(member))
            for member, score in self.redis.zrange(DELAY_KEY, 0, -1, withscores=True)
        ]

    def wait_until_delayed(
        self,
        items: Iterable,
        *,
        reason: str,
        timeout_seconds: float = OUTCOME_TIMEOUT_SECONDS,
    ) -> None:
        """Wait until each item waits in the delay set for ``reason`` (``settle``,
        ``recheck``, ``retry``)."""
        keys = {dedup_key(item) for item in items}
        deadline = time.monotonic() + timeout_seconds
        while True:
            waiting = {
                Event.from_json(raw).dedup_key
                for _, entry in self.delayed()
                if entry["reason"] == reason
                for raw in entry["events"]
            }
            if keys <= waiting:
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{len(keys - waiting)} events never waited for {reason}\n"
                    f"{self.worker.tail()}"
                )
            time.sleep(POLL_SECONDS)

    def wait_until_idle(self, timeout_seconds: float = OUTCOME_TIMEOUT_SECONDS) -> None:
        """Wait until no task is queued or unacknowledged and nothing is delayed."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            pending = {
                "queued": self.redis.llen(QUEUE),
                "unacknowledged": self.redis.hlen(UNACKED_KEY),
                "delayed": self.redis.zcard(DELAY_KEY),
            }
            if not any(pending.values()):
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"still busy after {timeout_seconds}s: {pending}\n"
                    f"{self.worker.tail()}"
                )
            time.sleep(POLL_SECONDS)

    # Between tests

    def reset(self) -> None:
        """Forget what the service stored (outcomes, dedup keys, delayed work,
        claims, dead letters) and the fake's counters and injected faults.

        The fake's records and associations stay: tests use records of their own.
        Call it when no work is in flight, or that work's outcomes reappear.
        """
        keys = [
            key
            for key in self.redis.scan_iter(f"{STATE_PREFIX}*", count=1000)
            if not key.startswith(CACHE_PREFIXES)
        ]
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])
        self.hubspot.reset_counters()
        self.hubspot.fail_next.clear()
        self.hubspot.rate_limit_per_10s = None
        self.hubspot.internal_errors.clear()
        self.mark_logs()

    def mark_logs(self) -> None:
        """From now on, :meth:`log_since_mark` and :meth:`errors` start here."""
        self._log_marks = {p: p.log_size() for p in self._processes()}

    def log_since_mark(self) -> list[dict]:
        """The JSON log lines of every process since the last mark."""
        return [
            line
            for process in self._processes()
            for line in process.log(since=self._log_marks.get(process, 0))
        ]

    def errors(self) -> list[dict]:
        """Log lines at ERROR or above since the last mark."""
        return [
            line
            for line in self.log_since_mark()
            if line.get("level") in ("error", "critical")
        ]

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self._processes())

    def _processes(self) -> list[ServiceProcess]:
        return [p for p in [self.web, *self.workers] if p is not None]

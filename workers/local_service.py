"""``associator run``: the whole service on one machine, with nothing installed.

It starts an embedded Redis (unless ``REDIS_URL`` is set), then the web process
(gunicorn) and the worker (Celery) with that ``REDIS_URL``, and stops them all on
Ctrl-C or SIGTERM: web first, so nothing new arrives, then the worker, then Redis.
One data directory serves one run at a time; a lock file enforces it.
"""

import fcntl
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from workers.embedded_redis import EmbeddedRedis, EmbeddedRedisError, die_with_parent
from workers.logs import get_logger
from workers.settings import Settings

log = get_logger(__name__)

LOCK_FILE = "run.lock"
SECRET_FILE = "client_secret"  # noqa: S105 - a file name, not a secret
POLL_INTERVAL_SECONDS = 0.2


# The Procfile's worker process, run with this interpreter.
WORKER_COMMAND = [
    sys.executable,
    "-m",
    "celery",
    "-A",
    "workers.worker",
    "worker",
    "--without-mingle",
    "--without-gossip",
    "--loglevel",
    "INFO",
]


class RunError(Exception):
    """``associator run`` cannot start; the message says why."""


def local_client_secret(data_dir: Path, *, create: bool) -> str | None:
    """The generated secret kept in the data directory, made on first use."""
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    log.warning("local_client_secret_generated", path=str(path))
    return path.read_text().strip()


class DataDirLock:
    def __init__(self, data_dir: Path):
        self.path = data_dir / LOCK_FILE
        self.handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunError(
                f"another `associator run` (pid {owner}) is using the data directory "
                f"{self.path.parent}; stop it first, or set ASSOCIATOR_DATA_DIR to "
                "another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class LocalService:
    def __init__(self, settings: Settings, *, host: str = "127.0.0.1"):
        self.settings = settings
        self.host = host
        self.data_dir = settings.data_dir.resolve()
        self.lock = DataDirLock(self.data_dir)
        self.redis: EmbeddedRedis | None = None
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def run(self) -> int:
        self.lock.acquire()
        previous = {
            sig: signal.signal(sig, self._request_stop)
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            env = self._child_environment()
            self._start_children(env)
            log.info(
                "service_started",
                url=f"http://{self.host}:{self.settings.port}/webhooks/hubspot",
                data_dir=str(self.data_dir),
            )
            return self._supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.lock.release()

    def _request_stop(self, signum, frame):
        if not self.stopping:
            log.info("service_stopping", signal=signal.Signals(signum).name)
        self.stopping = True

    def _child_environment(self) -> dict[str, str]:
        env = dict(os.environ, ASSOCIATOR_LOCAL="true", PORT=str(self.settings.port))
        env.setdefault("ASSOCIATOR_LOG_FORMAT", self.settings.log_format)

        if self.settings.redis_url:
            log.info("using_redis_url", detail="REDIS_URL is set: no embedded Redis")
        else:
            self.redis = EmbeddedRedis(
                self.data_dir / "redis",
                startup_timeout=self.settings.startup_timeout_seconds,
                shutdown_timeout=self.settings.shutdown_timeout_seconds,
            )
            try:
                self.redis.start()
            except EmbeddedRedisError as exc:
                raise RunError(str(exc)) from exc
            env["REDIS_URL"] = self.redis.url
            log.info("embedded_redis_ready", url=self.redis.url)

        if not self.settings.hubspot_client_secret:
            env["HUBSPOT_CLIENT_SECRET"] = local_client_secret(
                self.data_dir, create=True
            )
            log.warning(
                "using_local_client_secret",
                path=str(self.data_dir / SECRET_FILE),
                detail="HUBSPOT_CLIENT_SECRET is not set; `associator "
                "send-test-event` signs with this local secret",
            )
        if not self.settings.hubspot_access_token:
            log.warning(
                "no_hubspot_access_token",
                detail="the worker records every event as skipped (no_credentials)",
            )
        return env

    def _start_children(self, env: dict[str, str]) -> None:
        commands = {
            "web": [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"{self.host}:{self.settings.port}",
                "--workers",
                "2",
                "--threads",
                "4",
                "--no-control-socket",
                "--graceful-timeout",
                str(int(self.settings.shutdown_timeout_seconds)),
                "webhook:create_app()",
            ],
            "worker": WORKER_COMMAND,
        }
        for name, command in commands.items():
            # Own sessions: a Ctrl-C reaches this process only, which then stops
            # the children in order.
            self.children[name] = subprocess.Popen(
                command, env=env, start_new_session=True, preexec_fn=die_with_parent()
            )
            log.info("child_started", child=name, pid=self.children[name].pid)

    def _supervise(self) -> int:
        while not self.stopping:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    log.error("child_exited", child=name, code=code)
                    return 1
            time.sleep(POLL_INTERVAL_SECONDS)
        return 0

    def _stop_all(self) -> None:
        for name in ("web", "worker"):
            child = self.children.get(name)
            if child is None or child.poll() is not None:
                continue
            child.terminate()
            try:
                child.wait(self.settings.shutdown_timeout_seconds)
            except subprocess.TimeoutExpired:
                log.warning("child_killed", child=name, pid=child.pid)
                child.kill()
                child.wait()
            log.info("child_stopped", child=name, code=child.returncode)
        if self.redis is not None:
            self.redis.stop()
        log.info("service_stopped")

